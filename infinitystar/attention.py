"""The one attention dispatch of the model (spec §2.1 steps 5-6, §2.4): unmasked, non-causal, GQA.

``sdpa`` (torch: cuDNN / flash / memory-efficient kernels on CUDA, as PyTorch picks, except that calls smaller
than ``SMALL_CALL_WORK`` go to FlashAttention-2, see :func:`small_call`) is the default;
``cudnn`` and ``sdpa_flash`` ask SDPA for one kernel (cuDNN's, the fastest on Hopper; FlashAttention-2's, the
official code's); ``flash`` (flash-attn 3, else 2) and ``sage`` (sageattention) are opt-in and only used when
installed;
``auto`` takes flash-attn for half-precision tensors on an NVIDIA Ampere or newer when it is installed, else SDPA.
The official model rounds q, k, v to bf16 right before its flash-attn call; ``round_qkv_bf16`` reproduces that
rounding for fp32 runs.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import logging

import torch
import torch.nn.functional as F

from .ops import rocm_arch

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "cudnn", "sdpa_flash", "flash", "sage")
SDPA_BACKENDS = ("sdpa", "cudnn", "sdpa_flash")  # PyTorch's own kernels: always available
_PIP_NAMES = {"flash": "flash-attn (or flash_attn_interface from flash-attention 3)", "sage": "sageattention"}


def _available() -> list[str]:
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = available_backends()
    return _AVAILABLE


_AVAILABLE: list[str] | None = None


def available_backends() -> list[str]:
    found = list(SDPA_BACKENDS)
    if importlib.util.find_spec("flash_attn_interface") or importlib.util.find_spec("flash_attn"):
        found.append("flash")
    if importlib.util.find_spec("sageattention"):
        found.append("sage")
    return found


def backend_unavailable(backend: str, device: torch.device | str | None = None) -> str | None:
    """Why ``backend`` cannot run here (what to install, or that ``device`` cannot run it), or None when it can
    ("auto" always can)."""
    if backend == "auto":
        return None
    if backend not in available_backends():
        return (f"attention backend {backend!r} needs the pip package {_PIP_NAMES[backend]}; "
                f"installed: {', '.join(available_backends())}")
    if backend == "flash" and device is not None:
        return flash_attn_unsupported(device)
    return None


def flash_attn_unsupported(device: torch.device | str) -> str | None:
    """Why flash-attn cannot run on ``device`` (it fails only at the first call, after loading), or None."""
    device = torch.device(device)
    if device.type != "cuda":
        return None  # attend() runs SDPA there, as for the other CUDA kernels
    if torch.version.hip is None and torch.cuda.get_device_capability(device) < (8, 0):
        return "flash-attn needs an NVIDIA Ampere (RTX 30xx, A100) or newer GPU"
    return None


def auto_backend(device: torch.device | str) -> str:
    """What "auto" runs on ``device``: flash-attn (the official kernel) when it is installed and the GPU is an
    NVIDIA Ampere or newer, else PyTorch SDPA. ROCm gets SDPA: flash-attn's ROCm builds cover few AMD GPUs."""
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip is not None or "flash" not in _available():
        return "sdpa"  # (the device first: _available() caches what is installed at its first call)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return "flash" if _capability(index) >= (8, 0) else "sdpa"


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    # KV head j serves query heads j*g .. j*g+g-1 (repeat_interleave, not tiling), spec §2.1
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _flash(q, k, v, scale):
    try:
        from flash_attn_interface import flash_attn_func  # flash-attention 3
    except ImportError:
        try:
            from flash_attn import flash_attn_func
        except ImportError as e:
            raise ImportError(f"attention backend 'flash' needs the pip package {_PIP_NAMES['flash']}") from e
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
    out = out[0] if isinstance(out, tuple) else out
    return out.transpose(1, 2)


def _sage(q, k, v, scale):
    try:
        from sageattention import sageattn
    except ImportError as e:
        raise ImportError(f"attention backend 'sage' needs the pip package {_PIP_NAMES['sage']}") from e
    return sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=scale)


def _resolve(backend: str, q: torch.Tensor) -> str:
    if backend == "auto":  # flash-attn 3/2 for half-precision tensors on a GPU it runs on, else SDPA
        return auto_backend(q.device) if _half_cuda(q) else "sdpa"
    return backend


def _half_cuda(q: torch.Tensor) -> bool:
    return _is_half_cuda(q.device, q.dtype)


def _is_half_cuda(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def _flash_sdpa(q: torch.Tensor) -> bool:
    """PyTorch's FlashAttention-2 can take these queries: fp16/bf16 on sm80+ NVIDIA (ROCm builds are left to SDPA's
    own pick rather than risk a fall-back to the math kernel), head dim <= 256, the kernel enabled."""
    return _half_cuda(q) and _flash_sdpa_takes(q.device, q.shape[-1])


def _flash_sdpa_for(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    return _is_half_cuda(device, dtype) and _flash_sdpa_takes(device, head_dim)


def _flash_sdpa_takes(device: torch.device, head_dim: int) -> bool:
    return (head_dim <= 256 and torch.version.hip is None and torch.backends.cuda.flash_sdp_enabled()
            and _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (8, 0))


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def _sdpa_takes_gqa() -> bool:
    """torch >= 2.5 takes GQA K/V in SDPA (``enable_gqa``); read once, attention asks per call."""
    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # some builds (torch 2.11 CUDA) expose SDPA as a builtin without a signature
        return "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def native_gqa(q: torch.Tensor, backend: str = "sdpa") -> bool:
    """Whether :func:`attend` hands GQA K/V to the kernel as they are, without a copy per query head.

    flash-attn always does; CUDA SDPA does for fp16/bf16 with head_dim ≤ 256 on sm80+ when its flash
    kernel is enabled (``enable_gqa``; other SDPA kernels either take it too or are skipped, so the
    call never falls back to the quadratic-memory math kernel). CPU keeps the repeat: it is the
    official code's arithmetic, bit for bit.
    """
    return takes_gqa(q.device, q.dtype, q.shape[-1], backend)


def takes_gqa(device: torch.device | str, dtype: torch.dtype, head_dim: int, backend: str = "sdpa") -> bool:
    """:func:`native_gqa` before there is a tensor, for memory plans: without it (CPU, MPS, NVIDIA before Ampere,
    ROCm) every attention call holds K/V repeated to the query heads."""
    device = torch.device(device)
    if not _is_half_cuda(device, dtype):
        return False
    backend = auto_backend(device) if backend == "auto" else backend
    if backend == "sage":
        return False
    if backend == "flash":
        return True
    return _flash_sdpa_for(device, dtype, head_dim) and _sdpa_takes_gqa()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa",
           round_qkv_bf16: bool = True, *, bias: torch.Tensor | None = None,
           scale: float | None = None) -> torch.Tensor:
    """Full attention, unmasked unless ``bias`` is given.

    q: (B, Nq, Lq, D); k, v: (B, Nkv, Lk, D) with Nq a multiple of Nkv. Returns (B, Nq, Lq, D) in
    q's dtype. With ``round_qkv_bf16`` fp32 inputs are rounded to bf16 and attended in fp32
    (parity with the official fp32 runs); bf16 inputs are unchanged by it.

    ``bias`` (broadcast to the scores) is added before the softmax, as the text encoder's relative positions and
    padding need; such calls (short: 512 tokens at most) run SDPA as they are, without rounding, at ``scale``
    (default 1/sqrt(D)).
    """
    if bias is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)
    backend = _resolve(backend, q)
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS} "
                         f"(installed: {available_backends()})")
    if backend not in SDPA_BACKENDS and backend not in _available():
        raise ImportError(backend_unavailable(backend))
    dtype = q.dtype
    if round_qkv_bf16 and dtype == torch.float32:
        q, k, v = (t.to(torch.bfloat16).float() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5
    groups = q.shape[1] // k.shape[1]
    if backend not in SDPA_BACKENDS and _half_cuda(q):
        fn = _flash if backend == "flash" else _sage
        kk, vv = (k, v) if backend == "flash" else (_expand_kv(k, groups), _expand_kv(v, groups))
        return fn(q, kk, vv, scale).to(dtype)
    if backend not in SDPA_BACKENDS:
        # flash/sage kernels need half precision on CUDA; say why SDPA runs instead
        logger.debug("attention backend %s needs fp16/bf16 CUDA tensors; using sdpa", backend)
    if backend in _ONLY and _half_cuda(q):
        out = _sdpa_only(backend, q, k, v, scale, groups)
        if out is not None:
            return out.to(dtype)
    if backend == "sdpa" and small_call(q.shape[2], k.shape[2]) and _flash_device(q):
        out = _sdpa_only("sdpa_flash", q, k, v, scale, groups, asked=False)
        if out is not None:
            return out.to(dtype)
    if groups > 1 and native_gqa(q, "sdpa"):
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True).to(dtype)
    k, v = _expand_kv(k, groups), _expand_kv(v, groups)
    if _scores_materialized(q):
        return _attend_in_query_slices(q, k, v, scale).to(dtype)
    return F.scaled_dot_product_attention(q, k, v, scale=scale).to(dtype)


SCORE_BYTES = 2**30  # the score matrix one SDPA call may build where its kernel builds it whole (MPS)


def _scores_materialized(q: torch.Tensor) -> bool:
    """Apple's MPS SDPA builds the whole fp32 score matrix (B, heads, queries, keys), and MPS refuses any tensor over
    4 GiB: the large steps' calls (up to 93 GiB at 720p) must be cut. So does SDPA's math kernel, the only one ROCm
    has for RDNA1/2 and Vega (AOTriton's fused kernels are built for CDNA2+ and RDNA3+)."""
    if q.device.type == "mps":
        return True
    return q.is_cuda and bool(torch.version.hip) and _rocm_math_sdpa(q.device.index or 0)


ROCM_MATH_SDPA = ("gfx10", "gfx900", "gfx902", "gfx904", "gfx906", "gfx909", "gfx90c", "gfx908", "gfx80")


@functools.cache
def _rocm_math_sdpa(index: int) -> bool:
    return rocm_arch(index).startswith(ROCM_MATH_SDPA)


def _attend_in_query_slices(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                            budget: int = SCORE_BYTES) -> torch.Tensor:
    """SDPA over slices of the queries, each with a score matrix of at most ``budget`` bytes: every query's row of
    the softmax is its own, so this is the same attention."""
    per_query = q.shape[0] * q.shape[1] * k.shape[2] * 4  # fp32 scores
    step = max(1, budget // per_query)
    if step >= q.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + step], k, v, scale=scale)
                      for i in range(0, q.shape[2], step)], dim=2)


# Below this many query x key tokens per call, backend "sdpa" runs FlashAttention-2 rather than leaving the pick to
# PyTorch (which takes cuDNN on Hopper/Blackwell since torch 2.11). 0 turns the routing off.
SMALL_CALL_WORK = 4096 * 4096


def small_call(queries: int, keys: int, work: int | None = None) -> bool:
    """Whether an attention call of ``queries`` x ``keys`` tokens is too small for cuDNN to pay.

    Why: cuDNN builds an execution plan for every new shape (reported elsewhere at 55-70 ms each, about a second
    where a new kernel variant is compiled; PyTorch caches plans per process) and spends about twice
    FlashAttention-2's host time per call, while its kernel is about 1.6x faster (H200,
    benchmarks/gpu/probe_kernels.py). A 720p 5 s generation has 34 attention shapes, most of them small: by this
    estimate cuDNN pays only at the largest ones, which are called hundreds of times. At 4096 x 4096 tokens
    (batch 2, 32 heads) one call's kernel saves about 0.6 ms, so a shape called about 100 times (36 layers,
    3 repetitions) earns back a plan of about 60 ms. Measured (H200, 720p 5 s, ``probe_kernels.py --sweep``): the
    routing's first generation spends 0.20 s on plans against cuDNN-everywhere's 1.54 s; warm, its kernels take
    0.23 s longer (19.02 against 18.79 s).
    """
    work = SMALL_CALL_WORK if work is None else work
    return queries * keys < work


def _flash_device(q: torch.Tensor) -> bool:
    """The size routing can ask for PyTorch's FlashAttention-2 here: the kernel takes q, and torch can be asked."""
    return _flash_sdpa(q) and _has_sdpa_kernel()


@functools.cache
def _has_sdpa_kernel() -> bool:
    """torch >= 2.3 can ask SDPA for one kernel (torch.nn.attention.sdpa_kernel); older versions keep their pick."""
    try:
        from torch.nn.attention import sdpa_kernel  # noqa: F401
    except ImportError:
        return False
    return True


_REFUSED: dict[tuple, str] = {}  # (backend, shapes) a kernel refused -> why (logged once per shape)
_ONLY = {"cudnn": "CUDNN_ATTENTION", "sdpa_flash": "FLASH_ATTENTION"}


def _sdpa_only(backend, q, k, v, scale, groups, asked: bool = True):
    """One of SDPA's kernels alone (``cudnn`` or ``sdpa_flash``); None where it refuses the call.

    ``cudnn``: cuDNN's fused attention.
    Why: on an H200 at the 8B model's largest-step shapes cuDNN ran at 561-606 TFLOP/s against the
    FlashAttention-2 kernel's 353-359 (benchmarks/gpu/probe_kernels.py), and attention is about half of a
    720p generation. Recent PyTorch (2.11 with CUDA 13) already picks cuDNN by default on sm90 and sm100; older
    versions and other GPUs default to flash, so this backend asks for cuDNN explicitly, and a refusal is logged
    with PyTorch's reason (that shape then goes to SDPA's default kernels). Its numerics are bf16-close to
    FlashAttention's (the official code's kernel), not equal.

    ``sdpa_flash``: PyTorch's built-in FlashAttention-2, the kernel family of the flash-attn 2 package the
    official code calls; for bf16 runs that round like the official GPU run where flash-attn is not installed
    (recent PyTorch would otherwise pick cuDNN).

    ``asked=False``: the size routing of backend "sdpa" chose the kernel, not the user; a refusal is only logged
    at debug level (that shape keeps SDPA's own pick).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    key = (backend, q.shape, k.shape, q.dtype)
    if key in _REFUSED:
        return None
    version = torch.backends.cudnn.version() if backend == "cudnn" else None
    if backend == "cudnn" and not cudnn_safe(q.shape[2], version):
        _REFUSED[key] = f"cuDNN {version} with {q.shape[2]} queries (not a multiple of 128)"
        logger.info("attention backend cudnn: %s; PyTorch keeps such calls off cuDNN before 9.15.1, so does this "
                    "one (default SDPA kernels for this shape)", _REFUSED[key])
        return None
    gqa = groups > 1 and _sdpa_takes_gqa()
    if groups > 1 and not gqa:
        k, v = _expand_kv(k, groups), _expand_kv(v, groups)
    try:
        with sdpa_kernel([getattr(SDPBackend, _ONLY[backend])]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale, **({"enable_gqa": True} if gqa else {}))
    except RuntimeError as e:
        _REFUSED[key] = str(e).splitlines()[0]
        log = logger.warning if asked else logger.debug
        log("attention backend %s refused q %s, k %s (%s); using the default SDPA kernels for this shape", backend,
            tuple(q.shape), tuple(k.shape), _REFUSED[key])
        return None


def cudnn_safe(queries: int, cudnn_version: int | None) -> bool:
    """Whether cuDNN's attention may take ``queries`` query tokens: cuDNN before 9.15.1 has a memory bug for query
    lengths that are not multiples of 128 (pytorch/pytorch#169849), so PyTorch stopped picking it there."""
    return cudnn_version is not None and (cudnn_version >= 91501 or queries % 128 == 0)


def prepare_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V as :func:`attend` will use them, for attending many query blocks to the same K/V.

    Where the kernel cannot take GQA K/V (see :func:`native_gqa`) they must be repeated to the query
    heads; doing it once instead of once per query block saves the copies. Exact: ``attend`` does the same.
    """
    groups = q.shape[1] // k.shape[1]
    if groups == 1 or native_gqa(q, backend):
        return k, v
    return _expand_kv(k, groups), _expand_kv(v, groups)
