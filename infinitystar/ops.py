"""An ``ops`` namespace whose layers cast their stored weights to the input at call time.

Why: fp8 (e4m3fn, e5m2) storage halves the 8B transformer's weights to ~8.8 GB, but matmuls run
in bf16/fp32; the weight of each layer is upcast (and moved to the input's device) only while it
is used, so one layer's bf16 copy is alive at a time. ComfyUI passes ``comfy.ops.manual_cast``,
which does the same; this is the standalone equivalent (``ops=infinitystar.ops.cast``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _cast(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    if t is None or (t.dtype == like.dtype and t.device == like.device):
        return t
    return t.to(device=like.device, dtype=like.dtype, non_blocking=True)


class CastLinear(nn.Linear):
    """``nn.Linear`` computing in the input's dtype/device whatever its weight is stored in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _cast(self.weight, x), _cast(self.bias, x))


class CastConv3d(nn.Conv3d):
    """``nn.Conv3d`` computing in the input's dtype/device whatever its weight is stored in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, _cast(self.weight, x), _cast(self.bias, x))


class cast:  # noqa: N801  (a namespace, used like ``torch.nn`` / ``comfy.ops.manual_cast``)
    Linear = CastLinear
    Conv3d = CastConv3d


def store_weights(model: nn.Module, dtype: torch.dtype, min_dim: int = 2) -> nn.Module:
    """Store every floating weight with ``>= min_dim`` dims of ``model`` in ``dtype`` (e.g. fp8).

    Norm weights and biases (1-D) keep their dtype. Pair with ``ops=cast`` (or ComfyUI's
    ``manual_cast``) so the matmuls see the compute dtype.
    """
    for p in model.parameters():
        if p.is_floating_point() and p.dim() >= min_dim:
            p.data = p.data.to(dtype)
    return model
