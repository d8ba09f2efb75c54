"""Where two bf16 runs part: the first tensor at which our teacher-forced sampler leaves the official one.

The logits check (parity.py) says at which step the two samplers disagree, not why. On a GPU the two bf16
runs are bit-equal for the first steps and then differ by the bf16 noise floor all at once (the random-weight
8B model amplifies a single rounding difference to a few percent), so the step alone does not tell which
operation rounded differently. ``--parity-trace N`` records, for the first N steps of both runs:

- the step's input path: the trilinear up-sizing of the previous step's codes, the accumulator and its area
  down-sizing (every ``F.interpolate`` call), then ``word_embed``'s input and output;
- the hidden states at the official block-chunk boundaries (6 chunks of 6 blocks at full size), text prefix
  first;

and reports, per step, how many elements of each differ, and the first block chunk whose output differs.
Read with parity.py's per-step errors: equal inputs with a differing chunk point at the blocks (a kernel that
rounds differently); a differing input points at the code accumulation.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from official import interpolate_mode

FIELDS = ("codes", "acc", "area", "embed_in", "embed_out")


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


class Recorder:
    """Tensors of the first ``steps`` steps of one run, in call order."""

    def __init__(self, steps: int, units: int):
        self.steps, self.units = steps, units
        self.inputs: list[dict] = []  # per step: FIELDS -> tensor
        self.outputs: list[torch.Tensor] = []  # block-group outputs: text prefix, then each step
        self._pending: dict = {}

    def interpolate(self, mode: str, x: torch.Tensor, out: torch.Tensor):
        if len(self.inputs) >= self.steps:
            return
        if mode == "area":
            self._pending["acc"], self._pending["area"] = _copy(x), _copy(out)
        elif mode == "trilinear" and x.shape != out.shape and "codes" not in self._pending:
            # the codes' up-sizing comes first; the official code then re-sizes its accumulator (an identity
            # after the first step)
            self._pending["codes"] = _copy(out)

    def embed(self, x: torch.Tensor, out: torch.Tensor):
        if len(self.inputs) < self.steps:
            self.inputs.append({**self._pending, "embed_in": _copy(x), "embed_out": _copy(out)})
        self._pending = {}

    def group(self, out: torch.Tensor):
        if len(self.outputs) < (self.steps + 1) * self.units:
            self.outputs.append(_copy(out))


@contextlib.contextmanager
def recording_interpolate(rec: Recorder):
    real = F.interpolate

    def spy(x, *a, **k):
        out = real(x, *a, **k)
        rec.interpolate(interpolate_mode(a, k), x, out)
        return out

    F.interpolate = spy
    try:
        yield
    finally:
        F.interpolate = real


@contextlib.contextmanager
def trace_official(model, steps: int):
    """Record the official model's run (``word_embed`` hook, block-chunk hooks, interpolate spy)."""
    units = list(model.block_chunks if model.num_block_chunks > 1 else model.blocks)
    rec = Recorder(steps, len(units))
    hooks = [model.word_embed.register_forward_hook(lambda m, a, out: rec.embed(a[0], out))]
    hooks += [u.register_forward_hook(lambda m, a, out: rec.group(out)) for u in units]
    try:
        with recording_interpolate(rec):
            yield rec
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def trace_ours(model, steps: int, units: int):
    """Record our run at the same points: ``embed_codes`` and every (depth/units)-th block's output."""
    rec = Recorder(steps, units)
    per = len(model.blocks) // units
    inner = model.embed_codes

    def embed_codes(codes, *a, **k):
        out = inner(codes, *a, **k)
        rec.embed(codes.flatten(2).transpose(1, 2), out)
        return out

    model.embed_codes = embed_codes
    hooks = [model.blocks[i].register_forward_hook(lambda m, a, out: rec.group(out))
             for i in range(per - 1, len(model.blocks), per)]
    try:
        with recording_interpolate(rec):
            yield rec
    finally:
        del model.embed_codes
        for h in hooks:
            h.remove()


def _diff(ours: torch.Tensor | None, ref: torch.Tensor | None) -> str:
    if ours is None or ref is None:
        return "-" if ours is None and ref is None else f"only {'ours' if ref is None else 'official'}"
    note = "" if ours.dtype == ref.dtype else f" ({str(ours.dtype)[6:]} vs {str(ref.dtype)[6:]})"
    if ours.numel() != ref.numel():
        return f"shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    d = (ours.double().reshape(-1) - ref.double().reshape(-1)).abs()
    n = int((d != 0).sum())
    return (f"equal{note}" if n == 0 else f"{n}/{d.numel()} differ, max {d.max().item():.2e}{note}")


def compare(ours: Recorder, ref: Recorder) -> list[str]:
    """Markdown lines: per step, the input path and the first differing block group."""
    lines = ["trace (ours vs official, first steps): " + first_difference(ours, ref), "",
             "| step | " + " | ".join(FIELDS) + " | first differing block group |",
             "|---|" + "---|" * (len(FIELDS) + 1)]
    for i in range(min(len(ours.inputs), len(ref.inputs))):
        a, b = ours.inputs[i], ref.inputs[i]
        cells = [_diff(a.get(f), b.get(f)) for f in FIELDS]
        lines.append(f"| {i} | " + " | ".join(cells) + f" | {_first_group(ours, ref, i)} |")
    return lines


def _first_group(ours: Recorder, ref: Recorder, step: int) -> str:
    """step -1 is the text prefix."""
    u = ref.units
    for g in range(u):
        k = (step + 1) * u + g
        if k >= min(len(ours.outputs), len(ref.outputs)):
            return "not recorded"
        d = _diff(ours.outputs[k], ref.outputs[k])
        if not d.startswith("equal"):
            return f"{g} ({d})"
    return "none"


def first_difference(ours: Recorder, ref: Recorder) -> str:
    text = _first_group(ours, ref, -1)
    if text != "none":
        return f"text prefix, block group {text}"
    for i in range(min(len(ours.inputs), len(ref.inputs))):
        for f in FIELDS:
            d = _diff(ours.inputs[i].get(f), ref.inputs[i].get(f))
            if not (d.startswith("equal") or d.startswith("only") or d == "-"):
                return f"step {i} input, {f}: {d}"
        g = _first_group(ours, ref, i)
        if g != "none":
            return f"step {i}, block group {g}"
    return "none in the recorded steps"
