"""The table that bench_generate.py prints: one row per case and implementation, and the machine line.

Kept apart from the runner so the GPU scripts (benchmarks/gpu/) can print the same machine line and
the tests can check the columns without building a model.
"""
from __future__ import annotations

import datetime
import platform
from dataclasses import dataclass, field

import torch

COLUMNS = ["case", "impl", "steps", "total s", "s/step (3 largest scales)", "tokens/s", "peak GB",
           "est. GB", "ours/official time", "same codes"]


@dataclass
class Result:
    case: str
    impl: str
    steps: int
    total: float
    tail_step: float
    tokens_per_s: float
    peak: int | None
    estimate: int | None = None
    codes: torch.Tensor | None = field(default=None, repr=False)
    extra: dict = field(default_factory=dict)


def graphs_line(graphs, schedule) -> str:
    """What the CUDA graphs did in the last generation: steps replayed, captured, eager; memory they hold."""
    c = graphs.counts
    failed = f"; {len(graphs.failed)} step shapes failed to capture ({next(iter(graphs.failed.values()))})" \
        if graphs.failed else ""
    off = f"; off: {graphs.off}" if graphs.off else ""
    # the graphs' pool keeps its temporaries reserved (not allocated): the allocated peak of the table misses them
    reserved = f"; peak reserved {torch.cuda.max_memory_reserved() / 1e9:.2f} GB" if torch.cuda.is_available() else ""
    return (f"{c['replayed']} of {schedule.num_steps} steps replayed ({c['captured']} captured in this run), "
            f"{c['eager']} eager; up to {graphs.max_tokens} tokens; {graphs.nbytes() / 1e9:.2f} GB of K/V homes and "
            f"static buffers held{reserved}{failed}{off}")


def format_table(results: list[Result]) -> str:
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    by_case = {}
    for r in results:
        by_case.setdefault(r.case, {})[r.impl] = r
    for r in results:
        other = by_case[r.case].get("official")
        ratio = same = ""
        if r.impl == "ours" and other is not None:
            ratio = f"{r.total / other.total:.2f}"
            diff = (r.codes - other.codes).abs().max().item() if r.codes.shape == other.codes.shape else float("inf")
            same = "yes" if diff == 0 else f"no (max diff {diff:.3g})"
        peak = "-" if r.peak is None else f"{r.peak / 1e9:.3f}"
        est = "-" if r.estimate is None else f"{r.estimate / 1e9:.3f}"
        rows.append(f"| {r.case} | {r.impl} | {r.steps} | {r.total:.2f} | {r.tail_step:.3f} | {r.tokens_per_s:,.0f} | "
                    f"{peak} | {est} | {ratio} | {same} |")
    return "\n".join(rows)


def machine_line(device: torch.device) -> str:
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}"
    return (f"{datetime.date.today()} · {what} · torch {torch.__version__} · threads {torch.get_num_threads()} · "
            f"{platform.system()}")
