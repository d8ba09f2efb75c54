"""Classifier-free guidance on bit logits: APG as used by the official sampler, and plain CFG
(spec §5.3 step 5). Pure functions; the tensors are (..., tokens, 2d) and every norm runs over
the last two dims, i.e. over the whole step."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GuidanceConfig:
    scale: float = 34.0  # official cfg for both released models
    threshold: float = 0.05  # APG clip of the per-element RMS of (cond - uncond)
    use_apg: bool = True  # False -> plain CFG, which destroys the output at scale 34
    eta: float = 0.0  # weight kept of the component parallel to cond


def apg(cond: torch.Tensor, uncond: torch.Tensor, scale: float = 34.0, threshold: float = 0.05,
        eta: float = 0.0) -> torch.Tensor:
    """Adaptive projected guidance: cond + (scale-1) * (orthogonal part of the clipped difference).

    The projection runs in float64 and is cast back before the update, like the official code.
    """
    diff = cond - uncond
    if threshold > 0:
        n = diff.shape[-1] * diff.shape[-2]
        rms = (1 / math.sqrt(n)) * torch.linalg.vector_norm(diff, dim=(-2, -1), keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(diff), threshold / rms)
    d64, c64 = diff.double(), cond.double()
    unit = c64 / torch.linalg.vector_norm(c64, dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    parallel = (d64 * unit).sum(dim=(-2, -1), keepdim=True) * unit
    orthogonal = (d64 - parallel).to(cond.dtype)
    update = orthogonal + eta * parallel.to(cond.dtype) if eta else orthogonal
    return cond + (scale - 1) * update


def cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain classifier-free guidance: scale*cond + (1-scale)*uncond."""
    return scale * cond + (1 - scale) * uncond


def guide(cond: torch.Tensor, uncond: torch.Tensor, config: GuidanceConfig) -> torch.Tensor:
    if config.scale == 1:
        return cond
    if config.use_apg:
        return apg(cond, uncond, config.scale, config.threshold, config.eta)
    return cfg(cond, uncond, config.scale)
