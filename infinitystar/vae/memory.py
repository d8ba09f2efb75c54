"""Peak activation-memory estimates of the tokenizer's chunked encode and decode.

The estimate walks the stage shapes of one chunk (channels x frames x height x width), takes the
largest feature map times a live factor (how many maps of that size are alive at once inside a
resnet / DC block: input, norm, conditioned norm, conv output, shortcut), adds the conv caches and
the output kept across chunks. Weights are not included (the host accounts for them).
The factors were calibrated with torch.profiler (benchmarks/vae_memory.py) on channel widths 8 to
the released 96..384: the estimates come out 1.1x to 1.5x above the measured peaks.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .chunking import plan_decode_chunks, plan_encode_chunks
from .config import VaeConfig

DECODE_LIVE_FACTOR = 4.5
ENCODE_LIVE_FACTOR = 7.0


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _decoder_chunk(cfg: VaeConfig, latents: int, h: int, w: int, first: bool) -> tuple[int, int]:
    """(largest feature map, conv-cache elements) of the decoder on one chunk; h, w at the decoder input."""
    rev = list(reversed(cfg.block_out_channels))
    n = cfg.num_down_blocks
    t = latents
    largest = rev[0] * t * h * w
    cache = 2 * cfg.latent_channels * h * w + 2 * rev[0] * h * w * (1 + 2 * 2)  # conv_in + mid resnets
    for i in range(n):
        resnets = cfg.layers_per_block + 1
        largest = max(largest, rev[i] * t * h * w)
        cache += 2 * rev[i] * h * w * 2 * resnets
        idx_t = i - (n - len(cfg.temporal_compression_list))
        idx_s = i - (n - len(cfg.spatial_compression_list))
        if idx_t < 0 and idx_s < 0:
            continue
        pt = cfg.temporal_compression_list[-idx_t] if idx_t >= 0 else 1
        largest = max(largest, rev[i + 1] * 4 * pt * t * h * w)
        cache += 2 * rev[i] * h * w
        t = t * pt - (1 if (pt > 1 and (first or t % 2)) else 0)
        h, w = 2 * h, 2 * w
    largest = max(largest, rev[-1] * t * h * w)
    cache += 2 * rev[-1] * h * w
    return largest, cache


def estimate_decode_memory(config: VaeConfig, latent_shape: Sequence[int], chunk_latents: int | None,
                           dtype: torch.dtype = torch.float32, tile: Sequence[int] | None = None, *,
                           video_on_device: bool = True, images: bool = False) -> int:
    """Bytes of activations to decode summed codes of ``latent_shape`` (B, 64, T, h, w) in chunks.

    ``chunk_latents`` as in ``VideoTokenizer.decode`` (None = official plan); ``tile`` (th, tw) in
    latent cells for tiled decoding (the video's blend sums, fp32, on the device unless the images leave it; they
    become the output in place). The decoded video is included; the weights are not. ``video_on_device=False``:
    the decode moves each chunk's images off the device (``VideoTokenizer.decode(images_to=...)``), so only one
    chunk's output and its fp32 images count (tiled: one tile's chunk, blended on the host); ``images`` with the video
    on the device: the decode keeps fp32 images there (``images_to`` the decoding device itself).
    """
    b, _, t, h, w = (int(s) for s in latent_shape)
    p, size = config.patch_size, _itemsize(dtype)
    th, tw = (h, w) if tile is None else (min(h, int(tile[0])), min(w, int(tile[1])))
    plan = plan_decode_chunks(t, chunk_latents)
    chunk_peak = 0
    for i, (s, e) in enumerate(plan[:2]):  # later chunks repeat the second one
        largest, cache = _decoder_chunk(config, e - s, th * p, tw * p, i == 0)
        chunk_peak = max(chunk_peak, DECODE_LIVE_FACTOR * largest + cache)
    pixels = config.out_channels * h * config.spatial_factor * w * config.spatial_factor
    video = pixels * config.pixel_frames(t)
    chunk = pixels * max(config.pixel_frames(e) - (config.pixel_frames(s) if s else 0) for s, e in plan)
    fp32 = 4 / size  # elements of ``dtype`` in one fp32 element
    post = 2 * chunk * fp32  # at the peak of one chunk's post-processing, two fp32 copies of it
    if tile is None:
        kept = 2 * video * (fp32 if images else 1)  # the output, filled chunk by chunk: a bound with room to spare
        output = (kept if video_on_device else 0) + (chunk + post if images or not video_on_device else 0)
    elif video_on_device:  # the fp32 blend sums (which become the frames or images in place), a weighted chunk
        output = video * fp32 + post
    else:  # sums and images on the host: a tile's chunk on its way there, in fp32 and weighted
        output = 2 * fp32 * config.out_channels * th * tw * config.spatial_factor ** 2 * (chunk // pixels)
    return int(b * (chunk_peak + output) * size)


def estimate_encode_memory(config: VaeConfig, frames_shape: Sequence[int], dtype: torch.dtype = torch.float32) -> int:
    """Bytes of activations to encode frames of ``frames_shape`` (B, 3, T, H, W); input and posterior included."""
    b, c, t, hh, ww = (int(s) for s in frames_shape)
    ch = config.block_out_channels
    plan = plan_encode_chunks(t, config.encode_chunk_frames)
    f = max(e - s for s, e in plan)
    h, w = hh, ww
    largest = max(c, ch[0]) * f * h * w
    cache = 2 * c * h * w
    for i in range(config.num_down_blocks):
        largest = max(largest, ch[i] * f * h * w)
        cache += 2 * ch[i] * h * w * 2 * config.layers_per_block
        if i < max(len(config.spatial_compression_list), len(config.temporal_compression_list)):
            cache += 2 * ch[i] * h * w
            pt = config.temporal_compression_list[i] if i < len(config.temporal_compression_list) else 1
            f = (f + 1) // 2 if pt > 1 else f
            h, w = h // 2, w // 2
    cache += 2 * ch[-1] * h * w * (2 * 2 + 1)
    inputs = c * t * hh * ww
    posterior = 2 * 2 * config.embed_dim * config.latent_frames(t) * (hh // config.spatial_factor) * (ww // config.spatial_factor)
    return int(b * (ENCODE_LIVE_FACTOR * largest + cache + inputs + posterior) * _itemsize(dtype))


def choose_decode_chunk(config: VaeConfig, latent_shape: Sequence[int], dtype: torch.dtype, budget: int,
                        tile: int | Sequence[int] | None = None, *, video_on_device: bool = True,
                        images: bool = False) -> int:
    """Largest chunk of latent frames whose estimate fits ``budget`` bytes (at least 2, the smallest exact chunk)."""
    t = int(latent_shape[2])
    if isinstance(tile, int):
        tile = (tile, tile)
    best = 2
    for c in [*range(2, t, 2), t]:  # later chunks are even anyway
        if estimate_decode_memory(config, latent_shape, c, dtype, tile, video_on_device=video_on_device,
                                  images=images) <= budget:
            best = c
        else:
            break
    return best
