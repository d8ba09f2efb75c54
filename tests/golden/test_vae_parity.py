"""Golden: the video tokenizer against the official code (shared/golden/README.md, "What to compare").

Encode side (kinds vae, i2v, v2v): posterior, latent with the stored noise, BSQ bits of the
recorded latent. Decode side (every kind): the stored summed codes decoded once per case, compared
as raw floats, uint8 frames (BGR in the files) and per-frame means. Full-size keys on ``meta``.
"""
import json
import types
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from golden_cases import cases, checkpoint_keys_dir, load_manifest

from infinitystar.pipeline import decode
from infinitystar.vae import (
    VAE_PRESETS,
    VideoTokenizer,
    detect_vae_config,
    encode_bits,
    fit_video,
    frames_to_uint8,
    load_vae_state_dict,
    prepare_image,
    prepare_video,
)

pytestmark = pytest.mark.golden

ENCODE_KINDS = ("vae", "i2v", "v2v")
DECODE_KINDS = ("t2v", "t2i", "i2v", "v2v", "vae")


@lru_cache(maxsize=2)
def _tokenizer(case_dir: Path) -> VideoTokenizer:
    sd = torch.load(case_dir / "vae.pth", weights_only=True, map_location="cpu")["vae"]
    cfg = detect_vae_config(sd)
    assert list(cfg.block_out_channels) == list(load_manifest(case_dir)["vae"]["block_out_channels"])
    model = VideoTokenizer(cfg).eval()
    load_vae_state_dict(model, sd, source=str(case_dir / "vae.pth"))
    return model


def _npz(case_dir: Path, name: str) -> dict:
    with np.load(case_dir / name) as z:
        return {k: z[k] for k in z.files}


def _pixels_in(case_dir: Path) -> torch.Tensor:
    inputs = _npz(case_dir, "inputs.npz")
    for key in ("image_prepared", "video_prepared"):
        if key in inputs:
            return torch.from_numpy(inputs[key])
    x = torch.from_numpy(inputs["video_rgb_u8"]).float() / 255  # kind vae: documented as x + x - 1
    return (x + x - 1).permute(3, 0, 1, 2)[None]


@lru_cache(maxsize=None)
def _posterior(case_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return _tokenizer(case_dir).encode_posterior(_pixels_in(case_dir))


@lru_cache(maxsize=None)
def _decoded(case_dir: Path) -> torch.Tensor:
    codes = torch.from_numpy(_npz(case_dir, "outputs.npz")["summed_codes"])
    return _tokenizer(case_dir).decode(codes)


def _steps(manifest: dict) -> list:
    sched = manifest["schedule"]
    ref = sched["reference_scales"]
    out = []
    for s in sched["steps"]:
        r = ref[str(s["si"])]
        out.append(types.SimpleNamespace(index=s["step"], si=s["si"], rep=s["rep"], clip=s["clip"], t=s["t"],
                                         h=s["h"], w=s["w"], d=s["d"], frame_ss=r["frame_ss"], frame_ee=r["frame_ee"]))
    return out


@pytest.mark.parametrize("case_dir", cases(*ENCODE_KINDS))
def test_prepare_matches_official_transform(case_dir):
    inputs = _npz(case_dir, "inputs.npz")
    if "image_rgb_u8" in inputs:
        ref = torch.from_numpy(inputs["image_prepared"])
        got = prepare_image(inputs["image_rgb_u8"], ref.shape[-2], ref.shape[-1])
    else:
        raw = inputs["video_rgb_u8"]
        ref = torch.from_numpy(inputs["video_prepared"]) if "video_prepared" in inputs else _pixels_in(case_dir)
        if raw.shape[0] != ref.shape[2]:
            pytest.skip(f"stored raw video has {raw.shape[0]} frames, prepared {ref.shape[2]}: frame selection is not the tokenizer's")
        got = prepare_video(raw, ref.shape[-2], ref.shape[-1])
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case_dir", cases(*ENCODE_KINDS))
def test_posterior(case_dir):
    enc = _npz(case_dir, "encode.npz")
    mean, logvar = _posterior(case_dir)
    torch.testing.assert_close(mean, torch.from_numpy(enc["posterior_mean"]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logvar, torch.from_numpy(enc["posterior_logvar"]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case_dir", cases(*ENCODE_KINDS))
def test_posterior_of_uint8_pixels(case_dir):
    """The encodes hand the tokenizer 8-bit pixels (``fit_video``), turned to [-1, 1] chunk by chunk: the official
    posterior all the same."""
    inputs = _npz(case_dir, "inputs.npz")
    if "video_rgb_u8" not in inputs:
        pytest.skip("an image case: images reach the tokenizer as float pixels")
    raw, ref = inputs["video_rgb_u8"], _pixels_in(case_dir)
    if raw.shape[0] != ref.shape[2]:
        pytest.skip(f"stored raw video has {raw.shape[0]} frames, prepared {ref.shape[2]}: frame selection is not the tokenizer's")
    enc = _npz(case_dir, "encode.npz")
    mean, logvar = _tokenizer(case_dir).encode_posterior(fit_video(raw, ref.shape[-2], ref.shape[-1]))
    torch.testing.assert_close(mean, torch.from_numpy(enc["posterior_mean"]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logvar, torch.from_numpy(enc["posterior_logvar"]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case_dir", cases(*ENCODE_KINDS))
def test_latent_with_stored_noise(case_dir):
    enc = _npz(case_dir, "encode.npz")
    mean, logvar = _posterior(case_dir)
    latent = _tokenizer(case_dir).latent_from_posterior(mean, logvar, noise=torch.from_numpy(enc["posterior_noise"]))
    torch.testing.assert_close(latent, torch.from_numpy(enc["latent"]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case_dir", cases(*ENCODE_KINDS))
def test_bsq_bits_of_recorded_latent(case_dir):
    manifest = load_manifest(case_dir)
    enc = _npz(case_dir, "encode.npz")
    n_bits = len([k for k in enc if k.startswith("bits_")])
    steps = _steps(manifest)[:n_bits]
    bits, summed = encode_bits(torch.from_numpy(enc["latent"]), steps)
    assert len(bits) == n_bits
    mismatches = {}
    for j, b in enumerate(bits):
        ref = enc[f"bits_{j:03d}"]
        assert b.shape[1:] == ref.shape, f"step {j}: {tuple(b.shape)} vs {ref.shape}"
        n = int((b[0].numpy() != ref).sum())
        if n:
            mismatches[j] = n
    assert not mismatches, f"bit mismatches per step: {mismatches} (total {sum(mismatches.values())})"
    # The teacher-forced clips of the stored summed codes come from exactly these bits.
    ref_codes = torch.from_numpy(_npz(case_dir, "outputs.npz")["summed_codes"])[:, :, :summed.shape[2]]
    torch.testing.assert_close(summed, ref_codes, rtol=0, atol=1e-5)


def _frames_stored(out, case_dir) -> None:
    if "frame_indices" not in out:
        pytest.skip(f"{case_dir.name} stores no decoded frames (outputs.npz has {sorted(out)})")


@pytest.mark.parametrize("case_dir", cases(*DECODE_KINDS))
def test_decoded_floats(case_dir):
    out = _npz(case_dir, "outputs.npz")
    _frames_stored(out, case_dir)
    dec = _decoded(case_dir)
    key = next((k for k in out if k.startswith("decoded_float_first")), None)
    if key is None:
        pytest.skip(f"{case_dir.name} stores no decoded_float_first* frames (outputs.npz has {sorted(out)})")
    ref = torch.from_numpy(out[key])
    assert dec.shape[2] == out["frame_mean_bgr"].shape[0]
    torch.testing.assert_close(dec[0, :, :ref.shape[1]], ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("case_dir", cases(*DECODE_KINDS))
def test_decoded_uint8_frames(case_dir):
    out = _npz(case_dir, "outputs.npz")
    _frames_stored(out, case_dir)
    dec = _decoded(case_dir)
    is_video = dec.shape[2] > 1
    frames = frames_to_uint8(dec, is_video=is_video).numpy()[..., ::-1].astype(np.int16)  # RGB -> BGR
    sel = frames[out["frame_indices"]]
    diff = np.abs(sel - out["frames_bgr_selected"].astype(np.int16))
    assert diff.max() <= 1, f"max |diff| {diff.max()} at {np.argwhere(diff > 1)[:3].tolist()}"
    first = frames_to_uint8(dec[:, :, :1], is_video=False).numpy()[0, ..., ::-1].astype(np.int16)
    assert np.abs(first - out["frame0_before_overwrite_bgr"].astype(np.int16)).max() <= 1
    means = frames.reshape(frames.shape[0], -1, 3).mean(axis=1)
    np.testing.assert_allclose(means, out["frame_mean_bgr"], rtol=0, atol=1e-3)


@pytest.mark.parametrize("case_dir", cases(*DECODE_KINDS))
def test_pipeline_decode_gives_the_official_output_pixels(case_dir):
    """What the CLI and the nodes decode through (``pipeline.decode``), not the codec helper alone: its frames,
    truncated to uint8, are the official written pixels, frame 0 included (a video's frame 0 := frame 1)."""
    from infinitystar.pipeline import Tokens

    out = _npz(case_dir, "outputs.npz")
    _frames_stored(out, case_dir)
    codes = torch.from_numpy(out["summed_codes"])
    count = out["frame_mean_bgr"].shape[0]
    tokens = Tokens([], codes, "0.06M", codes.shape[-2] / codes.shape[-1], count)
    frames = decode(_tokenizer(case_dir), tokens)
    assert frames.shape[0] == count
    got = (frames * 255).to(torch.uint8).numpy()[..., ::-1].astype(np.int16)  # RGB -> BGR
    diff = np.abs(got[out["frame_indices"]] - out["frames_bgr_selected"].astype(np.int16))
    assert diff.max() <= 1, f"max |diff| {diff.max()} at {np.argwhere(diff > 1)[:3].tolist()}"
    np.testing.assert_allclose(got[0].reshape(-1, 3).mean(axis=0), out["frame_mean_bgr"][0], rtol=0, atol=1e-3)


def test_full_size_keys_on_meta():
    keys_dir = checkpoint_keys_dir()
    if keys_dir is None or not (keys_dir / "vae_full.json").is_file():
        pytest.skip("no checkpoint_keys/vae_full.json under INFINITYSTAR_GOLDEN_DIRS")
    ref = json.loads((keys_dir / "vae_full.json").read_text())
    model = VideoTokenizer(VAE_PRESETS["full"], device="meta")
    sd = model.state_dict()
    assert list(sd) == list(ref["keys"])
    for k, v in ref["keys"].items():
        assert list(sd[k].shape) == v["shape"], k
        assert str(sd[k].dtype).removeprefix("torch.") == v["dtype"], k
    assert len(sd) == ref["num_entries"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]
    assert tuple(ref["block_out_channels"]) == VAE_PRESETS["full"].block_out_channels
