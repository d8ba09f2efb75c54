"""Generation speed and peak memory of our sampler, optionally next to the official code, same settings.

Random weights cost the same as the released ones, so no checkpoint is needed. ``--config full``
(the 8.77B model) runs on a GPU only; ``--config mid`` (4 blocks, width 512, heads 8/2) runs anywhere
and gives ours/official ratios on a CPU. Prints a markdown table per run.

    python benchmarks/bench_generate.py --device cuda --config full --cases 720p5,480p5,480p10 --weights fp8
    python benchmarks/bench_generate.py --device cpu --config mid --official /path/to/InfinityStar
    python benchmarks/bench_generate.py --device cuda --config full --cases 480p5 --official PATH --parity

``--parity`` (with ``--official``) runs the official sampler free, then ours teacher-forced with the
bits it drew, and checks every step's logits against its (relative L2 error, benchmarks/parity.py);
it exits with status 1 when a step exceeds ``--parity-tol``.

Columns: total s (text step + every AR step, no decode), s/step of the steps of the three largest
scales, visual tokens per second (one CFG branch, repetitions counted), peak memory (CUDA:
``max_memory_allocated`` with the weights; CPU: peak live tensor bytes of the run, weights excluded,
measured in a second, profiled run), and ours/official ratios.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_table import COLUMNS, Result, format_table, graphs_line, machine_line  # noqa: E402,F401
from official import STANDIN_KERNELS  # noqa: E402  (the official code itself is imported only with --official)
from step_timing import StepClock, kernel_profile, step_time_buckets, wrap_head  # noqa: E402

from infinitystar import attention, gguf  # noqa: E402
from infinitystar.attention import BACKENDS  # noqa: E402
from infinitystar.checkpoint import transformer_storage  # noqa: E402
from infinitystar.config import TRANSFORMER_PRESETS, TransformerConfig  # noqa: E402
from infinitystar.cuda_graphs import GRAPH_MAX_TOKENS, release_step_graphs, step_graphs  # noqa: E402
from infinitystar.memory import estimate_sampling_memory, measure_peak_bytes  # noqa: E402
from infinitystar.ops import cast, dequantized, quantize_scaled, scaled_cast, scaled_fp8_matmul  # noqa: E402
from infinitystar.pipeline import OFFLOAD_KV_CHOICES  # noqa: E402
from infinitystar.sampler import TextCondition, cuda_index, sample  # noqa: E402
from infinitystar.schedule import build_schedule  # noqa: E402
from infinitystar.transformer import InfinityStarTransformer  # noqa: E402

MID = TransformerConfig(depth=4, block_chunks=2, width=512, num_heads=8, num_kv_heads=2, mlp_hidden=2048,
                        text_channels=2048)
CONFIGS = {"full": TRANSFORMER_PRESETS["8b"], "mid": MID, "tiny": TRANSFORMER_PRESETS["tiny"]}
INTERACT = 0  # "frames" of a case that is one InfinityStar-Interact clip (after a random 21-frame context)
NAMED_CASES = {"720p5": ("720p", 81), "480p5": ("480p", 81), "480p10": ("480p", 161), "mid5": ("0.06M", 81),
               "mid10": ("0.06M", 161), "interact480": ("480p", INTERACT), "interact_mid": ("0.06M", INTERACT)}
DEFAULT_CASES = {"full": "720p5,480p5,480p10", "mid": "mid5", "tiny": "mid5"}
WEIGHT_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "bf16": torch.bfloat16,
                 "fp32": torch.float32, "gguf_q8_0": torch.uint8, "gguf_q6_k": torch.uint8, "gguf_q4_k": torch.uint8}
GGUF_TYPES = {"gguf_q8_0": "Q8_0", "gguf_q6_k": "Q6_K", "gguf_q4_k": "Q4_K"}  # GGUF blocks (uint8 storage)
TEXT_TOKENS = 64


def parse_cases(text: str) -> list[tuple[str, str, int]]:
    """'720p5,480p10' or 'PN:FRAMES' items -> (name, pn, frames)."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if item in NAMED_CASES:
            out.append((item, *NAMED_CASES[item]))
        elif ":" in item:
            pn, frames = item.split(":")
            out.append((item, pn, int(frames)))
        else:
            raise SystemExit(f"unknown case {item!r}; use {', '.join(NAMED_CASES)} or PN:FRAMES (e.g. 0.25M:81)")
    return out


def build_model(config: TransformerConfig, device: torch.device, weights: torch.dtype, seed: int,
                fp8_matmul: bool = False, gguf_type: str | None = None):
    """Random model in the official precision layout, each tensor made directly in its stored dtype (``gguf_type``:
    the blocks' matmul weights quantized to that GGUF type, as a converted file loads)."""
    ops = gguf.ops if gguf_type else cast
    if weights == torch.float8_e4m3fn:  # e4m3fn blocks are stored scaled, as the loaders store them
        ops = scaled_fp8_matmul if fp8_matmul else scaled_cast
    with torch.device("meta"):
        model = InfinityStarTransformer(config, ops=ops)
    gen = torch.Generator(device).manual_seed(seed)
    stored = transformer_storage(weights)  # fp32 embeddings/heads; fp8 only for matmul weights, norms bf16
    for mname, module in model.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is None or (pname == "scale_weight" and not module._parameters[pname].is_meta):
                continue  # (a scale is set with its weight, below)
            if pname == "scale_weight":  # Linears left unscaled (fp32 modules)
                module._parameters[pname] = torch.nn.Parameter(torch.ones((), device=device), requires_grad=False)
                continue
            dtype = stored(f"{mname}.{pname}" if mname else pname, p)
            work = torch.float32 if dtype == torch.float32 or device.type == "cpu" else torch.bfloat16
            t = torch.empty(p.shape, device=device, dtype=work)
            if pname == "weight" and p.dim() == 1:
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02, generator=gen)
            if dtype == torch.float8_e4m3fn and "scale_weight" in module._parameters:
                t, scale = quantize_scaled(t, dtype)
                module._parameters["scale_weight"] = torch.nn.Parameter(scale.to(device), requires_grad=False)
            if gguf_type and dtype == torch.uint8:  # a block's matmul weight
                name = gguf.written_type(gguf_type, t.shape[-1])
                module.gguf_type = gguf.QUANT_IDS[name]
                t = gguf.quantize(t, name)
            module._parameters[pname] = torch.nn.Parameter(t.to(dtype), requires_grad=False)
    return model.eval()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tail_indices(schedule) -> list[int]:
    """Indices of the steps of the three largest scales of the last clip (step durations list)."""
    last = {s.si for s in schedule.steps[-1:]}
    largest = set(range(max(last) - 2, max(last) + 1))
    return [i for i, s in enumerate(schedule.steps) if s.si in largest]


def first_run_s(run, device) -> float:
    """Wall time of the warm-up run (--warmup): the first generation in a process pays one-off costs (cuDNN's
    execution plans, cuBLAS set-up, the allocator growing); the table times the second, as a ComfyUI session does
    its later videos, and the notes keep both."""
    _sync(device)
    start = time.perf_counter()
    run()
    _sync(device)
    took = time.perf_counter() - start
    gc.collect()  # what the run left (the official model's K/V caches) goes back to the allocator, which keeps it
    return took


def timed(name, impl, run, schedule, device, clock, memory_run, warmup: bool = False) -> Result:
    """One timed run; ``warmup``: an untimed one first (its time in ``extra["first run"]``)."""
    first = first_run_s(run, device) if warmup else None
    clock.marks.clear()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    clock.mark()  # after the text step the first head call closes step 0; this mark opens the run
    codes = run()
    _sync(device)
    total = time.perf_counter() - start
    d = clock.durations()
    steps = d[1:] if len(d) == schedule.num_steps + 1 else d  # first interval holds the text step too
    tail = [steps[i] for i in _tail_indices(schedule) if i < len(steps)]
    tokens = sum(s.num_tokens for s in schedule.steps)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if peak is None and memory_run:
        _, peak = measure_peak_bytes(run, device)
    result = Result(name, impl, schedule.num_steps, total, sum(tail) / max(len(tail), 1), tokens / total, peak,
                    codes=codes.float().cpu())
    if len(steps) == schedule.num_steps:
        result.extra["by step size"] = step_time_buckets(steps, schedule)
    if first is not None:
        result.extra["first run"] = first
    return result


def _chunk(args):
    return None if args.chunk in ("0", "none") else ("auto" if args.chunk == "auto" else int(args.chunk))


def _text_features(config, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(TEXT_TOKENS, config.text_channels) * 0.5


def official_runner(official_mod, config, device, model, pn, frames, sched, bf16: bool, interact_clip: bool = False):
    """The official model on ``device`` with our model's weights (fp8 storage handed over as bf16);
    ``interact_clip``: built with the interact script's settings (``run_interact``); ``bf16`` then means the
    interact script's own precision, fp32 blocks under bf16 autocast."""
    import official

    state = dequantized(model.state_dict(), torch.bfloat16)  # the official code cannot store fp8
    oargs = (official.official_interact_args(official_mod, pn, sched, script_precision=bf16) if interact_clip
             else official.official_args(official_mod, pn, frames, bf16, sched))
    return official.OfficialRunner(official_mod, config, oargs, device, state, config.text_channels)


def _interact_inputs(sched, seed: int, device):
    """A random context (1, 64, 21, H, W) and first latent frame for an interact clip, and its prefix conditions."""
    from infinitystar import interact

    _, H, W = sched.scales[-1]
    gen = torch.Generator().manual_seed(seed)
    context = (torch.randn(1, 64, interact.CONTEXT_LATENTS, H, W, generator=gen) * 0.5).to(device)
    first = (torch.randn(1, 64, 1, H, W, generator=gen) * 0.5).to(device)
    return context, first, interact.conditions(context, first, sched)


def run_case(args, config, device, name, pn, frames, official_mod) -> list[Result]:
    from infinitystar import interact

    clip = frames == INTERACT
    if clip and args.cuda_graphs:
        raise SystemExit(f"{name}: --cuda-graphs does not replay interact steps (prefix conditions)")
    sched = interact.clip_schedule(pn, "16:9") if clip else build_schedule(pn, "16:9", frames,
                                                                           num_scales=args.num_scales)
    context, first, conds = _interact_inputs(sched, args.seed, device) if clip else (None, None, ())
    extra_tokens = interact.condition_tokens(sched) if clip else 0
    settings = dict(guidance=interact.GUIDANCE, tau_image=interact.TAU, tau_video=interact.TAU) if clip else {}
    weights = WEIGHT_DTYPES[args.weights]
    cond = _text_features(config, args.seed)
    model = build_model(config, device, weights, args.seed, args.fp8_matmul, GGUF_TYPES.get(args.weights)
                        ).use_fused_norms(args.norms == "fused")
    chunk = _chunk(args)
    compute = _compute_dtype(device, args)
    clock = StepClock(device)
    restore = wrap_head(model, "head_logits", clock)
    sync_warnings: list = []
    offloaded = [0, 0]  # bytes, layers

    def ours():
        with warnings.catch_warnings(record=True) as caught:
            if args.check_syncs and device.type == "cuda":
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            try:
                out = sample(model, TextCondition(cond), sched, seed=args.seed, generator_device=device.type,
                             compute_dtype=compute, attn_backend=args.attention, chunk_tokens=chunk,
                             compile=args.compile, offload_kv=OFFLOAD_KV_CHOICES[args.offload_kv],
                             cuda_graphs=_graphs(model, args), conditions=conds, **settings)
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
        sync_warnings[:] = [w for w in caught if "synchroniz" in str(w.message).lower()]
        for w in sync_warnings:  # where each one comes from, for the log
            print(f"host-device sync at {w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}", file=sys.stderr)
        offloaded[:] = [out.kv_offloaded_bytes, out.kv_offloaded_layers]
        return out.summed_codes

    results = [timed(name, "ours", ours, sched, device, clock, not args.no_memory, args.warmup)]
    restore()
    if args.profile:
        results[0].extra["profile"] = kernel_profile(ours, device, model=model, schedule=sched)
    results[0].estimate = estimate_sampling_memory(config, sched, dtype=compute, text_tokens=TEXT_TOKENS + extra_tokens,
                                                   chunk_tokens=chunk, offload_kv=offloaded[1], weight_dtype=weights)
    if device.type == "cuda":  # CUDA peaks count the resident weights too
        results[0].estimate += sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if offloaded[0]:
        results[0].extra["kv offload"] = (f"{offloaded[0] / 1e9:.3g} GB of reference K/V ({offloaded[1]} of "
                                          f"{config.depth} layers) kept in host memory")
    if args.check_syncs and device.type == "cuda":
        results[0].extra["syncs"] = len(sync_warnings)
    if args.cuda_graphs:
        results[0].extra["cuda graphs"] = graphs_line(step_graphs(model, args.cuda_graphs), sched)
        release_step_graphs(model)
    if official_mod is not None:
        runner = official_runner(official_mod, config, device, model, pn, frames, sched, _official_bf16(device, args),
                                 interact_clip=clip)
        del model
        clock = StepClock(device)
        restore = wrap_head(runner.model, "get_logits_during_infer", clock)

        def official_run():
            if clip:  # its codes start with the context's last frame
                return runner.run_interact(cond, args.seed, context, first, sched.h_div_w)[0][:, :, 1:]
            return runner.run(cond, args.seed)

        try:
            results.append(timed(name, "official", official_run, sched, device, clock, not args.no_memory,
                                 args.warmup))
        except torch.OutOfMemoryError as e:  # keep our row (the official code needs ~65 GB at 720p)
            results[0].extra["official"] = f"official code out of memory ({str(e).splitlines()[0]})"
        restore()
    return results


def parity_case(args, config, device, name, pn, frames, official_mod):
    """Official free run, then ours teacher-forced with its bits; returns a parity.ParityReport."""
    import parity
    import parity_trace

    if frames == INTERACT:
        raise SystemExit(f"{name}: --parity compares whole generations; interact clips are compared on a CPU by "
                         "tests/unit/test_interact.py")
    sched = build_schedule(pn, "16:9", frames)
    cond = _text_features(config, args.seed)
    model = build_model(config, device, WEIGHT_DTYPES[args.weights], args.seed, args.fp8_matmul).use_fused_norms(
        args.norms == "fused")
    ours_dtype, official_bf16 = _compute_dtype(device, args), _official_bf16(device, args)
    runner = official_runner(official_mod, config, device, model, pn, frames, sched, official_bf16)
    model.to("cpu")  # room for the official run (a no-op on a CPU)
    _empty_cache(device)
    start = time.perf_counter()
    steps = args.parity_trace  # --parity-trace: record the first steps of both runs (parity_trace.py)
    with parity_trace.trace_official(runner.model, steps) if steps else contextlib.nullcontext() as ref_rec:
        logits, bits = parity.run_official(runner, cond, args.seed, sched)
    t_official = time.perf_counter() - start
    floor = _kernel_floor(args, runner, cond, sched, logits, bits, name) if args.parity_floor else None
    del runner
    gc.collect()  # the official model holds its K/V caches; free them before ours runs
    _empty_cache(device)
    model.to(device)
    report = parity.ParityReport(name, args.parity_tol, floor=floor)

    def progress(e):
        print(f"  {name} step {e.index:3d} (clip {e.clip}, scale {e.si:2d}, rep {e.rep}, {e.tokens:6d} tokens): "
              f"rel L2 cond {e.cond:.3e} uncond {e.uncond:.3e}, draws agree {100 * e.draws_agree:.3f} %",
              file=sys.stderr, flush=True)

    start = time.perf_counter()
    with parity_trace.trace_ours(model, steps, ref_rec.units) if steps else contextlib.nullcontext() as our_rec:
        parity.compare_ours(model, cond, sched, args.seed, logits, bits, report, progress=progress,
                            generator_device=device.type, compute_dtype=ours_dtype,
                            attn_backend=args.attention, chunk_tokens=_chunk(args), compile=args.compile,
                            cuda_graphs=_graphs(model, args))
    t_ours = time.perf_counter() - start
    if ref_rec is not None:
        report.notes += parity_trace.compare(our_rec, ref_rec)
    names = {dtype: name for name, dtype in WEIGHT_DTYPES.items()}
    report.notes.append(f"precision: ours {names[ours_dtype]}, official {'bf16' if official_bf16 else 'fp32'} "
                        f"(weights {args.weights})")
    report.notes.append(f"official free run {t_official:.1f} s (with capture), ours teacher-forced "
                        f"{t_ours:.1f} s (with comparison); {sched.num_steps} steps, pn {pn}, {frames} frames")
    return report


def _kernel_floor(args, runner, cond, sched, logits, bits, name):
    """--parity-floor KERNEL: the official run again on KERNEL, replaying the reference draws (parity.kernel_floor)."""
    import official
    import parity

    floor = parity.ParityReport(f"{name} official {args.parity_floor} vs official {args.official_attention}",
                                args.parity_tol)
    saved, official.STANDIN_KERNEL = official.STANDIN_KERNEL, args.parity_floor
    start = time.perf_counter()
    try:
        parity.kernel_floor(runner, cond, args.seed, sched, logits, bits, floor)
        floor.notes.append(f"official teacher-forced run {time.perf_counter() - start:.1f} s")
    except Exception as e:  # noqa: BLE001 — a diagnostic: its failure (no such kernel here, say) keeps the parity
        floor.steps.clear()
        floor.notes.append(f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        print(f"kernel floor failed: {e!r}", file=sys.stderr, flush=True)
    finally:
        official.STANDIN_KERNEL = saved
    return floor


def _graphs(model, args):
    """``--cuda-graphs N``: the model's StepGraphs for steps of up to N tokens (kept for the timed run after
    --warmup), else False."""
    return step_graphs(model, args.cuda_graphs) if args.cuda_graphs else False


def _compute_dtype(device, args):
    """bf16 blocks on CUDA (the official layout), and on a CPU with --cpu-bf16; fp32 otherwise (and with
    --parity-fp32 ours)."""
    if args.parity_fp32 in ("ours", "both"):
        return torch.float32
    return torch.bfloat16 if device.type == "cuda" or args.cpu_bf16 else torch.float32


def _official_bf16(device, args) -> bool:
    """The official code under bf16 autocast with bf16 blocks (its scripts' setting) unless --parity-fp32 official."""
    return (device.type == "cuda" or args.cpu_bf16) and args.parity_fp32 not in ("official", "both")


def _empty_cache(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _init_cuda(device):
    """Create the CUDA context and the cuBLAS/SDPA handles before anything is timed."""
    if device.type != "cuda":
        return
    x = torch.randn(2, 4, 256, 64, device=device, dtype=torch.bfloat16)
    torch.nn.functional.scaled_dot_product_attention(x, x, x)
    (x[0, 0] @ x[0, 0].T).float().sum().item()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--config", default="mid", choices=sorted(CONFIGS))
    p.add_argument("--cases", default=None, help="comma list: 720p5,480p5,480p10,mid5,mid10 or PN:FRAMES")
    p.add_argument("--weights", default=None, choices=sorted(WEIGHT_DTYPES),
                   help="block weight storage (default fp8 on CUDA, fp32 on CPU)")
    p.add_argument("--official", default=None, help="path to an official InfinityStar checkout to time as well")
    p.add_argument("--chunk", default="auto", help="chunk_tokens of our sampler: auto, 0/none, or a token count")
    p.add_argument("--attention", default="auto", choices=list(BACKENDS),
                   help="auto = flash-attn when installed, else SDPA (its own pick); cudnn / sdpa_flash = cuDNN's / "
                        "PyTorch's FlashAttention-2 kernel alone (SDPA's default kernels for a shape it refuses)")
    p.add_argument("--profile", action="store_true",
                   help="CUDA: one more run of ours under torch.profiler; prints GPU time by kernel kind and the "
                        "top kernels")
    p.add_argument("--official-attention", default="flash", choices=list(STANDIN_KERNELS),
                   help="the official code's attention on CUDA (a flash_attn stand-in when flash-attn is not "
                        "installed): flash = PyTorch's FlashAttention-2, the kernel family of the flash-attn 2 the "
                        "official code calls; sdpa = SDPA's own pick (cuDNN on Hopper with torch 2.11)")
    p.add_argument("--norms", default="fused", choices=["fused", "composite"],
                   help="CUDA half-precision RMSNorm: PyTorch's fused kernel, or the official composite (fp32 "
                        "statistics, as the official code computes it without flash-attn)")
    p.add_argument("--compile", action="store_true", help="torch.compile our blocks' parts around attention")
    p.add_argument("--cuda-graphs", type=int, nargs="?", const=GRAPH_MAX_TOKENS, default=0, metavar="N",
                   help="CUDA: replay the steps of up to N tokens (default %(const)s) as CUDA graphs, captured at a "
                        "shape's second sight (with --warmup the timed run replays them all)")
    p.add_argument("--fp8-matmul", action="store_true",
                   help="multiply the fp8 (e4m3fn) blocks in fp8 (torch._scaled_mm; not the official numerics)")
    p.add_argument("--offload-kv", default="auto", choices=list(OFFLOAD_KV_CHOICES),
                   help="keep reference K/V in host memory: auto = only for as many layers as the run needs to fit")
    p.add_argument("--memory-cap-gb", type=float, default=None,
                   help="CUDA: cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction); a "
                        "case that needs more fails with out of memory, which the table notes")
    p.add_argument("--num-scales", type=int, default=None, help="truncate each clip's pyramid (smoke runs)")
    p.add_argument("--seed", type=int, default=41)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--warmup", action="store_true", help="run each implementation once before timing (the notes give that first run's time too)")
    p.add_argument("--no-memory", action="store_true", help="CPU: skip the profiled memory run")
    p.add_argument("--check-syncs", action="store_true", help="CUDA: count host-device syncs in our step loop")
    p.add_argument("--parity", action="store_true",
                   help="instead of timing: compare our teacher-forced per-step logits with the official ones "
                        "(needs --official; exits 1 when a step is above --parity-tol)")
    p.add_argument("--parity-tol", type=float, default=None,
                   help="largest relative L2 error of a step's logits (default 2e-2)")
    p.add_argument("--parity-floor", default=None, choices=list(STANDIN_KERNELS), metavar="KERNEL",
                   help="for --parity: also run the official code a second time on this attention kernel (flash, "
                        "sdpa, cudnn), teacher-forced with its own first run's draws, and report how far its logits move "
                        "from its first run's: the parity check's noise floor (does not change PASS/FAIL)")
    p.add_argument("--parity-csv", default=None, help="write every step's errors to this CSV file")
    p.add_argument("--parity-trace", type=int, default=0, metavar="N",
                   help="for --parity: also compare the first N steps' inputs (code accumulation, word_embed) and "
                        "block-chunk outputs, and report the first tensor where the two runs part (parity_trace.py)")
    p.add_argument("--cpu-bf16", action="store_true",
                   help="CPU: bf16 blocks for ours and bf16 weights + CPU autocast for the official code, as on a GPU "
                        "(its GPU-only autocast guards honoured: for --parity, the GPU's bf16 rounding without a GPU)")
    p.add_argument("--parity-fp32", default=None, choices=["ours", "official", "both"],
                   help="for --parity: run this side in fp32 instead of bf16 (TF32 off). In fp32 the two agree bit "
                        "for bit (CPU runs, golden tests), so this measures the other side's own bf16 error; "
                        "both = the method check at full size")
    return p.parse_args(argv)


def _setup(argv):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible; use --device cpu --config mid")
    if args.config == "full" and device.type != "cuda":
        raise SystemExit("the full 8.77B configuration needs a GPU (35 GB in fp32, 8.8 GB in fp8); "
                         "on a CPU use --config mid")
    if args.official and args.num_scales:
        raise SystemExit("--num-scales cannot be applied to the official code; drop it with --official")
    if args.parity and not args.official:
        raise SystemExit("--parity compares with the official code: give --official PATH")
    if args.parity_trace and not args.parity:
        raise SystemExit("--parity-trace is for --parity runs")
    if args.parity_floor and not args.parity:
        raise SystemExit("--parity-floor is for --parity runs")
    if args.parity_fp32 and not args.parity:
        raise SystemExit("--parity-fp32 is for --parity runs")
    if args.parity_fp32:  # an fp32 reference means fp32 matmuls: no TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if args.cuda_graphs and device.type != "cuda":
        raise SystemExit("--cuda-graphs needs --device cuda")
    if args.cpu_bf16 and device.type != "cpu":
        raise SystemExit("--cpu-bf16 is for --device cpu (CUDA runs are bf16 already)")
    args.weights = args.weights or ("fp8" if device.type == "cuda" else "bf16" if args.cpu_bf16 else "fp32")
    if args.fp8_matmul and args.weights != "fp8":
        raise SystemExit("--fp8-matmul multiplies fp8 e4m3fn blocks: add --weights fp8")
    if args.weights in GGUF_TYPES and (args.official or args.parity):
        raise SystemExit("GGUF weights are ours alone: compare with the official code on --weights bf16 or fp8")
    official_mod = None
    if args.official and device.type == "cuda":
        # before CUDA starts: the official code's allocations fragment PyTorch's caching allocator (on an H100 its
        # 720p run failed with 62.2 GiB allocated and 12.5 GiB reserved but unused, of 79.2 GiB; its peak is 71.2
        # GiB); expandable segments let it fit, and both sides run on the same allocator in the one process
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if args.attention == "auto":  # after the allocator setting (this asks the GPU), before a flash_attn stand-in
        from infinitystar.attention import auto_backend

        args.attention = auto_backend(device)
    if args.official:
        import official

        official_mod = official.import_official(args.official)
        official.STANDIN_KERNEL = args.official_attention
    _init_cuda(device)
    if args.memory_cap_gb:
        if device.type != "cuda":
            raise SystemExit("--memory-cap-gb needs --device cuda (CPU peaks are measured, not capped)")
        index = cuda_index(device)  # set_per_process_memory_fraction refuses a device without an index
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gb * 1e9 / total), index)
    return args, device, CONFIGS[args.config], official_mod


def _settings_line(args, config, device) -> str:
    cap = f", memory cap {args.memory_cap_gb:g} GB" if args.memory_cap_gb else ""
    cap += f", official attention {args.official_attention}" if args.official else ""
    if device.type == "cuda" and args.attention == "sdpa" and attention.SMALL_CALL_WORK:  # "auto" is resolved
        side = math.isqrt(attention.SMALL_CALL_WORK)
        cap += f", sdpa: FlashAttention-2 under {side}x{side}-token calls"
    alloc = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    cap += f", PYTORCH_CUDA_ALLOC_CONF={alloc}" if alloc and device.type == "cuda" else ""
    return (f"config {args.config} ({config.depth} blocks, width {config.width}, heads {config.num_heads}/"
            f"{config.num_kv_heads}), weights {args.weights}, attention {args.attention}, chunk {args.chunk}, "
            f"compile {args.compile}, cuda graphs {args.cuda_graphs or 'off'}, fp8 matmul {args.fp8_matmul}, offload_kv {args.offload_kv}, norms {args.norms}{cap}; "
            f"{machine_line(device)}")


def run_parity(argv=None):
    """``--parity`` runs: returns (printed text, list of parity.ParityReport)."""
    return _parity_runs(*_setup(argv))


def _parity_runs(args, device, config, official_mod):
    import parity

    args.parity_tol = parity.DEFAULT_TOL if args.parity_tol is None else args.parity_tol
    reports = []
    for name, pn, frames in parse_cases(args.cases or DEFAULT_CASES[args.config]):
        reports.append(parity_case(args, config, device, name, pn, frames, official_mod))
        _empty_cache(device)
    if args.parity_csv:
        parity.write_csv(reports, args.parity_csv)
    text = "\n\n".join(parity.format_report(r) for r in reports) + "\n\n" + _settings_line(args, config, device)
    print(text, flush=True)
    return text, reports


def main(argv=None) -> str:
    args, device, config, official_mod = _setup(argv)
    if args.parity:
        text, reports = _parity_runs(args, device, config, official_mod)
        if not all(r.passed for r in reports):
            raise SystemExit(1)
        return text
    results, notes = [], [_settings_line(args, config, device)]
    for name, pn, frames in parse_cases(args.cases or DEFAULT_CASES[args.config]):
        try:
            results.extend(run_case(args, config, device, name, pn, frames, official_mod))
        except torch.OutOfMemoryError as e:  # keep the other cases' rows (the official code at 720p, say)
            notes.append(f"{name}: out of memory ({str(e).splitlines()[0]})")
            print(notes[-1], file=sys.stderr, flush=True)
        gc.collect()
        _empty_cache(device)
        if results:  # partial table in the log, in case a later case is killed
            print(format_table(results), file=sys.stderr, flush=True)
    table = format_table(results)
    notes += [f"{r.case}: {r.extra[k]}" for r in results for k in ("official", "kv offload", "cuda graphs", "profile")
              if k in r.extra]
    notes += [f"{r.case} {r.impl}, time by step size: {r.extra['by step size']}" for r in results
              if "by step size" in r.extra]
    notes += [f"{r.case} {r.impl}: first run {r.extra['first run']:.2f} s, the table's (second) run {r.total:.2f} s"
              for r in results if "first run" in r.extra]
    syncs = [f"{r.case}: {r.extra['syncs']}" for r in results if "syncs" in r.extra]
    if syncs:
        notes.append("host-device syncs in our step loop: " + ", ".join(syncs))
    text = table + "\n\n" + "\n".join(notes)
    print(text)
    return text


if __name__ == "__main__":
    main()
