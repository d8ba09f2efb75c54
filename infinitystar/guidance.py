"""Classifier-free guidance on bit logits: APG as used by the official sampler, and plain CFG
(spec §5.3 step 5). Pure functions; the tensors are (..., tokens, 2d) and every norm runs over
the last two dims, i.e. over the whole step."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class GuidanceConfig:
    scale: float = 34.0  # official cfg for both released models
    threshold: float = 0.05  # APG clip of the per-element RMS of (cond - uncond)
    use_apg: bool = True  # False -> plain CFG, which destroys the output at scale 34
    eta: float = 0.0  # weight kept of the component parallel to cond
    # guidance scale per scale of a clip's pyramid, coarse to fine, the last value repeating (the official sampler
    # takes a per-scale ``cfg_list``; its scripts fill it with one value): empty = ``scale`` everywhere
    per_scale: tuple[float, ...] = ()

    def branches(self, scales_per_clip: int) -> int:
        """Batch of the blocks: 2 (conditional, unconditional) when any scale of the pyramid is guided, else 1.

        parity: the official sampler doubles its batch only when some ``cfg_list`` entry is not 1; at guidance 1
        it runs the conditional branch alone (half the work), with the text projected for that branch only.
        """
        return 2 if any(self.at(i).scale != 1 for i in range(max(1, scales_per_clip))) else 1

    def at(self, inner: int) -> GuidanceConfig:
        """The configuration of scale ``inner`` (0 = coarsest) of a clip's pyramid."""
        if not self.per_scale:
            return self
        return replace(self, scale=float(self.per_scale[min(inner, len(self.per_scale) - 1)]), per_scale=())


def parse_scale_list(text: str, what: str = "guidance schedule") -> tuple[float, ...]:
    """'34, 34, 20, 10' -> (34.0, 34.0, 20.0, 10.0); empty -> (); a clear error for anything else."""
    items = [t.strip() for t in str(text or "").replace(";", ",").split(",")]
    if not any(items):
        return ()
    try:
        values = tuple(float(t) for t in items)
    except ValueError:
        raise ValueError(f"{what} {text!r}: write numbers separated by commas, one per scale from coarse to fine "
                         "(e.g. '34, 34, 20, 10'; the last one repeats)") from None
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"{what} {text!r}: every value must be a finite number >= 0")
    return values


NO_FLOAT64_DEVICES = ("mps",)  # device types without float64 tensors


def float64_device(device: torch.device) -> torch.device:
    """Where float64 arithmetic for tensors on ``device`` runs: there, or on the CPU for Apple's MPS."""
    return torch.device("cpu") if device.type in NO_FLOAT64_DEVICES else device


def apg(cond: torch.Tensor, uncond: torch.Tensor, scale: float = 34.0, threshold: float = 0.05,
        eta: float = 0.0) -> torch.Tensor:
    """Adaptive projected guidance: cond + (scale-1) * (orthogonal part of the clipped difference).

    The projection runs in float64 and is cast back before the update, like the official code; on a device
    without float64 (Apple's MPS) it runs on the CPU, still in float64.
    """
    diff = cond - uncond
    if threshold > 0:
        n = diff.shape[-1] * diff.shape[-2]
        rms = (1 / math.sqrt(n)) * torch.linalg.vector_norm(diff, dim=(-2, -1), keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(diff), threshold / rms)
    wide = float64_device(cond.device)
    d64, c64 = diff.to(wide, torch.float64), cond.to(wide, torch.float64)
    unit = c64 / torch.linalg.vector_norm(c64, dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    parallel = (d64 * unit).sum(dim=(-2, -1), keepdim=True) * unit
    orthogonal = (d64 - parallel).to(cond.device, cond.dtype)
    update = orthogonal + eta * parallel.to(cond.device, cond.dtype) if eta else orthogonal
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
