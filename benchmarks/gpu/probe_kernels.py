"""Kernel probe at the 8B model's largest-step shapes: SDPA backends and bf16 / fp8 matmuls.

Why: on the first GPU run (H200) our 720p 5 s generation took 0.92x the official code's time. Both call
PyTorch SDPA, and the few largest steps dominate, so the next speed-up has to come from these kernels. This
times, at the exact shapes of the largest step of a case (CFG batch 2, 32 query heads on 8 K/V heads, head
dim 128, our query block of ``auto_chunk_tokens`` tokens against the step's whole context):
  - attention: each SDPA backend, with GQA K/V as they are (enable_gqa) and repeated per query head;
  - one MLP projection (width -> mlp_hidden): bf16 weights, our fp8 storage with its upcast
    (ScaledCastLinear), and fp8 matmuls (Fp8MatmulLinear, torch._scaled_mm).
It prints milliseconds, TFLOP/s, and the per-step time each variant implies for all blocks (36 layers,
attention only / the four attention and three MLP projections), to weigh against the measured s/step. With
``--sweep`` (default 720p5) it also times every step shape of the case with flash and cuDNN: a generation's
attention time per backend, split by step size.

    python benchmarks/gpu/probe_kernels.py --cases 720p5,480p5
    python benchmarks/gpu/probe_kernels.py --device cpu --config tiny --cases mid5   (plumbing check only)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_generate import CONFIGS, NAMED_CASES, TEXT_TOKENS, machine_line  # noqa: E402

from infinitystar.memory import auto_chunk_tokens, step_context_tokens  # noqa: E402
from infinitystar.ops import Fp8MatmulLinear, ScaledCastLinear, quantize_scaled  # noqa: E402
from infinitystar.schedule import build_schedule  # noqa: E402
from infinitystar.transformer import token_spans  # noqa: E402


def blocks_of(tokens: int, chunk: int) -> tuple[int, int]:
    """(largest query block, block count) of a step of ``tokens`` as the sampler splits it (``token_spans``)."""
    spans = token_spans(tokens, chunk)
    return max(e - s for s, e in spans), len(spans)


def step_shapes(schedule) -> list[tuple[int, int]]:
    """(query tokens, context tokens) of every step."""
    return [(step.num_tokens, step_context_tokens(schedule, step, TEXT_TOKENS)) for step in schedule.steps]


def largest_step(schedule):
    """(query tokens, context tokens) of the step with the most attention work."""
    return max(step_shapes(schedule), key=lambda s: s[0] * s[1])


def timed_ms(fn, repeat: int = 5) -> float:
    for _ in range(2):
        out = fn()
    if not out.is_cuda:
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - start) * 1e3 / repeat
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def attention_rows(cfg, tokens, context, chunk, device):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device.type).manual_seed(0)
    rows_q, blocks = blocks_of(tokens, chunk)
    q = torch.randn(2, cfg.num_heads, rows_q, cfg.head_dim, device=device, dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(2, cfg.num_kv_heads, context, cfg.head_dim, device=device, dtype=torch.bfloat16,
                        generator=g) for _ in range(2))
    groups = cfg.num_heads // cfg.num_kv_heads
    kr, vr = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    flops = 4 * q.shape[0] * q.shape[1] * q.shape[2] * context * cfg.head_dim
    rows = []
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        for kv_name, args, kw in (("GQA", (k, v), {"enable_gqa": True}), ("repeated", (kr, vr), {})):
            try:
                with sdpa_kernel([backend]):
                    ms = timed_ms(lambda a=args, kw=kw: F.scaled_dot_product_attention(q, *a, **kw))
            except Exception as e:  # noqa: BLE001  (a backend that refuses these shapes is a result)
                rows.append((f"SDPA {name}, {kv_name} K/V", None, str(e).splitlines()[0][:70]))
                continue
            rows.append((f"SDPA {name}, {kv_name} K/V", ms, f"{flops / ms / 1e9:.0f} TFLOP/s; "
                         f"{ms * blocks * cfg.depth / 1e3:.2f} s per step (all blocks)"))
    if blocks > 1:  # the same step's queries in one call: what query blocks cost the attention kernel
        whole = torch.randn(2, cfg.num_heads, tokens, cfg.head_dim, device=device, dtype=torch.bfloat16, generator=g)
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel([backend]):
                    ms = timed_ms(lambda: F.scaled_dot_product_attention(whole, k, v, enable_gqa=True), repeat=2)
            except Exception as e:  # noqa: BLE001
                rows.append((f"SDPA {name}, GQA K/V, all {tokens} queries in one call", None,
                             str(e).splitlines()[0][:70]))
                continue
            rows.append((f"SDPA {name}, GQA K/V, all {tokens} queries in one call", ms,
                         f"{flops * tokens / q.shape[2] / ms / 1e9:.0f} TFLOP/s; {ms * cfg.depth / 1e3:.2f} s per step"))
    return rows


def sweep_rows(cfg, schedule, chunk, device, repeat: int = 3):
    """Attention time of a whole generation per SDPA backend (every step's shape, all 36 layers, no MLP), by
    step size: whether cuDNN's kernel pays at the small steps too, or only at the large ones. A last row routes
    each shape as backend "sdpa" does (``attention.small_call``: FlashAttention-2 below the threshold)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from infinitystar.attention import small_call

    buckets = [(0, 100), (100, 1000), (1000, 10000), (10000, 1 << 62)]
    counts: dict[tuple[int, int], int] = {}
    for shape in step_shapes(schedule):
        counts[shape] = counts.get(shape, 0) + 1
    rows, times = [], {}  # backend -> {shape: (kernel ms of the generation, first call's extra ms)}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        per_shape = {}
        try:
            for (tokens, context), n in counts.items():
                rows_q, blocks = blocks_of(tokens, chunk)
                q = torch.randn(2, cfg.num_heads, rows_q, cfg.head_dim, device=device, dtype=torch.bfloat16)
                k = torch.randn(2, cfg.num_kv_heads, context, cfg.head_dim, device=device, dtype=torch.bfloat16)
                with sdpa_kernel([backend]):
                    first = first_call_ms(lambda q=q, k=k: F.scaled_dot_product_attention(q, k, k, enable_gqa=True))
                    ms = timed_ms(lambda q=q, k=k: F.scaled_dot_product_attention(q, k, k, enable_gqa=True), repeat)
                per_shape[tokens, context] = (ms * blocks * cfg.depth * n, max(first - ms, 0.0))
        except Exception as e:  # noqa: BLE001
            rows.append((f"attention of a whole generation (ms), SDPA {name}", None, str(e).splitlines()[0][:70]))
            continue
        times[name] = per_shape
        rows.append(_sweep_row(f"SDPA {name}", buckets, per_shape))
    if len(times) == 2:
        routed = {s: times["flash" if small_call(blocks_of(s[0], chunk)[0], s[1]) else "cudnn"][s] for s in counts}
        rows.append(_sweep_row('attend(backend="sdpa") routing', buckets, routed))
    return rows


def _sweep_row(what, buckets, times):
    """One sweep row: kernel time per step-size bucket and the first calls' extra time (plans) on top."""
    per_bucket, setup = [0.0] * len(buckets), [0.0] * len(buckets)
    for (tokens, _), (total, first) in times.items():
        i = next(j for j, (lo, hi) in enumerate(buckets) if lo <= tokens < hi)
        per_bucket[i] += total
        setup[i] += first
    parts = ", ".join(f"{lo}–{hi if hi < 1 << 62 else '∞'} tokens {t / 1e3:.2f} s (+{first / 1e3:.2f} s)"
                      for (lo, hi), t, first in zip(buckets, per_bucket, setup))
    return (f"attention of a whole generation (ms), {what}", sum(per_bucket),
            f"{parts}; (+ first calls: {sum(setup) / 1e3:.2f} s more over the {len(times)} shapes, plan "
            "building paid once per shape and process; where cuDNN's plans cost more than its speed "
            "saves, FlashAttention-2 is the faster first run)")


def first_call_ms(fn) -> float:
    """Wall time of a call on a shape not seen before (cuDNN builds an execution plan per shape)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def dispatch_rows(cfg, tokens, context, chunk, device):
    """Which kernels ``attend`` runs for each backend on the model's own layouts (queries a transposed view of
    (B, L, N, D), K/V contiguous with 8 heads): SDPA picks among its kernels without saying which."""
    from infinitystar.attention import _REFUSED, attend

    if device.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    q = torch.randn(2, blocks_of(tokens, chunk)[0], cfg.num_heads, cfg.head_dim, device=device,
                    dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(2, cfg.num_kv_heads, context, cfg.head_dim, device=device, dtype=torch.bfloat16)
            for _ in range(2))
    rows = []
    for backend in ("sdpa", "cudnn", "sdpa_flash"):
        ms = timed_ms(lambda b=backend: attend(q, k, v, backend=b))  # timed outside the profiler, whose
        with profile(activities=[ProfilerActivity.CUDA]) as prof:  # overhead is not the kernel's
            attend(q, k, v, backend=backend)
            torch.cuda.synchronize()
        top = sorted(prof.key_averages(), key=lambda e: -getattr(e, "device_time_total", 0))[:2]
        names = "; ".join(e.key[:60] for e in top)
        rows.append((f"attend(backend={backend!r}) on the model's layout", ms,
                     f"kernels: {names}" + (f"; refused: {list(_REFUSED.values())[:1]}" if _REFUSED else "")))
    return rows


def chunking_rows(cfg, device, g, tokens: int = 72000, chunk: int = 5120):
    """Whether our query blocks change results at the largest 720p step: a (2, L, C) x (C, C) projection and the
    official composite RMSNorm, whole (the official code) against in blocks of ``chunk`` tokens (ours). cuBLAS
    may pick another kernel (tile, split-K) for the smaller row count of a block, or of the last, short one."""
    x = (torch.randn(2, tokens, cfg.width, device=device, generator=g)).bfloat16()
    w = (0.02 * torch.randn(cfg.width, cfg.width, device=device, generator=g)).bfloat16()
    whole = F.linear(x, w)
    spans = token_spans(tokens, chunk)
    blocks = torch.cat([F.linear(x[:, s:e], w) for s, e in spans], dim=1)

    def norm(t):
        tf = t.float()
        return (tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)).bfloat16()

    norm_blocks = torch.cat([norm(x[:, s:e]) for s, e in spans], dim=1)
    return [(f"projection, whole {tokens} tokens vs blocks of {chunk}", None,
             f"{(whole != blocks).float().mean().item():.2e} of bf16 elements differ"),
            ("composite RMSNorm, whole vs blocks", None,
             f"{(norm(x) != norm_blocks).float().mean().item():.2e} of bf16 elements differ")]


def rounding_rows(cfg, device):
    """Where our GPU bf16 path can still round differently from the official one: PyTorch's fused RMSNorm
    against the official composite (fp32 statistics, one rounding), and SDPA with GQA K/V against repeated K/V."""
    from infinitystar.attention import attend
    from infinitystar.transformer import fused_rms_norm

    g = torch.Generator(device.type).manual_seed(1)
    x = (torch.randn(2, 4096, cfg.width, device=device, generator=g) * 3).bfloat16()
    w = (1 + 0.1 * torch.randn(cfg.width, device=device, generator=g)).bfloat16()
    xf = x.float()
    composite = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w.float()).bfloat16()
    fused = fused_rms_norm(x, w, cfg.norm_eps)
    q = torch.randn(2, cfg.num_heads, 2048, cfg.head_dim, device=device, generator=g).bfloat16()
    k, v = (torch.randn(2, cfg.num_kv_heads, 3000, cfg.head_dim, device=device, generator=g).bfloat16()
            for _ in range(2))
    groups = cfg.num_heads // cfg.num_kv_heads
    gqa = attend(q, k, v)
    repeated = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1))
    rows = chunking_rows(cfg, device, g)
    return rows + [("RMSNorm fused vs official composite", None,
             f"{(fused != composite).float().mean().item():.2e} of bf16 elements differ"),
            ("attention, ours (GQA K/V) vs official layout (repeated K/V)", None,
             f"{(gqa != repeated).float().mean().item():.2e} of bf16 elements differ")]


def matmul_rows(cfg, tokens, chunk, device):
    rows_q, blocks = blocks_of(tokens, chunk)
    rows_in = 2 * rows_q
    x = torch.randn(rows_in, cfg.width, device=device, dtype=torch.bfloat16)
    w = torch.randn(cfg.mlp_hidden, cfg.width, device=device) * 0.02
    flops = 2 * rows_in * cfg.width * cfg.mlp_hidden
    # per step: q, k, v, o (width x width, k/v narrower) + gate, up, down (width x mlp_hidden), per block
    proj = (2 * cfg.width * cfg.width + 2 * cfg.width * cfg.num_kv_heads * cfg.head_dim
            + 3 * cfg.width * cfg.mlp_hidden) / (cfg.width * cfg.mlp_hidden)
    bf16 = torch.nn.Linear(cfg.width, cfg.mlp_hidden, bias=False, device=device, dtype=torch.bfloat16)
    stored, scale = quantize_scaled(w, torch.float8_e4m3fn)
    variants = [("bf16 weights", bf16)]
    for name, cls in (("fp8 storage, bf16 matmul", ScaledCastLinear), ("fp8 matmul (_scaled_mm)", Fp8MatmulLinear)):
        layer = cls(cfg.width, cfg.mlp_hidden, bias=False, device=device)
        layer.weight = torch.nn.Parameter(stored, requires_grad=False)
        layer.scale_weight.data.copy_(scale)
        variants.append((name, layer))
    with torch.no_grad():
        bf16.weight.copy_(w)
        want = bf16(x).float()
        rows = []
        for name, layer in variants:
            try:
                ms = timed_ms(lambda layer=layer: layer(x))
                err = ((layer(x).float() - want).norm() / want.norm()).item()
            except Exception as e:  # noqa: BLE001
                rows.append((f"MLP projection, {name}", None, str(e).splitlines()[0][:70]))
                continue
            rows.append((f"MLP projection, {name}", ms, f"{flops / ms / 1e9:.0f} TFLOP/s; rel err {err:.1e}; "
                         f"{ms * proj * blocks * cfg.depth / 1e3:.2f} s per step (all projections)"))
    return rows


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="720p5,480p5")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--config", default="full", choices=sorted(CONFIGS))
    p.add_argument("--sweep", default="720p5", help="cases whose every step shape is timed (flash vs cuDNN); '' = none")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("probe_kernels.py times CUDA kernels: no CUDA device is visible (--device cpu only checks it runs)")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    cfg = CONFIGS[args.config]
    chunk = auto_chunk_tokens(cfg)
    out = []
    for case in args.cases.split(","):
        pn, frames = NAMED_CASES[case]
        schedule = build_schedule(pn, "16:9", frames)
        tokens, context = largest_step(schedule)
        out += [f"### {case}: largest step {tokens} query tokens, {context} context tokens, query blocks of at most {chunk} ({blocks_of(tokens, chunk)[0]} here)",
                "", "| kernel | ms per call | notes |", "|---|---|---|"]
        rows = (attention_rows(cfg, tokens, context, chunk, device) + dispatch_rows(cfg, tokens, context, chunk, device)
                + matmul_rows(cfg, tokens, chunk, device))
        if case in args.sweep.split(","):
            rows += sweep_rows(cfg, schedule, chunk, device) + rounding_rows(cfg, device)
        for name, ms, note in rows:
            out.append(f"| {name} | {'-' if ms is None else f'{ms:.2f}'} | {note} |")
        out.append("")
        print("\n".join(out[-14:]), file=sys.stderr, flush=True)
    out.append(machine_line(device))
    text = "\n".join(out)
    print(text)
    return text


if __name__ == "__main__":
    main()
