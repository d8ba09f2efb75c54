"""Bitwise spherical quantization (BSQ) arithmetic shared by the sampler and the tokenizer encoder.

Reimplements the official multi-scale BSQ helpers (spec §3.3, §5.3): bits <-> codes, the
64 <-> 16 channel resampling (which the official code does by running ``F.interpolate`` over
(C, H, W) with T treated as channels), area down-sizing and trilinear up-sizing of the
per-clip accumulators. Parity-tested against the golden cases.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

LATENT_CHANNELS = 64  # channels of the accumulated codes / tokenizer latent (patchified 16 x 4)


def bits_to_codes(bits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bits (B, t, h, w, d) in {0,1} -> codes (B, d, t, h, w) = (2*bit - 1) / sqrt(d).

    Exact in floating point: d is 16 or 64, so the l2 norm of a +-1 vector is a power of two.
    Returned as a permuted view of (B, t, h, w, d) memory, as the official ``indices_to_codes``
    does: for t > 1 that layout makes :func:`resample` hit the channels-last trilinear kernel,
    whose rounding differs from the contiguous one (bit parity of the video accumulators).
    """
    d = bits.shape[-1]
    codes = bits.to(dtype) * 2 - 1
    codes = codes * (1.0 / math.sqrt(d))
    return codes.permute(0, 4, 1, 2, 3)  # [B, d, t, h, w] view, d innermost in memory


def codes_to_bits(codes: torch.Tensor) -> torch.Tensor:
    """Quantize (B, d, t, h, w) -> bits (B, t, h, w, d) uint8: sign, with exactly 0 -> bit 0."""
    return (codes > 0).permute(0, 2, 3, 4, 1).to(torch.uint8).contiguous()


def _same_time(x: torch.Tensor, size: Sequence[int]) -> tuple[int, int, int]:
    """``size`` (t, h, w) or (h, w) as (T, h, w) of x (B, C, T, H, W): resampling never changes T."""
    size = tuple(int(s) for s in size)
    if len(size) == 3 and size[0] != x.shape[2]:
        raise ValueError(f"resample keeps T: got T={x.shape[2]}, asked for t={size[0]}")
    return (x.shape[2], *size[-2:])


def resample(x: torch.Tensor, channels: int, size: Sequence[int], mode: str) -> torch.Tensor:
    """Resample (B, C, T, H, W) to (B, channels, T, h, w) as the official ``interpolate``.

    ``size`` is (t, h, w) or (h, w); t must equal T (the official helper never resamples time:
    it treats T as the batch of channels of a 3D interpolation over (C, H, W)).
    mode 'area' (adaptive average pooling; down-sizing) or 'trilinear' (align_corners=False).
    """
    _, h, w = _same_time(x, size)
    if x.shape[1] == channels and tuple(x.shape[-2:]) == (h, w):
        return x
    y = x.permute(0, 2, 1, 3, 4)  # [B, T, C, H, W]
    if mode == "area":
        y = F.adaptive_avg_pool3d(y, (channels, h, w))
    elif mode == "trilinear":
        y = F.interpolate(y, size=(channels, h, w), mode="trilinear", align_corners=False)
    else:
        raise ValueError(f"unknown resample mode {mode!r}; expected 'area' or 'trilinear'")
    return y.permute(0, 2, 1, 3, 4).contiguous()  # [B, C', T, h, w]


def upsample_codes(codes: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Codes (B, d, t, h, w) -> (B, 64, t, H, W): trilinear over channels and space."""
    return resample(codes, LATENT_CHANNELS, size, "trilinear")


def downsample_accumulator(acc: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Accumulator (B, 64, T, H, W) -> (B, 64, T, h, w) by area: the next step's input codes.

    The official loop calls ``F.interpolate(summed, size=(t, h, w), mode="area")`` on the 5D accumulator
    itself (not its ``interpolate`` helper); the same call here keeps the rounding equal to it (the pooling
    kernels of other layouts sum in another order).
    """
    size = _same_time(acc, size)
    if tuple(acc.shape[2:]) == size:
        return acc
    return F.interpolate(acc, size=size, mode="area")


def accumulate(acc: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Add the codes of one step's bits (B, t, h, w, d) to a clip accumulator (B, 64, T, H, W).

    The codes are made and resampled in fp32 (the official ``indices_to_codes``) whatever the accumulator
    holds (fp32 in the sampler, also in bf16 runs; see ``sampler._Runner.accumulator``); a half-precision one
    gets the sum rounded once, as an in-place ``+=`` does.
    """
    codes = bits_to_codes(bits, dtype=torch.float32)
    return torch.add(acc, upsample_codes(codes, acc.shape[2:])).to(acc.dtype)


def quantize_residual(residual: torch.Tensor, d: int, size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One encoder-side BSQ step: residual (B, 64, T, H, W) -> (bits (B,t,h,w,d), codes at full size).

    The residual is area-resampled to (d, t, h, w), quantized by sign (l2 normalisation does not
    change the sign), and the codes are trilinear-resampled back to the residual's size.
    """
    small = resample(residual, d, size, "area")
    bits = codes_to_bits(small)
    return bits, upsample_codes(bits_to_codes(bits, dtype=residual.dtype), residual.shape[2:])
