"""Frames fitted to the output size as they are read (``vae.FrameFit``): the same pixels as the official transform of
the frames at their own size, with only output-sized frames held (a minute of 4K is 24 GB of uint8 frames)."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from infinitystar.vae import FrameFit, cover_crop, prepare_image, prepare_video
from infinitystar.video_io import read_frames, read_video_clip, write_mp4


def _noise(t, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("source, target", [
    ((270, 480), (192, 336)),   # 16:9 down to a 16:9 template (int() may land a row short)
    ((480, 640), (192, 336)),   # 4:3 into 16:9: rows cut
    ((640, 360), (336, 192)),   # portrait
    ((96, 128), (192, 336)),    # smaller than the output: an upscale
    ((192, 336), (192, 336)),   # already the output's size
    ((224, 224), (224, 224)),   # the square whose computed side int() truncates to 223
])
def test_fitted_frames_transform_to_the_same_pixels(source, target):
    frames = _noise(3, *source, seed=sum(source))
    fit = FrameFit(lambda h, w: target)
    fitted = np.stack([fit(f) for f in frames])
    assert fitted.shape == (3, *target, 3) and fit.source == source
    assert fit.aspect == pytest.approx(source[0] / source[1])
    assert torch.equal(prepare_video(fitted, *target), prepare_video(frames, *target))
    assert torch.equal(prepare_image(fitted[0], *target), prepare_image(frames[0], *target))
    assert np.array_equal(cover_crop(fitted[1], *target), fitted[1])  # at its own size: unchanged


def test_the_size_is_asked_once_from_the_first_frame():
    asked = []
    fit = FrameFit(lambda h, w: asked.append((h, w)) or (32, 48))
    with pytest.raises(RuntimeError, match="no frame fitted yet"):
        _ = fit.aspect
    for f in _noise(3, 60, 80):
        assert fit(f).shape == (32, 48, 3)
    assert asked == [(60, 80)]


def test_read_frames_with_a_fit_holds_output_sized_frames(tmp_path):
    """Peak traced memory reading 24 of 40 frames with a fit is a few source frames, not the 24 picks at source size;
    the frames are the unfitted read's, fitted."""
    h, w, target = 288, 512, (64, 112)
    path = write_mp4(tmp_path / "big.mp4", _noise(40, h // 8, w // 8).repeat(8, 1).repeat(8, 2), fps=16)
    index = np.arange(0, 40, 40 / 24).astype(int)
    whole = read_frames(path, index)
    tracemalloc.start()
    try:
        got = read_frames(path, index, fit=FrameFit(lambda *_: target))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(got, np.stack([cover_crop(f, *target) for f in whole]))
    frame = h * w * 3
    assert peak < 6 * frame, f"peak {peak / frame:.1f} source frames"  # without the fit: the 24 picks at least


def _tokens_equal(a, b):
    assert a.frames == b.frames and len(a.bits) == len(b.bits)
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))
    assert torch.equal(a.summed_codes, b.summed_codes)


def test_cli_video_continuation_encodes_as_the_unfitted_frames(tiny_models, tmp_path, single_thread):
    """`generate --video` fits a 4:3 video's frames as it reads them; its tokens are the official V2V encode of the
    frames at their own size."""
    from infinitystar import cli
    from infinitystar import pipeline as P
    from infinitystar.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(tiny_models["vae"])

    class Session:
        def tokenizer(self):
            return tokenizer

    path = write_mp4(tmp_path / "in.mp4", _noise(90, 15, 20, seed=1).repeat(8, 1).repeat(8, 2), fps=16)  # 120x160
    schedule = P.resolve_schedule("0.06M", "16:9", 10)
    got = cli._encode_video_file(Session(), str(path), schedule, 5)
    frames, _ = read_video_clip(path, 81, 5)
    _tokens_equal(got, P.encode_video(tokenizer, frames, schedule, seed=5, clips=1))
    short = P.build_schedule("0.06M", "16:9", 161, num_scales=3)  # a pyramid cut short: the encode's size all the same
    assert P.encode_size(short) == P.encode_size(schedule) == (schedule.height, schedule.width) != \
        (short.height, short.width)


def test_interact_start_fit_starts_the_story_of_the_unfitted_frames(tiny_models, tmp_path, single_thread):
    from infinitystar import interact as I
    from infinitystar.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(tiny_models["vae"])
    frames = _noise(81, 160, 120, seed=2)  # portrait 3:4: the nearest template is chosen from the source's aspect
    for aspect in (None, "16:9"):
        fit = I.start_fit("0.06M", aspect)
        fitted = np.stack([fit(f) for f in frames])
        got = I.start(tokenizer, fitted, pn="0.06M", aspect=aspect or fit.aspect, seed=4)
        expect = I.start(tokenizer, frames, pn="0.06M", aspect=aspect, seed=4)
        assert (got.pn, got.h_div_w) == (expect.pn, expect.h_div_w)
        assert torch.equal(got.summed_codes, expect.summed_codes)


def test_fit_video_views_fitted_frames_and_the_tokenizer_encodes_uint8_as_float(tiny_models, single_thread):
    """Frames already at the output size reach the tokenizer as a uint8 view (no float32 copy of the whole video,
    4x its size); each encoder chunk turned to [-1, 1] gives the posterior of the float frames bit for bit."""
    from infinitystar.checkpoint import load_tokenizer
    from infinitystar.vae import fit_video

    frames = _noise(17, 32, 48, seed=3)  # 17 frames: an 8-frame chunk plan with a remainder
    pixels = fit_video(frames, 32, 48)
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, 3, 17, 32, 48)
    assert pixels.untyped_storage().data_ptr() == frames.ctypes.data  # a view
    floats = prepare_video(frames, 32, 48)
    assert floats.is_contiguous() and torch.equal(floats, (pixels.float() / 255) * 2 - 1)
    tokenizer = load_tokenizer(tiny_models["vae"])
    layouts = []
    hook = tokenizer.encoder.register_forward_pre_hook(lambda _m, args: layouts.append(args[0].is_contiguous()))
    try:
        for got, expect in zip(tokenizer.encode_posterior(pixels), tokenizer.encode_posterior(floats)):
            assert torch.equal(got, expect)
    finally:
        hook.remove()
    chunks = len(layouts) // 2  # the uint8 pass's chunks reach the encoder as NCDHW (a float chunk on a GPU does)
    assert chunks >= 2 and layouts[:chunks] == [True] * chunks
    assert fit_video(frames[:, :30], 32, 48).shape == (1, 3, 17, 32, 48)  # other sizes are fitted (copied)
    with pytest.raises(ValueError, match="expected uint8 video frames"):
        fit_video(frames[:0], 32, 48)
    for flipped in (frames[..., ::-1], frames[:, ::-1], frames[::-1]):  # BGR -> RGB views, np.flip: copied
        assert torch.equal(fit_video(flipped, 32, 48), fit_video(np.ascontiguousarray(flipped), 32, 48))


def test_encodes_hand_the_tokenizer_uint8_pixels(tiny_models, monkeypatch):
    """V2V and interact starts give the tokenizer uint8 pixels, a quarter of float32 (a minute at 720p: 2.6 GB)."""
    from infinitystar import interact as I
    from infinitystar import pipeline as P
    from infinitystar.checkpoint import load_tokenizer

    class Handed(Exception):
        pass

    def encode_latent(pixels, **_):
        raise Handed(pixels.dtype, tuple(pixels.shape))

    tokenizer = load_tokenizer(tiny_models["vae"])
    monkeypatch.setattr(tokenizer, "encode_latent", encode_latent)
    frames = _noise(81, 192, 336)
    with pytest.raises(Handed) as v2v:
        P.encode_video(tokenizer, frames, P.resolve_schedule("0.06M", "16:9", 10), clips=1)
    with pytest.raises(Handed) as story:
        I.start(tokenizer, frames, pn="0.06M")
    assert v2v.value.args == story.value.args == (torch.uint8, (1, 3, 81, 192, 336))


def test_encode_host_memory_covers_the_frames_and_the_latents_an_encode_holds(tiny_models, single_thread):
    """The estimate a node checks against free RAM before reading a long video: at least the 8-bit frames handed
    to the tokenizer and four tensors of the latent's size (mean, log-variance, noise, latent)."""
    from infinitystar import pipeline as P
    from infinitystar.checkpoint import load_tokenizer
    from infinitystar.vae import fit_video

    tokenizer = load_tokenizer(tiny_models["vae"])
    frames = _noise(17, 48, 80, seed=5)
    pixels = fit_video(frames, 48, 80)
    latent = tokenizer.encode_latent(pixels, generator=torch.Generator().manual_seed(0))
    estimate = P.encode_host_memory(17, 48, 80)
    assert estimate >= pixels.nelement() * pixels.element_size() + 4 * latent.nelement() * 4
    assert estimate < 2 * (pixels.nelement() + 4 * latent.nelement() * 4)  # not a guess far above it
    frames_of_a_minute = 961 * 720 * 1280 * 3  # at 720p: the README's 220 MB per 5 s clip
    assert frames_of_a_minute < P.encode_host_memory(961, 720, 1280) < 1.5 * frames_of_a_minute
