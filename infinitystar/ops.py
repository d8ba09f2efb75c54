"""An ``ops`` namespace whose layers cast their stored weights to the input at call time.

Why: fp8 (e4m3fn, e5m2) storage halves the 8B transformer's weights to ~8.8 GB, but matmuls run
in bf16/fp32; the weight of each layer is upcast (and moved to the input's device) only while it
is used, so one layer's bf16 copy is alive at a time. ComfyUI passes ``comfy.ops.manual_cast``,
which does the same; this is the standalone equivalent (``ops=infinitystar.ops.cast``).
"""
from __future__ import annotations

from collections.abc import Mapping

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


SCALE_KEYS = ("scale_weight", "scale_input")  # scaled-fp8 parameters (ours, ComfyUI's): not in official files


class ScaledCastLinear(CastLinear):
    """A Linear whose fp8 weight is stored divided by a per-tensor ``scale_weight`` (ComfyUI's scaled-fp8 layout).

    Why: trained weights are mostly below e4m3fn's smallest normal number (2^-6), where it keeps fewer than its
    3 mantissa bits; scaling the largest |w| to the format's maximum keeps them all (relative error ≈ 2.6 % for
    N(0, 0.02) weights instead of ≈ 3.3 %, and ≈ 5.7 % at N(0, 0.01)). Same storage; the scale is one number.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale_weight = nn.Parameter(torch.ones((), device=self.weight.device, dtype=torch.float32),
                                         requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_weight.to(device=x.device, dtype=x.dtype)
        w = _cast(self.weight, x)
        if w.numel() < x.numel():  # large steps: scale the weight (in place when the cast made a copy)
            w = w.mul_(scale) if w is not self.weight else w * scale
        else:  # small steps: the input is the smaller tensor
            x = x * scale
        return F.linear(x, w, _cast(self.bias, x))


class Fp8MatmulLinear(ScaledCastLinear):
    """A scaled e4m3fn Linear multiplied in fp8 (``torch._scaled_mm``), the input quantized per call with its own
    per-tensor scale. Opt-in: GPUs with fp8 units (sm89+) multiply about twice as fast as in bf16, but rounding
    the activations to e4m3fn (≈3 %) moves the numerics away from the official bf16. Weights that are not e4m3fn
    (the fp32 embeddings and heads), or not on the input's device, take the scaled cast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype != torch.float8_e4m3fn or w.device != x.device or not x.is_floating_point():
            return super().forward(x)
        return fp8_linear(x, w, self.scale_weight, self.bias)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale_w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (w * scale_w).T + bias`` in fp8: ``w`` e4m3fn on ``x``'s device, ``x`` quantized per call with its own
    per-tensor scale (see ``Fp8MatmulLinear``; a host's ops call it with the weight it cast)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    fmax = torch.finfo(torch.float8_e4m3fn).max
    scale = (torch.linalg.vector_norm(x2, float("inf")).float() / fmax).clamp_min(torch.finfo(torch.float32).tiny)
    inverse, scale_w = (1 / scale).to(x2.dtype), scale_w.float()

    def matmul(part):
        rows = part.shape[0]
        pad = -rows % 16 if x.is_cuda else 0  # cuBLASLt's fp8 GEMM wants multiples of 16
        part8 = F.pad(part, (0, 0, 0, pad)) if pad else part
        # no clamp needed: |x| <= amax, so |x * inverse| <= 448 * (1 + 2^-9) before its own rounding (at most
        # 450 in bf16), which the cast rounds to 448; e4m3fn only turns values from 464 on into NaN
        part8 = (part8 * inverse).to(torch.float8_e4m3fn)
        done = torch._scaled_mm(part8, w.t(), scale_a=scale, scale_b=scale_w, out_dtype=x.dtype)
        return done[:rows] if pad else done

    if x2.shape[0] <= FP8_MATMUL_ROWS:  # the sampler's token blocks (2 x 5,120 rows): one GEMM, no copy
        out = matmul(x2)
    else:
        out = x2.new_empty(x2.shape[0], w.shape[0])
        for start in range(0, x2.shape[0], FP8_MATMUL_ROWS):  # quantized copies of a row block only
            part = x2[start:start + FP8_MATMUL_ROWS]
            out[start:start + part.shape[0]] = matmul(part)
    out = out.reshape(*shape[:-1], w.shape[0])
    return out if bias is None else out.add_(_cast(bias, out))


# rows quantized at a time: bounds the input's scaled and fp8 copies (3 bytes a value: 0.5 GB for the MLP's down
# projection at this size) while a 720p step's token block (2 x 5,120 rows) is still one GEMM
FP8_MATMUL_ROWS = 10240


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively: NVIDIA Ampere (RTX 30xx) or newer, or an AMD GPU other than
    RDNA1/2 (gfx10xx) and older GCN / Vega (gfx9 before gfx908, MI100). Turing and Pascal only emulate it: slow,
    Pascal's cuBLAS refuses bf16 GEMMs, and SDPA's memory-efficient kernel takes bf16 only from sm80 (older cards
    would fall to the quadratic-memory math kernel)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    if torch.version.hip:  # the architecture name tells Vega (gfx900/906: MI50, Radeon VII) from MI100+ (all 9.x)
        arch = rocm_arch(device)
        if arch:
            return not arch.startswith(AMD_WITHOUT_BF16)
    major = torch.cuda.get_device_capability(device)[0]
    return major != 10 if torch.version.hip else major >= 8


def rocm_arch(device: torch.device | str | int) -> str:
    """ROCm's architecture name of a GPU (``gcnArchName``, e.g. 'gfx1030:xnack-'); '' where none is reported."""
    return str(getattr(torch.cuda.get_device_properties(device), "gcnArchName", ""))


AMD_WITHOUT_BF16 = ("gfx10", "gfx900", "gfx902", "gfx904", "gfx906", "gfx909", "gfx90c", "gfx80", "gfx70")


def fp8_matmul_unavailable(device: torch.device | str) -> str | None:
    """Why ``Fp8MatmulLinear`` cannot run on ``device``, or None when it can."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.version.hip:  # ROCm's capability numbers are gfx arches, and its fp8 GEMM takes e4m3fnuz
            return "fp8 matmuls here use NVIDIA's e4m3fn format (RTX 40xx / Ada, H100 / Hopper or newer), not ROCm's"
        if torch.cuda.get_device_capability(device) < (8, 9):
            return "fp8 matmuls need an NVIDIA GPU with fp8 units (RTX 40xx / Ada, H100 / Hopper or newer)"
        return None
    if device.type != "cpu":
        return f"fp8 matmuls are not available on {device.type}"
    return None


def quantize_scaled(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight / scale in ``dtype``, scale): the largest |weight| lands in the format's top binade.

    The scale is a power of two, so multiplying by it is exact in any float format: the layer computes with
    exactly the dequantized weight whether it scales the weight or the input, in bf16 as in fp32.
    """
    w = weight.float()
    top = (w.abs().amax() / torch.finfo(dtype).max).clamp_min(torch.finfo(torch.float32).tiny)
    scale = torch.exp2(torch.ceil(torch.log2(top)))
    return (w / scale).to(dtype), scale


class CastConv3d(nn.Conv3d):
    """``nn.Conv3d`` computing in the input's dtype/device whatever its weight is stored in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, _cast(self.weight, x), _cast(self.bias, x))


class WeightNorm(nn.Module):
    """Base of the library's weight-only norms: one ``weight`` of ``dim`` ones and its read, ``weight_as``, which a
    host's :func:`norm_layer` subclass overrides to route it through its own cast. Subclasses give the arithmetic."""

    bias = None  # read by hosts' weight casts

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def weight_as(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(device=x.device, dtype=dtype)


def norm_layer(ops, cls: type[nn.Module]) -> type[nn.Module]:
    """The class to build one of the library's norm layers ``cls`` from: the models' norms keep the official
    arithmetic (not torch's or the host's), and read their weight through ``cls.weight_as(x, dtype)``. A host that
    casts or offloads weights gives its ``ops`` a ``norm_layer(cls)`` hook returning a subclass that routes the
    weight through its own cast; ``torch.nn`` and the namespaces here build ``cls`` itself."""
    hook = getattr(ops, "norm_layer", None)
    return hook(cls) if hook is not None else cls


class cast:  # noqa: N801  (a namespace, used like ``torch.nn`` / ``comfy.ops.manual_cast``)
    Linear = CastLinear
    Conv3d = CastConv3d
    Embedding = nn.Embedding  # the text encoder's tables (looked up, not multiplied: kept as stored)


class scaled_cast:  # noqa: N801  (for e4m3fn storage; ComfyUI's equivalent is comfy.ops.scaled_fp8_ops)
    Linear = ScaledCastLinear
    Conv3d = CastConv3d
    Embedding = nn.Embedding


class scaled_fp8_matmul:  # noqa: N801  (opt-in fp8 compute; ComfyUI's is --fast fp8_matrix_mult)
    Linear = Fp8MatmulLinear
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


def dequantized(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``state`` without fp8 storage, for code that cannot hold it: each 1-byte float tensor cast to ``dtype``
    and multiplied by its layer's ``scale_weight`` (exact: the scales are powers of two); scale keys dropped."""
    out = {}
    for key, value in state.items():
        module, _, name = key.rpartition(".")
        if name in SCALE_KEYS:
            continue
        if value.is_floating_point() and value.dtype.itemsize == 1:
            scale = state.get(f"{module}.scale_weight")
            value = value.to(dtype) * scale.to(dtype) if scale is not None else value.to(dtype)
        out[key] = value
    return out
