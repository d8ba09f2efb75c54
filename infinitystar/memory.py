"""Peak-memory estimate of one sampling run, weights aside (spec §8): what a host must keep free.

Counts the K/V cache at its fullest (text prefix + the reference scales alive at once; only scales
a later step reads are stored, see :mod:`infinitystar.sampler`) plus the transient tensors of the
largest step: residual stream, q/k/v with the GQA-expanded context, the SwiGLU intermediate, the
fp32 logits and bit probabilities, and the fp32 clip accumulators.
"""
from __future__ import annotations

import torch

from .config import TransformerConfig
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


def step_activation_bytes(config: TransformerConfig, tokens: int, context: int, d: int, batch: int,
                          dtype: torch.dtype) -> int:
    """Transient bytes of one step of ``tokens`` tokens attending to ``context`` keys (one block live)."""
    b = _nbytes(dtype)
    C, D = config.width, config.head_dim
    stream = 3 * batch * tokens * C * b  # residual, normed input, block output
    qkv = batch * tokens * (config.num_heads + 2 * config.num_kv_heads) * D * b
    expanded = 2 * batch * config.num_heads * context * D * b  # k, v repeated to the query heads
    attn_out = batch * tokens * C * b
    mlp = 3 * batch * tokens * config.mlp_hidden * b  # gate, up, their product
    logits = (batch + 1) * tokens * 2 * d * 4 + tokens * d * 2 * 4 + tokens * d * 8  # fp32 + probs + idx
    return stream + max(qkv + expanded + attn_out, mlp) + logits


def estimate_sampling_memory(config: TransformerConfig, schedule: Schedule, batch: int = 2,
                             dtype: torch.dtype = torch.bfloat16, text_tokens: int = TEXT_TOKENS) -> int:
    """Peak bytes of a run (weights excluded) for the schedule, CFG batch and block compute dtype."""
    kv = 2 * config.depth * batch * config.num_kv_heads * config.head_dim * _nbytes(dtype)
    kv *= kv_peak_tokens(schedule, text_tokens)
    act = 0
    for step in schedule.steps:
        context = step.num_tokens + text_tokens + sum(_tokens(schedule, si) for si in step.ref_sids)
        act = max(act, step_activation_bytes(config, step.num_tokens, context, step.d, batch, dtype))
    accumulators = sum(4 * config.codebook_dim * t * h * w for t, h, w in
                       (schedule.clip_size(c) for c in range(schedule.num_clips)))
    return kv + act + accumulators
