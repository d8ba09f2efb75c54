"""4D rotary position embedding of the official model (spec §2.3); parity-tested via the golden logits.

head_dim/2 rotation pairs are split axis-major into 4 axes x F frequencies (F = head_dim/8), in the
order [scale step, frame, height, width]. Pair i rotates dims (2i, 2i+1). Text tokens sit on the
scale axis at 0..L-1; a visual step sits at ``text_maxlen + real_sid`` with its clip's frames and
h/w positions normalized to the final scale's grid.
"""
from __future__ import annotations

import torch

AXES = 4


def inv_freq(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """(F,) fp32 inverse frequencies, shared by the four axes."""
    num = head_dim // (2 * AXES)
    # parity: fp32 power of the base, as the official table builder
    return 1.0 / (base ** (torch.arange(num, dtype=torch.int64).float() / num))


def _angles(pos: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    return torch.outer(pos.float(), freqs)  # [P, F] fp32


def normalized_positions(p: int, p_final: int) -> torch.Tensor:
    """Row (or column) indices of a p-cell axis on the final p_final grid.

    parity: float32 ``arange(p) * (p_final / p)`` then round-half-to-even, spec §2.3.
    """
    return (torch.arange(p) * (p_final / p)).round().long()


def text_rope(length: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (L, head_dim/2) fp32, for L text tokens: scale axis 0..L-1, others 0."""
    f = inv_freq(head_dim, base)
    scale = _angles(torch.arange(length), f)
    zero = torch.zeros(length, 3 * f.numel())  # angle 0 on frame/height/width
    ang = torch.cat([scale, zero], dim=-1)
    return ang.cos(), ang.sin()


def visual_rope(scale_pos: int, frame_ss: int, frame_ee: int, h: int, w: int, h_final: int, w_final: int,
                head_dim: int, base: float = 10000.0, *, frames=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (t*h*w, head_dim/2) fp32, tokens row-major over (t, h, w).

    ``frames`` (a list of frame positions) replaces the range [frame_ss, frame_ee): the interact model's detail
    condition sits at frames 0, 19, 20.
    """
    f = inv_freq(head_dim, base)
    F = f.numel()
    frame_pos = torch.arange(frame_ss, frame_ee) if frames is None else torch.tensor(list(frames), dtype=torch.int64)
    t = frame_pos.numel()
    tables = []
    for ang in (_angles(torch.tensor([scale_pos]), f),
                _angles(frame_pos, f),
                _angles(normalized_positions(h, h_final), f),
                _angles(normalized_positions(w, w_final), f)):
        tables.append(torch.stack([ang.cos(), ang.sin()]))  # [2, P, F]
    s, fr, hh, ww = tables
    grid = torch.cat([
        s[:, :, None, None, :].expand(2, t, h, w, F),
        fr[:, :, None, None, :].expand(2, t, h, w, F),
        hh[:, None, :, None, :].expand(2, t, h, w, F),
        ww[:, None, None, :, :].expand(2, t, h, w, F),
    ], dim=-1).reshape(2, t * h * w, 4 * F)
    return grid[0], grid[1]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, N, L, D) by tables (L, D/2); result in x's dtype, contiguous.

    parity: products with the fp32 tables, each partial result stored back in x's dtype, in the
    official order (x0*cos first, then minus x1*sin), spec §2.3 "Numerics".
    Why ``out=``: an op whose output is in x's dtype computes in fp32 and rounds once on store, as the
    official in-place steps do, so each half is three kernels writing straight into the interleaved result:
    half the memory traffic of cast-after-op and a final stack (RoPE runs on every query and key of every layer).
    """
    dtype = x.dtype
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.to(x.device), sin.to(x.device)
    if _is_compiling() or (torch.is_grad_enabled() and x.requires_grad):
        # the same steps composed: out= is not differentiable, and torch.compile fuses them itself (its tracer
        # refuses out= into the strided halves)
        y0 = ((x0 * cos).to(dtype) - x1 * sin).to(dtype)
        y1 = ((x1 * cos).to(dtype) + x0 * sin).to(dtype)
        return torch.stack([y0, y1], dim=-1).reshape(x.shape)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    rotated = out.view(pairs.shape)
    first = torch.mul(x0, cos, out=torch.empty(x0.shape, dtype=dtype, device=x.device))  # rounded to x's dtype
    cross = torch.mul(x1, sin)  # fp32, not rounded (the official code keeps it in an fp32 temporary)
    torch.sub(first, cross, out=rotated[..., 0])
    torch.mul(x1, cos, out=first)
    torch.add(first, torch.mul(x0, sin, out=cross), out=rotated[..., 1])
    return out


_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)  # torch < 2.3
