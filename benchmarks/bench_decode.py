"""Tokenizer decode: peak memory and time vs latent chunk size and frame count (random weights).

Chunked decoding with conv caches is exact, so the chunk size trades peak memory for speed only.
CPU: the released channel widths ('full', 96..384) or a narrow 'mid' model at a small spatial size;
CUDA: the real 720p/480p latent grid. Prints a markdown table with the estimate next to the measurement.

    python benchmarks/bench_decode.py --device cpu --config full --cells 2x3 --latents 5,9
    python benchmarks/bench_decode.py --device cuda --config full --cells 45x80 --latents 21 --chunks official,2,4,8,all

With ``--official PATH`` (an official checkout) the official tokenizer decodes the same latents with the same
weights (``vae.decode(codes, slice=True)``, in bf16 under autocast on CUDA as its scripts run it): one more row,
and a note with the time ratio and the largest difference from ours (fp32 on a CPU: equal up to float rounding).
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from infinitystar.memory import measure_peak_bytes  # noqa: E402
from infinitystar.schedule import build_schedule  # noqa: E402
from infinitystar.vae import VaeConfig, VideoTokenizer, estimate_decode_memory  # noqa: E402

CONFIGS = {"full": VaeConfig(), "mid": VaeConfig(block_out_channels=(32, 64, 128, 128, 128))}
COLUMNS = ["latent T", "frames", "grid", "chunk", "time s", "peak GB", "est. GB", "est./peak"]


def _chunk(text: str, latents: int) -> int | None:
    return None if text == "official" else latents if text == "all" else int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--config", default="mid", choices=sorted(CONFIGS))
    p.add_argument("--cells", default="2x3", help="latent grid HxW in 16-px cells (45x80 = 720p, 30x53 = 480p)")
    p.add_argument("--latents", default="5,9", help="comma list of latent frame counts (21 = 5 s, 41 = 10 s)")
    p.add_argument("--chunks", default="official,4,all", help="comma list: official (3,2,2..), N, all")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="decode dtype (default bf16 on CUDA)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--official", default=None, metavar="PATH",
                   help="official InfinityStar checkout: decode the same latents with its tokenizer too")
    p.add_argument("--warmup", action="store_true",
                   help="one small untimed decode per implementation first (CUDA context, cuDNN handles)")
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.cells.lower().split("x"))
    if device.type == "cpu" and h * w > 64:
        raise SystemExit("on a CPU keep the grid small (e.g. --cells 2x3); the real 45x80 grid is for a GPU")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}[args.dtype]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = CONFIGS[args.config]
    torch.manual_seed(0)
    tok = VideoTokenizer(cfg, device=device).eval().to(dtype)
    theirs = _official_decoder(args, tok, device, dtype) if args.official else None
    if args.warmup:
        small = torch.zeros(1, 64, 1, min(h, 2), min(w, 2), device=device)
        tok.decode(small)
        if theirs is not None:
            theirs(small)
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    notes = []
    for latents in (int(t) for t in args.latents.split(",")):
        codes = torch.randn(1, 64, latents, h, w, device=device) * 0.3
        ours_official_plan = None
        for text in args.chunks.split(","):
            chunk = _chunk(text.strip(), latents)
            out, took, peak = _timed_decode(lambda c=chunk, z=codes: tok.decode(z, chunk_latents=c), device)
            est = estimate_decode_memory(cfg, codes.shape, chunk, dtype)
            rows.append(f"| {latents} | {out.shape[2]} | {h}x{w} | {text} | {took:.2f} | {peak / 1e9:.4f} | "
                        f"{est / 1e9:.4f} | {est / max(peak, 1):.2f} |")
            if chunk is None and theirs is not None:  # kept for the comparison below
                ours_official_plan = (out, took)
            del out
        if theirs is not None:
            ref, took, peak = _timed_decode(lambda z=codes: theirs(z), device)
            rows.append(f"| {latents} | {ref.shape[2]} | {h}x{w} | official code | {took:.2f} | {peak / 1e9:.4f} "
                        "| - | - |")
            if ours_official_plan is None:  # compare with ours on the same (official) latent plan
                ours_official_plan = _timed_decode(lambda z=codes: tok.decode(z), device)[:2]
            out, ours_took = ours_official_plan
            diff = (out.float() - ref.float()).abs().max().item()
            notes.append(f"{latents} latents: the official code {took:.2f} s, ours (official plan) {ours_took:.2f} s: "
                         f"{took / ours_took:.2f}x; largest |ours - official| {diff:.2e} (raw RGB, about -1..1)")
            del ref, out
    where = ("CPU peak: live tensor bytes, times include the profiler; CUDA: max_memory_allocated above the "
             "weights")
    text = "\n".join(rows) + (f"\n\nconfig {args.config} {cfg.block_out_channels}, {dtype}, {device} ({where})")
    if notes:
        text += "\n" + "\n".join(notes)
    print(text)
    return text


def _official_decoder(args, tok, device, dtype):
    """codes -> raw RGB by the official tokenizer holding ``tok``'s weights, decoding as the official scripts do."""
    import official

    if args.config != "full":
        raise SystemExit("--official needs --config full: the official tokenizer's channel widths are fixed")
    mod = official.import_official(args.official)
    bf16 = dtype == torch.bfloat16  # only the tokenizer settings of these arguments matter
    oargs = official.official_args(mod, "0.90M", 81, bf16, build_schedule("0.90M", "16:9", 81))
    state = {k: v.float().cpu() for k, v in tok.state_dict().items()}  # fp32 weights: autocast runs them in bf16
    return functools.partial(official.official_decode, official.official_tokenizer(mod, oargs, state).to(device),
                             bf16=bf16)


def _timed_decode(fn, device):
    """(output, seconds, peak bytes) of one decode."""
    start = time.perf_counter()
    out, peak = measure_peak_bytes(fn, device)
    return out, time.perf_counter() - start, peak


if __name__ == "__main__":
    main()
