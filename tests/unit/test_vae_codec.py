"""Unit tests of the tokenizer's pixel I/O and multi-scale BSQ encode."""
import types

import numpy as np
import pytest
import torch
from PIL import Image

from infinitystar import bsq
from infinitystar.vae import encode_bits, frames_to_float_images, frames_to_uint8, prepare_image, prepare_video


def test_frames_to_uint8_truncates_and_smooths_videos_only():
    x = torch.zeros(1, 3, 3, 2, 2)
    x[0, 0, 0] = 0.999  # (x+1)/2*255 = 254.87 -> 254 (truncation)
    x[0, 1, 1] = -2.0  # clamped to 0
    x[0, 2, 2] = 1.5  # clamped to 255
    vid = frames_to_uint8(x, is_video=True)
    assert vid.shape == (3, 2, 2, 3) and vid.dtype == torch.uint8
    assert vid[1, 0, 0, 1] == 0 and vid[2, 0, 0, 2] == 255 and vid[1, 0, 0, 0] == 127
    assert torch.equal(vid[0], vid[1])  # frame 0 := frame 1
    img = frames_to_uint8(x, is_video=False)
    assert img[0, 0, 0, 0] == 254  # not overwritten
    one = frames_to_uint8(x[:, :, :1], is_video=True)
    assert one.shape[0] == 1 and one[0, 0, 0, 0] == 254


def test_frames_to_float_images():
    x = torch.linspace(-1.5, 1.5, 3 * 2 * 4 * 4).reshape(1, 3, 2, 4, 4)
    f = frames_to_float_images(x)
    assert f.shape == (2, 4, 4, 3) and f.dtype == torch.float32 and f.device.type == "cpu"
    assert f.min() == 0 and f.max() == 1
    torch.testing.assert_close(f[1, 2, 3], ((x[0, :, 1, 2, 3] + 1) / 2).clamp(0, 1))
    s = frames_to_float_images(x, smooth_first_frame=True)
    assert torch.equal(s[0], s[1])
    with pytest.raises(ValueError):
        frames_to_float_images(torch.zeros(2, 3, 1, 4, 4))


def _reference_transform(img: Image.Image, h: int, w: int) -> np.ndarray:
    """Resize-to-cover written independently: scale = max(h/H, w/W), int() on the covering side."""
    W, H = img.size
    if W / H <= w / h:
        size = (w, int(w * H / W))
    else:
        size = (int(h * W / H), h)
    arr = np.asarray(img.resize(size, Image.LANCZOS)).astype(np.float32) / 255
    top, left = (arr.shape[0] - h) // 2, (arr.shape[1] - w) // 2
    return arr[top:top + h, left:left + w] * 2 - 1


@pytest.mark.parametrize("src", [(300, 500), (500, 300), (96, 160)])
def test_prepare_image_cover_crop(src):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(*src, 3), dtype=np.uint8)
    got = prepare_image(arr, 64, 112)
    assert got.shape == (1, 3, 1, 64, 112) and got.min() >= -1 and got.max() <= 1
    ref = _reference_transform(Image.fromarray(arr), 64, 112)
    np.testing.assert_allclose(got[0, :, 0].permute(1, 2, 0).numpy(), ref, atol=1e-6)
    torch.testing.assert_close(prepare_image(Image.fromarray(arr), 64, 112), got)


def test_prepare_video_and_errors():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, size=(5, 40, 60, 3), dtype=np.uint8)
    vid = prepare_video(frames, 32, 48)
    assert vid.shape == (1, 3, 5, 32, 48)
    torch.testing.assert_close(vid[:, :, 2:3], prepare_image(frames[2], 32, 48))
    with pytest.raises(ValueError, match="multiples of 16"):
        prepare_image(frames[0], 30, 48)
    with pytest.raises(ValueError, match="uint8"):
        prepare_video(frames.astype(np.float32), 32, 48)
    with pytest.raises(ValueError, match="uint8"):
        prepare_image(np.zeros((4, 4), np.uint8), 32, 48)


def _steps(scales, reps, d_of, clip_frames):
    steps, idx = [], 0
    for clip, (ss, ee) in enumerate(clip_frames):
        for si, (h, w) in enumerate(scales):
            for r in range(reps):
                steps.append(types.SimpleNamespace(index=idx, si=si, rep=r, clip=clip, t=ee - ss, h=h, w=w,
                                                   d=d_of(h, w), frame_ss=ss, frame_ee=ee))
                idx += 1
    return steps


def test_encode_bits_residual_loop():
    g = torch.Generator().manual_seed(3)
    latent = torch.randn(1, 64, 5, 6, 8, generator=g)
    scales = [(1, 1), (2, 3), (4, 5), (6, 8)]
    steps = _steps(scales, 2, lambda h, w: 16 if h * w < 20 else 64, [(0, 1), (1, 5)])
    bits, summed = encode_bits(latent, steps)
    assert len(bits) == len(steps) and summed.shape == latent.shape
    assert bits[0].shape == (1, 1, 1, 1, 16) and bits[-1].shape == (1, 4, 6, 8, 64) and bits[0].dtype == torch.uint8
    # The accumulators are exactly the sum of the codes of the bits (what the transformer rebuilds).
    accs = {0: torch.zeros(1, 64, 1, 6, 8), 1: torch.zeros(1, 64, 4, 6, 8)}
    for step, b in zip(steps, bits):
        accs[step.clip] = bsq.accumulate(accs[step.clip], b)
    torch.testing.assert_close(summed, torch.cat([accs[0], accs[1]], dim=2), rtol=0, atol=1e-6)
    # Each step quantizes the sign of the area-resampled residual.
    first = bsq.resample(latent[:, :, :1], 16, (1, 1, 1), "area")
    assert torch.equal(bits[0][0, 0, 0, 0], (first[0, :, 0, 0, 0] > 0).to(torch.uint8))
    # The residual shrinks as scales are added.
    err_full = (latent - summed).norm()
    _, summed_few = encode_bits(latent, [s for s in steps if s.si < 2])
    assert err_full < (latent - summed_few).norm()
    # A prefix (e.g. the image clip for I2V) gives the same bits and only that clip's accumulator.
    n_img = len(scales) * 2
    pbits, psummed = encode_bits(latent, steps[:n_img])
    assert all(torch.equal(a, b) for a, b in zip(pbits, bits[:n_img]))
    torch.testing.assert_close(psummed, summed[:, :, :1], rtol=0, atol=0)


def test_encode_bits_errors():
    step = types.SimpleNamespace(index=0, clip=0, t=2, h=1, w=1, d=16, frame_ss=0, frame_ee=2)
    with pytest.raises(ValueError, match="frames"):
        encode_bits(torch.zeros(1, 64, 1, 2, 2), [step])
    with pytest.raises(ValueError, match="at least one"):
        encode_bits(torch.zeros(1, 64, 1, 2, 2), [])


@pytest.mark.parametrize("src, target", [((288, 224), (224, 288)), ((576, 448), (224, 288)), ((144, 448), (448, 144)),
                                         ((1040, 896), (896, 1040))])  # (width, height) sources, (height, width)
def test_prepare_image_of_the_targets_own_aspect(src, target):
    """A source of exactly the target's aspect: int() of the computed side can come one pixel short (223 for 224),
    where the official transform crops a single row; the result must still be the full target."""
    w0, h0 = src
    height, width = target
    img = np.random.default_rng(0).integers(0, 256, (h0, w0, 3), dtype=np.uint8)
    assert prepare_image(img, height, width).shape == (1, 3, 1, height, width)
