"""Peak-memory estimate of one sampling run, weights aside (spec §8): what a host must keep free.

Counts the K/V cache at its fullest (text prefix + the reference scales alive at once; only scales
a later step reads are stored, see :mod:`infinitystar.sampler`) plus the transient tensors of the
largest step: residual stream, q/k/v and the context K/V (also repeated to the query heads), the SwiGLU
intermediates, the fp32 logits and bit probabilities, and the fp32 clip accumulators.

The memory plan: steps longer than ``chunk_tokens`` run queries, MLP and heads in token blocks
(exact), which removes the (B, L, 16384) SwiGLU tensors and the fp32 copies of the hidden states
of the largest scales; see ``auto_chunk_tokens`` and :func:`measure_peak_bytes` (tests compare
the estimate with a measured run).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .config import TransformerConfig
from .kv_cache import offloaded_layers
from .schedule import Schedule

TEXT_TOKENS = 512  # upper bound of the prompt length L


def _nbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_peak_tokens(schedule: Schedule, text_tokens: int = TEXT_TOKENS) -> int:
    """Most K/V tokens alive at once: text + reference scales held while a step stores its own."""
    last_use = schedule.ref_last_use()
    peak = 0
    for step in schedule.steps:
        alive = {si for si, last in last_use.items() if si < step.si and last >= step.index}
        tokens = sum(_tokens(schedule, si) for si in alive)
        if step.is_last_rep and step.si in last_use:
            tokens += step.num_tokens
        peak = max(peak, tokens)
    return text_tokens + peak


def _tokens(schedule: Schedule, si: int) -> int:
    t, h, w = schedule.scales[si]
    return t * h * w


def step_context_tokens(schedule: Schedule, step, text_tokens: int = TEXT_TOKENS) -> int:
    """Keys a step's queries attend to: its own tokens, the text and its reference scales (spec §2.4)."""
    return step.num_tokens + text_tokens + sum(_tokens(schedule, si) for si in step.ref_sids)


def auto_chunk_tokens(config: TransformerConfig, batch: int = 2, dtype: torch.dtype = torch.bfloat16,
                      budget: int | None = None) -> int:
    """Token block size whose SwiGLU intermediates (gate, multiplied in place by up) fit ``budget`` bytes.

    Rounded down to a multiple of 1024 (at least 1024) so the matmuls stay large. For the 8B model
    in bf16 with the default 640 MiB budget this is 5120 tokens; tiny configs never chunk.
    """
    per_token = 2 * batch * config.mlp_hidden * _nbytes(dtype)
    n = (CHUNK_BUDGET if budget is None else budget) // per_token
    return max(1024, n // 1024 * 1024)


CHUNK_BUDGET = 640 << 20  # bytes for one token block's MLP intermediates ("auto" chunking)


def step_activation_bytes(config: TransformerConfig, tokens: int, context: int, d: int, batch: int,
                          dtype: torch.dtype, chunk_tokens: int | None = None,
                          round_qkv_bf16: bool | None = None, native_gqa: bool = False,
                          weight_dtype: torch.dtype | None = None) -> int:
    """Transient bytes of one step of ``tokens`` tokens attending to ``context`` keys (one block live).

    Mirrors :class:`infinitystar.transformer.Block`: the block input and its output (or the normed
    input, unchunked) are whole (the step's embedding is freed after the first block), the
    reference+text+own K/V are whole, and the query/MLP/head
    intermediates are (batch, n, ·) for token blocks of n = ``chunk_tokens`` (n = tokens unchunked).
    ``round_qkv_bf16`` (default: fp32 compute) adds the bf16-rounded fp32 copies of q, k, v.
    ``native_gqa``: the attention kernel reads the KV heads as they are (no copy repeated to the query heads).
    ``weight_dtype`` narrower than ``dtype`` (fp8 storage): each Linear upcasts its weight for the call, so
    one (mlp_hidden, width) weight copy is alive on top (two for scaled e4m3fn, as ComfyUI applies the scale;
    GGUF blocks, stored as uint8, add the dequantizer's workspace: about 6 bytes a value, infinitystar/gguf.py).
    """
    b, f = _nbytes(dtype), 4
    C, H = config.width, config.mlp_hidden
    qw, kvw = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    L = tokens
    n = min(chunk_tokens, L) if chunk_tokens else L
    if round_qkv_bf16 is None:
        round_qkv_bf16 = dtype == torch.float32
    stream = 2 * batch * L * C * b  # block input + (normed input | block output)
    own_kv = 2 * batch * L * kvw * b
    ctx_kv = 2 * batch * context * kvw * b
    norm = batch * n * C * (b + 2 * f)  # RMSNorm output and its two fp32 temporaries
    q = 2 * batch * n * qw * b  # projection, normed/rotated
    expanded = ctx_kv * config.kv_groups if config.kv_groups > 1 and not native_gqa else 0  # K/V per query head
    out = 3 * batch * n * C * b  # attention output, its (B, n, C) copy, o_proj output
    rounding = (batch * n * qw + (ctx_kv // b if n == L else 0)) * f * 3 // 2 if round_qkv_bf16 else 0
    attn = stream + ctx_kv + expanded + (own_kv if n == L else 0) + (norm if n < L else 0) + q + out + rounding
    mlp = stream + norm + batch * n * (2 * H + 2 * C) * b  # silu(gate) (times up, in place), up; down, the sum
    project_kv = batch * L * C * b + 2 * own_kv + ctx_kv  # chunked: K/V pieces, their concatenation
    hidden = batch * L * C * b
    logits = 2 * batch * L * 2 * d * f  # head output and its 1/tau copy
    guidance = 5 * L * 2 * d * 8 + L * d * (2 * f + 8)  # APG float64 temporaries, probabilities, drawn indices
    head = hidden + max(batch * n * C * 2 * f, logits + guidance)
    cast = H * C * b if weight_dtype is not None and _nbytes(weight_dtype) < b else 0
    if weight_dtype == torch.float8_e4m3fn:
        cast *= 2  # scaled fp8: ComfyUI's ops multiply the upcast weight by its scale out of place
    elif weight_dtype == torch.uint8:  # GGUF blocks: the raw bytes moved in, the unpacked values, their fp32 copy
        from .gguf import WORKSPACE_BYTES_PER_VALUE

        cast += H * C * WORKSPACE_BYTES_PER_VALUE
    return max(attn, mlp, project_kv, head) + cast


def estimate_sampling_memory(config: TransformerConfig, schedule: Schedule, batch: int = 2,
                             dtype: torch.dtype = torch.bfloat16, text_tokens: int = TEXT_TOKENS,
                             chunk_tokens: int | str | None = "auto", offload_kv: bool | int = False,
                             native_gqa: bool | None = None, weight_dtype: torch.dtype | None = None) -> int:
    """Peak bytes of a run (weights excluded) for the schedule, CFG batch and block compute dtype.

    ``chunk_tokens`` as in :func:`infinitystar.sampler.sample` ("auto", a token count, None = off).
    ``offload_kv``: reference-scale K/V of all layers (True) or of that many layers kept in host memory
    (the text K/V stays; each step still holds its whole context while it runs).
    ``native_gqa``: the attention reads GQA K/V without repeating it (default: half-precision compute,
    i.e. CUDA SDPA/flash-attn; see :func:`attention.native_gqa`).
    ``weight_dtype``: how the blocks are stored (fp8 adds the per-call upcast copy of a weight).
    """
    if chunk_tokens == "auto":
        chunk_tokens = auto_chunk_tokens(config, batch, dtype)
    if native_gqa is None:
        native_gqa = dtype in (torch.float16, torch.bfloat16)
    per_token = 2 * batch * config.num_kv_heads * config.head_dim * _nbytes(dtype)  # one layer's K and V
    resident_layers = config.depth - offloaded_layers(offload_kv, config.depth)
    reference_tokens = kv_peak_tokens(schedule, text_tokens) - text_tokens
    kv = per_token * (config.depth * text_tokens + resident_layers * reference_tokens)
    act = 0
    for step in schedule.steps:
        context = step_context_tokens(schedule, step, text_tokens)
        act = max(act, step_activation_bytes(config, step.num_tokens, context, step.d, batch, dtype, chunk_tokens,
                                             native_gqa=native_gqa, weight_dtype=weight_dtype))
    accumulators = sum(4 * config.codebook_dim * t * h * w for t, h, w in
                       (schedule.clip_size(c) for c in range(schedule.num_clips)))
    return kv + act + accumulators


def choose_kv_offload(config: TransformerConfig, schedule: Schedule, available: int, batch: int = 2,
                      dtype: torch.dtype = torch.bfloat16, text_tokens: int = TEXT_TOKENS,
                      chunk_tokens: int | str | None = "auto", native_gqa: bool | None = None,
                      weight_dtype: torch.dtype | None = None) -> int:
    """How many layers keep their reference K/V in host memory: 0 when the run fits ``available`` bytes
    (free device memory after the weights) with it resident, else the fewest layers that make it fit
    (every layer when even that is not enough). Each offloaded layer costs one host-to-device copy of
    its reference K/V per step that reads it, so offloading only what is needed is the fastest fit."""
    kw = dict(batch=batch, dtype=dtype, text_tokens=text_tokens, chunk_tokens=chunk_tokens, native_gqa=native_gqa,
              weight_dtype=weight_dtype)
    resident = estimate_sampling_memory(config, schedule, **kw)
    per_layer = (resident - estimate_sampling_memory(config, schedule, offload_kv=True, **kw)) // config.depth
    if resident <= available or per_layer <= 0:
        return 0
    return min(config.depth, -(-(resident - available) // per_layer))


def weight_bytes(config: TransformerConfig, block_dtype: torch.dtype) -> int:
    """Bytes of the transformer's weights in the official layout with blocks stored in ``block_dtype`` (fp8:
    matmul weights only, norms bf16; embeddings and heads fp32), from a meta-device model."""
    from .checkpoint import transformer_storage
    from .transformer import InfinityStarTransformer

    stored = transformer_storage(block_dtype)
    return sum(p.numel() * _nbytes(stored(name, p))
               for name, p in InfinityStarTransformer(config, device="meta").named_parameters())


def choose_block_dtype(config: TransformerConfig, schedule: Schedule, device_bytes: int,
                       candidates: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float8_e4m3fn),
                       dtype: torch.dtype = torch.bfloat16, batch: int = 2,
                       native_gqa: bool | None = None) -> torch.dtype:
    """The first of ``candidates`` (widest first) whose weights plus the sampling estimate (with the reference
    K/V in host memory if need be; ``batch`` 1 when no scale is guided) fit ``device_bytes``; the last one when
    none does."""
    for block_dtype in candidates:
        weights = weight_bytes(config, block_dtype)
        need = estimate_sampling_memory(config, schedule, batch=batch, dtype=dtype, offload_kv=True,
                                        weight_dtype=block_dtype, native_gqa=native_gqa)
        if weights + need <= device_bytes:
            return block_dtype
    return candidates[-1]


# the longest run each set of released weights was trained for, at its resolution: (name, pn, pixel frames)
LARGEST_RUNS = {"720p": (("720p 5 s", "0.90M", 81),), "480p": (("480p 10 s", "0.40M", 161),),
                "interact": (("480p 10 s", "0.40M", 161),)}


def largest_runs(variant: str) -> list[tuple[str, Schedule]]:
    """(name, schedule) of the biggest run the ``variant`` weights make (16:9); for weights of unknown variant,
    each released variant's: what an automatic storage choice has to fit before any run is known."""
    from .schedule import build_schedule

    runs = LARGEST_RUNS.get(variant) or tuple(dict.fromkeys(r for v in LARGEST_RUNS.values() for r in v))
    return [(name, build_schedule(pn, "16:9", frames)) for name, pn, frames in runs]


def fit_block_dtype(config: TransformerConfig, schedules, device_bytes: int, half: torch.dtype = torch.bfloat16,
                    batch: int = 2, native_gqa: bool | None = None) -> torch.dtype:
    """The blocks' storage for an automatic choice: ``half`` (bf16, or fp16 on GPUs without bf16: the official
    layout) when its weights and the run of every one of ``schedules`` fit ``device_bytes``, else fp8 e4m3fn
    (scaled, about half the bytes). Shared by the CLI (the run asked for) and the Model Loader's "auto" (the
    weights' largest run, :func:`largest_runs`)."""
    candidates = (half, torch.float8_e4m3fn)
    for schedule in schedules:
        if choose_block_dtype(config, schedule, device_bytes, candidates, dtype=half, batch=batch,
                              native_gqa=native_gqa) != half:
            return torch.float8_e4m3fn
    return half


def measure_peak_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[object, int]:
    """Run ``fn`` and return (its result, the peak bytes of tensors allocated during it).

    CUDA: ``torch.cuda.max_memory_allocated`` above the memory allocated before. CPU: the running
    sum of torch.profiler's per-operator allocation/free records (live tensor bytes, not RSS).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return out, peak
