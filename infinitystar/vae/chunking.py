"""Temporal chunking (exact, with conv caches) and spatial tiling (approximate) of the tokenizer.

Why chunked decoding is exact: every temporal operation of the decoder either looks back at most
two frames (causal convs, continued by the cache) or treats the *first frame of the video* apart
(odd-T rules in the DC up blocks and the spatial-norm resize). A chunk plan reproduces a one-shot
decode when only the first chunk carries that first frame (decoded with ``split_first`` so an even
first chunk still merges it), and every later chunk has an even number of latents. The official
plan is the case of pairs: first chunk 3 latents (1 if T = 1, 4 if T is even), then 2, 2, ...
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .blocks import ConvCache
from .codec import to_signed_unit

Callback = Callable[[int, int], None] | None


def plan_encode_chunks(frames: int, chunk: int) -> list[tuple[int, int]]:
    """Official encoder frame chunks: size ``chunk``, the first absorbing the remainder (spec §3.2)."""
    n = max(frames // chunk, 1)
    rem = frames % chunk if frames >= chunk else 0
    if frames < chunk:
        return [(0, frames)]
    bounds = [(0, chunk + rem)]
    bounds += [(chunk * i + rem, chunk * (i + 1) + rem) for i in range(1, n)]
    return bounds


def encode_chunks(encoder: nn.Module, x: torch.Tensor, chunk: int, callback: Callback = None, *,
                  device: torch.device | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Run the encoder over the official frame chunks with one conv cache; concatenate along T.

    Each chunk is moved to ``device`` / cast to ``dtype`` on its own, so the frames can stay in system memory:
    a long video's pixels (10 GB in fp32 for a minute at 720p) never sit on the GPU at once. uint8 pixels
    (``codec.fit_video``, a quarter of that) are turned to [-1, 1] a chunk at a time, on the CPU as the official
    transform does."""
    plan = plan_encode_chunks(x.shape[2], chunk)
    cache: ConvCache = {}
    out = []
    for i, (s, e) in enumerate(plan):
        part = x[:, :, s:e]
        if part.dtype == torch.uint8:  # contiguous (NCDHW), as a chunk of float frames reaches the device
            part = to_signed_unit(part).contiguous()
        out.append(encoder(part.to(device=device or x.device, dtype=dtype or part.dtype), cache))
        if callback is not None:
            callback(i + 1, len(plan))
    return torch.cat(out, dim=2) if len(out) > 1 else out[0]


def plan_decode_chunks(latents: int, chunk_latents: int | None = None) -> list[tuple[int, int]]:
    """Latent-frame chunks for an exact chunked decode.

    ``None``: the official plan (3, 2, 2, ...; 1 for T = 1; 4, 2, ... for even T; 2 for T = 2).
    An integer c: later chunks of c' = max(2, c rounded down to even) latents and a first chunk of
    1..c' latents with the parity of T, so no chunk exceeds max(c, 2).
    """
    if latents < 1:
        raise ValueError(f"need at least one latent frame, got {latents}")
    if chunk_latents is None:
        step = 2
        first = 1 if latents == 1 else (3 if latents % 2 else 4)
        first = min(first, latents)
    else:
        if chunk_latents < 1:
            raise ValueError(f"chunk_latents must be >= 1, got {chunk_latents}")
        if chunk_latents >= latents:
            return [(0, latents)]
        step = max(2, chunk_latents - chunk_latents % 2)
        first = (latents - 1) % step + 1
    bounds = [(0, first)]
    s = first
    while s < latents:
        bounds.append((s, s + step))
        s += step
    return bounds


def decode_chunked(decoder: nn.Module, z: torch.Tensor, plan: list[tuple[int, int]],
                   callback: Callback = None, keep: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   frames: int | None = None, first_frame: int = 0) -> torch.Tensor:
    """Decode (B, 16, T, h, w) chunk by chunk with one conv cache; returns (B, 3, 1+4(T-1) - first_frame, 8h, 8w).

    ``keep`` maps each chunk's output to what is kept, frames first, concatenated along dim 0 instead (e.g. images
    moved off the device, so that the whole video never sits on it). ``frames``: the frames the whole video
    decodes to (``VaeConfig.pixel_frames``); given, the output is filled chunk by chunk, so the chunks and their
    concatenation are never held at once (twice the video). ``first_frame``: the frames before it are decoded (the
    causal decoder reads them) but neither kept nor returned, so the newest clip of a long video costs its own
    memory, not the video's.
    """
    if first_frame and frames is None:
        raise ValueError("first_frame needs the video's frame count (frames)")
    cache: ConvCache = {}
    dim = 2 if keep is None else 0
    wanted = None if frames is None else frames - first_frame
    after = f" after frame {first_frame}" if first_frame else ""

    def miscount(gave) -> RuntimeError:
        return RuntimeError(f"the decoder gave {gave} frames{after} for {z.shape[2]} latent frames; {wanted} were "
                            "expected")

    parts, out, at, decoded = [], None, 0, 0  # out: filled when ``frames`` is given; at: its frames written
    for i, (s, e) in enumerate(plan):
        pix = decoder(z[:, :, s:e], cache, split_first=(i == 0))
        skip, decoded = max(0, first_frame - decoded), decoded + pix.shape[2]
        if skip < pix.shape[2]:  # a view of the kept frames would hold the skipped ones: kept, or copied
            part = pix if not skip else pix[:, :, skip:] if keep else pix[:, :, skip:].clone()
            part = part if keep is None else keep(part)
            del pix
            n = part.shape[dim]
            if wanted is None:
                parts.append(part)
            elif out is None and n == wanted:  # one chunk of the whole length: returned as it is
                out, at = part, n
            else:
                if at + n > wanted:
                    raise miscount(f"at least {at + n}")
                if out is None:
                    out = part.new_empty((*part.shape[:dim], wanted, *part.shape[dim + 1:]))
                out.narrow(dim, at, n).copy_(part)
                at += n
            del part  # not held through the next chunk's decode
        else:
            del pix
        if callback is not None:
            callback(i + 1, len(plan))
    if wanted is None:
        return torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]
    if at != wanted:
        raise miscount(at)
    return out


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def _ramp(length: int, lo_blend: int, hi_blend: int, device) -> torch.Tensor:
    """Weights 1 inside, rising linearly over ``lo_blend`` px at the start and falling over ``hi_blend`` at the end."""
    w = torch.ones(length, device=device)
    if lo_blend > 0:
        w[:lo_blend] = torch.arange(1, lo_blend + 1, device=device) / (lo_blend + 1)
    if hi_blend > 0:
        w[length - hi_blend:] = torch.arange(hi_blend, 0, -1, device=device) / (hi_blend + 1)
    return w


def decode_tiled(decoder: nn.Module, z: torch.Tensor, plan: list[tuple[int, int]],
                 tile: int | tuple[int, int], overlap: int | tuple[int, int], patch: int, frames: int, *,
                 callback: Callback = None, images_to: torch.device | str | None = None,
                 sums_on: torch.device | str | None = None, first_frame: int = 0) -> torch.Tensor:
    """Approximate decode of overlapping spatial tiles, linearly blended in the overlaps.

    ``tile`` and ``overlap`` are in cells of the 64-channel latent grid (16 px each); each tile is
    decoded exactly in time (chunks + its own conv cache). The decoder's receptive field crosses
    tile borders, so results differ from a full decode near the seams. Each chunk of a tile is added into one fp32
    buffer of the whole video (``frames`` long) as soon as it is decoded, so no tile's whole video sits beside it,
    and the buffer becomes the output in place: (B, 3, frames, H, W), or with ``images_to`` (one video) its images
    (frames, H, W, 3) in [0, 1], the values of ``codec.images_on``, the buffer laid out that way from the start.
    So the decode holds one video's worth, not the sums and their result. ``sums_on``: where the buffer lives (the
    decoding device when None); on the host, where the images go anyway, the device's share stays flat however
    long the video. ``first_frame`` as in ``decode_chunked``: the buffer holds only the frames from it on.
    """
    (th, tw), (oh, ow) = _pair(tile), _pair(overlap)
    th, tw, oh, ow = th * patch, tw * patch, oh * patch, ow * patch  # decoder input is unpatchified
    b, _, _, h, w = z.shape
    if images_to is not None and b != 1:
        raise ValueError(f"images_to decodes one video (1, 16, T, h, w), got {tuple(z.shape)}")
    ys, xs = _tile_starts(h, th, oh), _tile_starts(w, tw, ow)
    kept = frames - first_frame
    buffer = sums = weight = None  # sums: (B, 3, kept, H, W), a view of the buffer
    total, done = len(ys) * len(xs) * len(plan), 0
    for y0 in ys:
        for x0 in xs:
            cache: ConvCache = {}
            at = 0  # this tile's first frame of the chunk
            for i, (s, e) in enumerate(plan):
                part = z[:, :, s:e, y0:y0 + th, x0:x0 + tw]
                pix = decoder(part, cache, split_first=(i == 0))
                if i == 0:  # this tile's place and blend weights
                    up = pix.shape[-1] // part.shape[-1]
                    ph, pw = pix.shape[-2:]
                    py, px = y0 * up, x0 * up
                    wy = _ramp(ph, (oh * up) if y0 > 0 else 0, (oh * up) if y0 + th < h else 0, pix.device)
                    wx = _ramp(pw, (ow * up) if x0 > 0 else 0, (ow * up) if x0 + tw < w else 0, pix.device)
                    wmap = (wy[:, None] * wx[None, :])[None, None, None]
                    home = pix.device if sums_on is None else torch.device(sums_on)
                    if buffer is None:
                        c, size = pix.shape[1], (h * up, w * up)
                        weight = torch.zeros(1, 1, 1, *size, dtype=torch.float32, device=home)
                        if images_to is None:
                            buffer = sums = torch.zeros(b, c, kept, *size, dtype=torch.float32, device=home)
                        else:  # channels last: the images' layout
                            buffer = torch.zeros(kept, *size, c, dtype=torch.float32, device=home)
                            sums = buffer.permute(3, 0, 1, 2)[None]
                    weight[..., py:py + ph, px:px + pw] += wmap.to(home)
                n = pix.shape[2]
                if at + n > frames:
                    raise RuntimeError(f"the decoder gave at least {at + n} frames for {z.shape[2]} latent frames; "
                                       f"{frames} were expected")
                skip = max(0, first_frame - at)
                if skip < n:  # the frames before first_frame only feed the conv cache
                    sums[:, :, at + skip - first_frame:at + n - first_frame, py:py + ph, px:px + pw] += (
                        pix[:, :, skip:].float() * wmap).to(home)
                at += n
                del pix
                done += 1
                if callback is not None:
                    callback(done, total)
            if at != frames:
                raise RuntimeError(f"the decoder gave {at} frames for {z.shape[2]} latent frames; {frames} were "
                                   "expected")
    sums.div_(weight)
    if images_to is None:
        return buffer
    return buffer.add_(1).div_(2).clamp_(0, 1).to(images_to)  # codec.images_on's ((x + 1) / 2).clamp(0, 1)
