"""Where a generation's time goes, step by step: marks at every AR step's end (CUDA events or host clocks), the
time by step size, and a torch.profiler run that splits GPU kernel time by kind and GPU busy time by step size.

Used by bench_generate.py; the interval arithmetic is unit-tested on synthetic kernel lists
(tests/unit/test_benchmarks.py), reading the profiler's events only on a GPU.
"""
from __future__ import annotations

import time

import torch

STEP_BUCKETS = ((0, 1000), (1000, 10000), (10000, 1 << 62))  # token counts: small, mid and large steps


def _tokens(lo: int, hi: int) -> str:
    return f"{lo:,}–{'∞' if hi == 1 << 62 else f'{hi:,}'}"


class StepClock:
    """Marks the end of every AR step (the head call) with CUDA events or host timestamps."""

    def __init__(self, device):
        self.device, self.marks = device, []

    def mark(self):
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def durations(self) -> list[float]:
        if self.device.type == "cuda":
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def wrap_head(obj, attr, clock):
    """Call ``clock.mark()`` after every call of ``obj.attr`` (the head: once per AR step); returns the undo."""
    inner = getattr(obj, attr)

    def wrapped(*a, **k):
        out = inner(*a, **k)
        clock.mark()
        return out

    setattr(obj, attr, wrapped)
    return lambda: setattr(obj, attr, inner)


def by_step_size(values, schedule):
    """(tokens label, the values of that bucket's steps) for each non-empty bucket of STEP_BUCKETS; ``values`` run
    parallel to ``schedule.steps``."""
    for lo, hi in STEP_BUCKETS:
        picked = [v for v, s in zip(values, schedule.steps) if lo <= s.num_tokens < hi]
        if picked:
            yield _tokens(lo, hi), picked


KERNEL_KINDS = (  # (kind, substrings of kernel names), first match wins
    ("attention", ("sdpa", "fmha", "flash", "attention")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "matmul", "scaled_mm")),
    ("copy / cat / cast", ("copy", "memcpy", "memset", "cat", "catarraybatched")),
    ("reduction", ("reduce",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
)


class KernelMarker:
    """Ends every step of the profiled run with a one-cycle spin kernel (``torch.cuda._sleep``), so that the
    profile's kernel list splits into steps on the GPU's own timeline."""

    name = "spin_kernel"

    def mark(self):
        torch.cuda._sleep(1)


def kernel_profile(run, device, top: int = 8, model=None, schedule=None) -> str:
    """One more (untimed) run under torch.profiler: GPU time by kernel kind and the top kernels, to see where the
    time goes that is neither attention nor matmuls; with ``model`` and ``schedule``, GPU busy time against wall
    time by step size."""
    if device.type != "cuda":
        return "profile: CUDA only"
    from torch.profiler import ProfilerActivity, profile

    restore = wrap_head(model, "head_logits", KernelMarker()) if model is not None and schedule is not None else None
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
    finally:
        if restore is not None:
            restore()
    kinds: dict[str, float] = {}
    events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    for e in events:
        name = e.key.lower()
        kind = next((k for k, subs in KERNEL_KINDS if any(x in name for x in subs)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total / 1e6
    total = sum(kinds.values())
    by_kind = ", ".join(f"{k} {t:.2f} s" for k, t in sorted(kinds.items(), key=lambda kv: -kv[1]))
    tops = sorted(events, key=lambda e: -e.self_device_time_total)[:top]
    lines = "; ".join(f"{e.key[:48]} {e.self_device_time_total / 1e6:.2f} s ×{e.count}" for e in tops)
    try:
        kernels = _gpu_kernels(prof)
    except Exception as e:  # noqa: BLE001  (a profiler without these fields: the rest of the profile stands)
        return (f"GPU kernel time {total:.2f} s: {by_kind}. Top kernels: {lines}. GPU idle time: not available "
                f"({type(e).__name__})")
    steps = f" {_step_busy_line(kernels, schedule)}" if restore is not None else ""
    return f"GPU kernel time {total:.2f} s: {by_kind}. Top kernels: {lines}. {_idle_line(kernels)}.{steps}"


def _gpu_kernels(prof) -> list[tuple[float, float, str]]:
    """(start, end, name) of every GPU-side event of a profile (kernels, copies, memsets), in µs."""
    from torch.autograd import DeviceType

    return [(e.time_range.start, e.time_range.end, e.name) for e in prof.events() if e.device_type == DeviceType.CUDA]


def _step_busy_line(kernels, schedule) -> str:
    """GPU busy time against the steps' wall time on the GPU, by step size: a bucket whose kernels fill far less
    than its time waits on the host (Python, launches), which CUDA graphs or fewer ops would cut."""
    windows = split_at_markers(kernels, lambda name: KernelMarker.name in name)
    if len(windows) != schedule.num_steps:
        return f"GPU busy by step size: not available ({len(windows)} step markers for {schedule.num_steps} steps)"
    parts = []
    for tokens, picked in by_step_size(windows, schedule):
        busy, span = (sum(w[i] for w in picked) / 1e6 for i in (0, 1))
        parts.append(f"{len(picked)} steps of {tokens} tokens {busy:.2f} s of {span:.2f} s")
    return "GPU busy by step size (first step with the text step, each to the end of its head): " + ", ".join(parts)


def split_at_markers(kernels, is_marker) -> list[tuple[float, float]]:
    """(busy, span) of the windows between marker kernels: ``kernels`` are (start, end, name); a window runs from
    the first kernel (then from the previous marker's end) to the next marker's start; what follows the last
    marker is left out."""
    windows, current, begin = [], [], None
    for start, end, name in sorted(kernels):
        if is_marker(name):
            if begin is None:
                begin = start
            windows.append((busy_and_span(current)[0], start - begin))
            current, begin = [], end
            continue
        if begin is None:
            begin = start
        current.append((start, end))
    return windows


def _idle_line(kernels) -> str:
    """How long the GPU waited between kernels during the profiled run: host time (Python, launches, syncs) the
    kernels did not hide. Small steps that are host-bound show up here, not in the kernel times."""
    busy, span = busy_and_span([(start, end) for start, end, _ in kernels])
    return (f"GPU busy {busy / 1e6:.2f} s of the {span / 1e6:.2f} s from first to last kernel "
            f"(idle {(span - busy) / 1e6:.2f} s)")


def busy_and_span(intervals) -> tuple[float, float]:
    """(time covered by the union of ``intervals``, time from the first start to the last end); overlapping
    kernels (other streams) count once."""
    ordered = sorted(intervals)
    if not ordered:
        return 0.0, 0.0
    busy, end = 0.0, ordered[0][0]  # end: the latest stop so far
    for start, stop in ordered:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy, end - ordered[0][0]


def step_time_buckets(durations: list[float], schedule) -> str:
    """Where a generation's time goes by step size: many small steps cost launches and host time, the few large
    ones cost FLOPs; the first interval also holds the text step."""
    return ", ".join(f"{len(picked)} steps of {tokens} tokens {sum(picked):.2f} s"
                     for tokens, picked in by_step_size(durations, schedule))
