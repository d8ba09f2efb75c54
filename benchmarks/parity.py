"""Teacher-forced per-step logits of our sampler against the official one (issue 7's parity check).

The official sampler runs free once. Every step's raw head output (``get_logits_during_infer``,
before 1/tau: (2, L, 2d) fp32, [cond, uncond]) is kept on the CPU, and so are the bits its one
``torch.multinomial`` call per step drew (spec §5.3: ``probs.view(-1, 2)`` of the whole step, so
the draw is the step's (1, t, h, w, d) bits in row-major order). Our sampler then runs with those
bits as teacher bits, so both implementations see the same inputs at every step, and each step's
logits are compared as they come out: relative L2 error ||ours - official|| / ||official||, per
guidance branch. Our own draws are compared too: with equal logits and the same seeded generator
they equal the official draws, which checks that the capture above is in the right order.
"""
from __future__ import annotations

import contextlib
import csv
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from infinitystar.sampler import TextCondition, sample
from infinitystar.schedule import Schedule

DEFAULT_TOL = 2e-2  # issue 7: relative L2 error of the per-step logits, bf16 on a GPU


@dataclass
class StepError:
    index: int
    clip: int
    si: int
    rep: int
    tokens: int
    cond: float  # relative L2 error of the conditional branch's logits
    uncond: float  # same for the unconditional branch
    draws_agree: float  # fraction of our drawn bits equal to the official draw of this step

    @property
    def worst(self) -> float:
        return max(self.cond, self.uncond)


@dataclass
class ParityReport:
    case: str
    tol: float
    steps: list[StepError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    floor: ParityReport | None = None  # --parity-floor: the official code against itself on another kernel

    @property
    def worst(self) -> StepError:
        return max(self.steps, key=lambda s: (s.worst if math.isfinite(s.worst) else math.inf))

    @property
    def failing(self) -> list[StepError]:
        return [s for s in self.steps if not s.worst <= self.tol]  # NaN counts as failing

    @property
    def passed(self) -> bool:
        return bool(self.steps) and not self.failing


def rel_l2(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref|| in float64; 0 when both are zero, inf when only ref is."""
    if ours.shape != ref.shape:
        raise ValueError(f"shapes differ: ours {tuple(ours.shape)}, official {tuple(ref.shape)}")
    ref64 = ref.detach().to("cpu", torch.float64)
    diff = torch.linalg.vector_norm(ours.detach().to("cpu", torch.float64) - ref64).item()
    den = torch.linalg.vector_norm(ref64).item()
    if den == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / den


@contextlib.contextmanager
def _patched(obj, attr: str, wrap: Callable[[Callable], Callable]):
    """``obj.attr`` replaced by ``wrap(original)`` while the block runs."""
    inner = getattr(obj, attr)
    setattr(obj, attr, wrap(inner))
    try:
        yield
    finally:
        setattr(obj, attr, inner)


@contextlib.contextmanager
def capture_multinomial(store: list):
    """Record every ``torch.multinomial`` output (as uint8 on the CPU) while the block runs."""
    def wrap(real):
        def spy(*args, **kwargs):
            out = real(*args, **kwargs)
            store.append(out.detach().to(torch.uint8).cpu())
            return out
        return spy

    with _patched(torch, "multinomial", wrap):
        yield store


@contextlib.contextmanager
def replay_multinomial(draws: Sequence[torch.Tensor]):
    """Make ``torch.multinomial`` return the recorded ``draws``, one per call and in order, while the block runs.

    The real call still runs first, so the generator advances exactly as in a free run; only its result is swapped
    for the recorded draw of the same size. This teacher-forces the official sampler itself, for the kernel floor
    below. Raises when a call wants another number of bits than was recorded, or more calls come than were recorded.
    """
    calls = iter(draws)

    def wrap(real):
        def replay(*args, **kwargs):
            out = real(*args, **kwargs)
            recorded = next(calls, None)
            if recorded is None:
                raise ValueError(f"replay: only {len(draws)} draws were recorded")
            if recorded.numel() != out.numel():
                raise ValueError(f"replay: the call draws {out.numel()} bits, the recorded draw has "
                                 f"{recorded.numel()}")
            return recorded.reshape(out.shape).to(out.device, out.dtype)
        return replay

    with _patched(torch, "multinomial", wrap):
        yield


@contextlib.contextmanager
def capture_calls(obj, attr: str, store: list):
    """Record a CPU fp32 copy of every output of ``obj.attr(...)`` while the block runs."""
    def wrap(inner):
        def spy(*args, **kwargs):
            out = inner(*args, **kwargs)
            store.append(out.detach().to("cpu", torch.float32, copy=True))
            return out
        return spy

    with _patched(obj, attr, wrap):
        yield store


def bits_per_step(draws: Sequence[torch.Tensor], schedule: Schedule) -> list[torch.Tensor]:
    """One multinomial output per step -> that step's (1, t, h, w, d) uint8 bits."""
    if len(draws) != schedule.num_steps:
        raise ValueError(f"captured {len(draws)} multinomial calls, the schedule has {schedule.num_steps} steps")
    out = []
    for draw, step in zip(draws, schedule.steps):
        shape = (1, step.t, step.h, step.w, step.d)
        if draw.numel() != math.prod(shape):
            raise ValueError(f"step {step.index}: draw of {draw.numel()} bits, expected {shape}")
        out.append(draw.reshape(shape))
    return out


def run_official(runner, cond: torch.Tensor, seed: int, schedule: Schedule):
    """Free-running official generation -> (per-step logits on CPU, per-step bits on CPU)."""
    logits: list[torch.Tensor] = []
    draws: list[torch.Tensor] = []
    with capture_calls(runner.model, "get_logits_during_infer", logits), capture_multinomial(draws):
        runner.run(cond, seed)
    if len(logits) != schedule.num_steps:
        raise ValueError(f"official code ran {len(logits)} head calls, the schedule has {schedule.num_steps} steps")
    return logits, bits_per_step(draws, schedule)


def _step_error(step, logits: torch.Tensor, ref: torch.Tensor, draws_agree: float) -> StepError:
    """One step's errors: each guidance branch's logits (row 0 cond, row 1 uncond) against the reference's."""
    return StepError(step.index, step.clip, step.si, step.rep, step.num_tokens, rel_l2(logits[0], ref[0]),
                     rel_l2(logits[1], ref[1]), draws_agree)


def kernel_floor(runner, cond: torch.Tensor, seed: int, schedule: Schedule, ref_logits: list,
                 ref_bits: list[torch.Tensor], report: ParityReport) -> ParityReport:
    """The official sampler again, teacher-forced with its own reference draws, against its reference logits.

    Run with another attention kernel (``official.STANDIN_KERNEL``), this is the noise floor of the parity check:
    how far the official code moves from itself when only the kernel's rounding changes. ``draws_agree`` is 1.0 by
    construction: the draws are replayed.
    """
    logits: list[torch.Tensor] = []
    with capture_calls(runner.model, "get_logits_during_infer", logits), replay_multinomial(ref_bits):
        runner.run(cond, seed)
    if len(logits) != schedule.num_steps:
        raise ValueError(f"official code ran {len(logits)} head calls, the schedule has {schedule.num_steps} steps")
    for step, ours, ref in zip(schedule.steps, logits, ref_logits):
        report.steps.append(_step_error(step, ours, ref, 1.0))
    return report


def compare_ours(model, cond: torch.Tensor, schedule: Schedule, seed: int, official_logits: list,
                 official_bits: list[torch.Tensor], report: ParityReport,
                 progress: Callable[[StepError], None] | None = None, **sample_kwargs) -> ParityReport:
    """Our sampler teacher-forced with the official bits; compares each step's logits on the fly.

    ``official_logits`` entries are dropped (set to None) once compared, so the CPU copy of a large
    run shrinks while ours runs.
    """

    def hook(rec):
        i = rec.step.index
        ref, official_logits[i] = official_logits[i], None
        ours = rec.logits.detach().to("cpu", torch.float32)
        agree = (rec.drawn.detach().cpu() == official_bits[i]).float().mean().item()
        err = _step_error(rec.step, ours, ref, agree)
        report.steps.append(err)
        if progress is not None:
            progress(err)

    sample(model, TextCondition(cond), schedule, seed=seed, teacher_bits=official_bits, step_hook=hook,
           **sample_kwargs)
    return report


def _ranked(steps: Sequence[StepError]) -> list[StepError]:
    """Steps by error, worst first (a NaN or infinite error first of all)."""
    return sorted(steps, key=lambda s: -s.worst if math.isfinite(s.worst) else -math.inf)


TABLE = ["step", "clip", "scale", "rep", "tokens", "rel L2 cond", "rel L2 uncond", "draws agree"]


def _row(s: StepError) -> str:
    return (f"| {s.index} | {s.clip} | {s.si} | {s.rep} | {s.tokens:,} | {s.cond:.3e} | {s.uncond:.3e} | "
            f"{100 * s.draws_agree:.3f} % |")


def format_report(report: ParityReport, worst: int = 8) -> str:
    """Summary line (PASS/FAIL), then the ``worst`` steps by error."""
    if not report.steps:
        return f"parity {report.case}: no steps compared: FAIL"
    w = report.worst
    same = sum(s.draws_agree == 1.0 for s in report.steps)
    mean_agree = sum(s.draws_agree for s in report.steps) / len(report.steps)
    lines = [
        f"parity {report.case}: max rel L2 {w.worst:.3e} at step {w.index} (clip {w.clip}, scale {w.si}, "
        f"rep {w.rep}, {w.tokens:,} tokens); {len(report.failing)}/{len(report.steps)} steps above "
        f"{report.tol:g}; our draws equal the official ones at {same}/{len(report.steps)} steps "
        f"(per-step mean {100 * mean_agree:.3f} % of bits): {'PASS' if report.passed else 'FAIL'}",
        *report.notes, *_floor_lines(report.floor), *_against_floor(report, report.floor), "",
        "| " + " | ".join(TABLE) + " |", "|" + "---|" * len(TABLE),
    ]
    ranked = _ranked(report.steps)
    lines += [_row(s) for s in ranked[:worst]]
    return "\n".join(lines)


def _floor_lines(floor: ParityReport | None) -> list[str]:
    if floor is None:
        return []
    if not floor.steps:
        return [f"floor {floor.case}: no steps compared", *floor.notes]
    w = floor.worst
    worst = _ranked(floor.steps)[:3]
    return [f"floor {floor.case}: max rel L2 {w.worst:.3e} at step {w.index} ({w.tokens:,} tokens); "
            f"{len(floor.failing)}/{len(floor.steps)} steps above {floor.tol:g} (the official code against itself, "
            f"teacher-forced with its own draws; worst steps "
            + ", ".join(f"{s.index}: {s.worst:.2e}" for s in worst) + ")", *floor.notes]


def _against_floor(report: ParityReport, floor: ParityReport | None) -> list[str]:
    """Our error step by step against the floor's: a bar the floor itself cannot meet separates no kernel from
    FlashAttention-2 but the kernel itself, so "within the floor" is the comparison that says something then."""
    if floor is None or not floor.steps or not report.steps:
        return []
    ref = {s.index: s.worst for s in floor.steps}
    shared = [s for s in report.steps if s.index in ref]
    if not shared:
        return [f"ours against the floor: no step in common with {floor.case}"]
    ratio = {s.index: (s.worst / ref[s.index] if ref[s.index] > 0 else (1.0 if s.worst == 0 else math.inf))
             for s in shared}
    top = max(ratio, key=lambda i: ratio[i] if math.isfinite(ratio[i]) else math.inf)
    low = min(ref[s.index] for s in shared)
    within = sum(r <= 1 for r in ratio.values())
    return [f"ours against the floor: at or under it at {within}/{len(shared)} steps, at most {ratio[top]:.3f}x "
            f"its error (step {top}); the floor's smallest step error {low:.3e}"
            + (f" (above {floor.tol:g} at every step: on that kernel the official code itself fails {floor.tol:g})"
               if low > floor.tol else "")]


def read_csv(path: str) -> list[ParityReport]:
    """The reports of a ``write_csv`` file, one per case, in file order (tolerance: the default)."""
    reports: dict[str, ParityReport] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            rep = reports.setdefault(r["case"], ParityReport(r["case"], DEFAULT_TOL))
            rep.steps.append(StepError(int(r["step"]), int(r["clip"]), int(r["scale"]), int(r["rep"]),
                                       int(r["tokens"]), float(r["rel_l2_cond"]), float(r["rel_l2_uncond"]),
                                       float(r["draws_agree"])))
    return list(reports.values())


def write_csv(reports: Sequence[ParityReport], path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["case", "step", "clip", "scale", "rep", "tokens", "rel_l2_cond", "rel_l2_uncond",
                      "draws_agree"])
        every = [r for rep in reports for r in (rep, rep.floor) if r is not None]
        for report, s in ((r, s) for r in every for s in r.steps):
            out.writerow([report.case, s.index, s.clip, s.si, s.rep, s.tokens, f"{s.cond:.6e}", f"{s.uncond:.6e}",
                          f"{s.draws_agree:.6f}"])


def main(argv: Sequence[str] | None = None) -> int:
    """Compare saved runs with a floor saved by another call: ``python benchmarks/parity.py OURS.csv FLOOR.csv``."""
    import argparse
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("ours", help="a --parity-csv file; its first case that is not a floor is compared")
    p.add_argument("floor", help="a --parity-csv file of a --parity-floor run (its floor case is used)")
    a = p.parse_args(argv)
    ours = [r for r in read_csv(a.ours) if not _is_floor(r)]
    floors = [r for r in read_csv(a.floor) if _is_floor(r)]
    if not ours or not floors:
        p.error(f"need a parity case in {a.ours} and a floor case ('... vs official ...') in {a.floor}")
    print(format_report(ours[0]))
    print("\n".join(_floor_lines(floors[0]) + _against_floor(ours[0], floors[0])))
    return 0


def _is_floor(report: ParityReport) -> bool:
    return " vs official " in report.case


if __name__ == "__main__":
    raise SystemExit(main())
