"""Golden: teacher-forced logits (cond, uncond, guided) and free-running bits of the AR sampler.

One teacher-forced run per case: every step's input comes from the golden bits of the earlier
steps, so the logits of step i are comparable with the golden ``logits_*_{i}``, and the bits our
sampler *draws* (same seeded generator) are compared with the golden draws.

Tolerance. The official model rounds q, k, v to bf16 before attention. A 1-ulp fp32 difference
(another CPU or torch build doing the same matmuls) then flips single bf16 roundings, which moves
some logits by 1e-5..1e-4 (measured: perturbing every weight by 1e-7 relative moves logits by up
to 1e-4). Elementwise rtol 1e-4 / atol 1e-5 therefore holds only bit-for-bit; here it must hold
for nearly all elements, and the per-step median error must stay at the fp32 noise floor.
Skipping the bf16 rounding, by contrast, moves the median by ~1e-4 and most elements past the
tolerance, so these checks fail on it. Set INFINITYSTAR_STRICT_LOGITS=1 to require every element.

Why not strict by default: run teacher-forced on these cases here, the official code and ours give
bit-identical logits at every step (torch 2.13 and 2.14.1), yet both differ from the golden files
from step 0 on by 1e-7..3e-6 (the CPU that made them rounds the matmuls differently). Strict passes
for t2i/t2v cond and uncond, but not for the I2V cases (the same bf16 flips as the official code,
e.g. 0.9% of step 24 of i2v_gqa_vaech) nor for guided logits (APG with cfg 34 scales the noise up).
"""
import os

import numpy as np
import pytest
import torch
from golden_cases import cases, load_manifest
from safetensors.torch import load_file

from infinitystar.config import TransformerConfig
from infinitystar.guidance import GuidanceConfig, guide
from infinitystar.sampler import TextCondition, sample
from infinitystar.schedule import build_schedule
from infinitystar.transformer import InfinityStarTransformer, load_transformer_state_dict

pytestmark = pytest.mark.golden

RTOL, ATOL = 1e-4, 1e-5
STRICT = os.environ.get("INFINITYSTAR_STRICT_LOGITS") == "1"
# name -> (max fraction of elements outside rtol/atol in one step, mean fraction over the case,
#          max per-step median abs error, max abs error)
# The share outside is a noisy count on small steps: another torch build flips other bf16 roundings (torch 2.9.1's CPU
# kernels: up to 5.3 % of a 28-token step of i2v_gqa_vaech, and 37.5 % of a 2-token one, where torch 2.13 and 2.14.1
# stay under 1.2 %), so one step may lose 6 %, and never less than one token's row. Guided logits carry that noise
# times the guidance scale (34): 38 % of a step with torch 2.9.1, 14 % with 2.13. The mean is over the steps a case
# stores, which may be only its hardest; it, the median and the max are what a real error moves (skipping the bf16
# rounding puts 19-70 % of the elements outside on average, 93-96 % of the guided ones).
LIMITS = {"cond": (0.06, 0.015, 1e-5, 2e-3), "uncond": (0.06, 0.015, 1e-5, 2e-3),
          "guided": (0.5, 0.15, 1e-4, 1e-2)}
AR_KINDS = ("t2v", "t2i", "i2v", "v2v")


def build_model(case_dir, manifest) -> InfinityStarTransformer:
    t = manifest["transformer"]
    cfg = TransformerConfig(depth=t["depth"], block_chunks=t["block_chunks"], width=t["width"],
                            num_heads=t["num_heads"], num_kv_heads=t["num_kv_heads"], mlp_hidden=t["mlp_hidden"],
                            text_channels=t["text_channels"], text_maxlen=t.get("text_maxlen", 512),
                            codebook_dim=t.get("codebook_dim", 64), semantic_dim=t.get("semantic_dim", 16),
                            detail_dim=t.get("detail_dim", 64))
    assert cfg.head_dim == t["head_dim"]
    model = InfinityStarTransformer(cfg)
    load_transformer_state_dict(model, load_file(case_dir / "transformer.safetensors"))
    return model.eval()


def text_condition(case_dir, manifest) -> TextCondition:
    inputs = np.load(case_dir / "inputs.npz")
    neg = torch.from_numpy(inputs["t5_neg"]) if manifest["text"].get("negative_prompt") else None
    return TextCondition(torch.from_numpy(inputs["t5_cond"]), neg)


def guidance_config(manifest) -> GuidanceConfig:
    """The manifest's guidance (sampler.cfg / use_apg / use_cfg / apg_norm_threshold / apg_eta), never a default."""
    s = manifest["sampler"]
    use_apg, use_cfg = bool(s.get("use_apg", 1)), bool(s.get("use_cfg", 0))
    assert use_apg != use_cfg, f"exactly one of use_apg/use_cfg must be set (upstream asserts it): {s}"
    return GuidanceConfig(scale=float(s["cfg"]), threshold=float(s.get("apg_norm_threshold", 0.05)),
                          use_apg=use_apg, eta=float(s.get("apg_eta", 0.0)))


def step_tau(manifest, step: dict) -> float:
    """tau of a step: sampler.tau_per_scale[si] when given, else tau_image (clip 0) / tau_video."""
    s = manifest["sampler"]
    per = s.get("tau_per_scale")
    if per is not None and step["si"] < len(per):
        return float(per[step["si"]])
    return float(s["tau_image"] if step["clip"] == 0 else s["tau_video"])


def check_tau_supported(manifest) -> None:
    """Our sampler takes one tau for the image clip and one for video clips: fail loudly on anything else."""
    for st in manifest["schedule"]["steps"]:
        want = manifest["sampler"]["tau_image"] if st["clip"] == 0 else manifest["sampler"]["tau_video"]
        assert step_tau(manifest, st) == float(want), (
            f"tau_per_scale[{st['si']}] = {step_tau(manifest, st)} is not tau_image/tau_video: unsupported case")


def logit_rows(step: dict, h: int, w: int) -> torch.Tensor:
    per = h * w
    return torch.cat([torch.arange(f * per, (f + 1) * per) for f in step["logit_frames"]])


_RUNS: dict = {}


def teacher_forced_run(case_dir):
    """Run the sampler teacher-forced on all golden bits; keep per-step error stats and draws."""
    if case_dir in _RUNS:
        return _RUNS[case_dir]
    manifest = load_manifest(case_dir)
    sched = manifest["schedule"]
    schedule = build_schedule(sched["pn"], sched["h_div_w_template"], sched["frames"])
    steps_npz = np.load(case_dir / "steps.npz")
    gold = [torch.from_numpy(steps_npz[f"bits_{s['step']:03d}"]) for s in sched["steps"]]
    stats, flips = [], []

    def hook(rec):
        s, ms = rec.step, sched["steps"][rec.step.index]
        key = f"drawn_{s.index:03d}"
        want = torch.from_numpy(steps_npz[key]) if key in steps_npz else gold[s.index]
        flips.append(int((rec.drawn[0].cpu() != want).sum()))
        if not ms["logit_frames"]:
            return
        rows = logit_rows(ms, s.h, s.w)
        got = {"cond": rec.logits[0], "guided": rec.guided[0]}
        if len(rec.logits) > 1:  # guidance 1 everywhere runs the conditional branch alone, as upstream
            got["uncond"] = rec.logits[1]
        for name in ms["stored_logits"]:
            ref = torch.from_numpy(steps_npz[f"logits_{name}_{s.index:03d}"])
            mine = got[name][rows].cpu()
            err = (mine - ref).abs()
            outside = (err > ATOL + RTOL * ref.abs()).float().mean().item()
            stats.append((s.index, name, outside, err.median().item(), err.max().item(), mine, ref,
                          ref.shape[-1] / ref.numel()))  # the share of the step one token's row is

    check_tau_supported(manifest)
    with torch.no_grad():
        model = build_model(case_dir, manifest)
        sample(model, text_condition(case_dir, manifest), schedule, seed=manifest["sampler"]["seed"],
               guidance=guidance_config(manifest),
               tau_image=manifest["sampler"]["tau_image"], tau_video=manifest["sampler"]["tau_video"],
               teacher_bits=gold, step_hook=hook)
    _RUNS[case_dir] = (manifest, stats, flips)
    return _RUNS[case_dir]


@pytest.mark.parametrize("case_dir", cases(*AR_KINDS))
@pytest.mark.parametrize("name", ["cond", "uncond", "guided"])
def test_teacher_forced_logits(case_dir, name):
    _, stats, _ = teacher_forced_run(case_dir)
    rows = [r for r in stats if r[1] == name]
    if not any(name in s["stored_logits"] for s in load_manifest(case_dir)["schedule"]["steps"]):
        pytest.skip(f"{case_dir.name} stores no {name} logits (cfg 1 runs no unconditional branch)")
    assert rows, f"the manifest lists {name} logits, but the run compared none"
    if STRICT:
        for index, _, _, _, _, mine, ref, _ in rows:
            torch.testing.assert_close(mine, ref, rtol=RTOL, atol=ATOL, msg=lambda m, i=index: f"step {i}: {m}")
        return
    max_frac, mean_frac, max_median, max_abs = LIMITS[name]
    fracs = [r[2] for r in rows]
    worst = max(rows, key=lambda r: r[2])
    summary = (f"{name}: {len(rows)} steps; outside rtol {RTOL}/atol {ATOL}: worst step {worst[0]} "
               f"{worst[2]:.2%}, mean {np.mean(fracs):.3%}; max median err {max(r[3] for r in rows):.2e}; "
               f"max err {max(r[4] for r in rows):.2e}")
    assert all(r[2] <= max(max_frac, r[7]) for r in rows) and np.mean(fracs) <= mean_frac, summary
    assert max(r[3] for r in rows) <= max_median, summary
    assert max(r[4] for r in rows) <= max_abs, summary


@pytest.mark.parametrize("case_dir", cases(*AR_KINDS))
def test_apg_matches_golden_guidance(case_dir):
    """APG on the golden cond/uncond (x 1/tau) gives the golden guided logits (full-row steps)."""
    manifest = load_manifest(case_dir)
    sched = manifest["schedule"]
    steps_npz = np.load(case_dir / "steps.npz")
    checked = 0
    config = guidance_config(manifest)
    for s in sched["steps"]:
        need = {"cond", "guided"} if config.scale == 1 else {"cond", "uncond", "guided"}
        if need - set(s["stored_logits"]) or s["logit_frames"] != list(range(s["t"])):
            continue  # guidance runs over the whole step: needs every row
        tau = step_tau(manifest, s)
        i = s["step"]
        cond, guided = (torch.from_numpy(steps_npz[f"logits_{n}_{i:03d}"])[None] for n in ("cond", "guided"))
        uncond = torch.from_numpy(steps_npz[f"logits_uncond_{i:03d}"])[None] if "uncond" in need else cond
        out = guide(cond * (1 / tau), uncond * (1 / tau), config)
        torch.testing.assert_close(out, guided, rtol=RTOL, atol=ATOL, msg=lambda m, i=i: f"step {i}: {m}")
        checked += 1
    if not checked:
        pytest.skip(f"{case_dir.name} stores no step with every row of the logits guidance needs")


@pytest.mark.parametrize("case_dir", cases(*AR_KINDS))
def test_free_running_bits(case_dir):
    """Bits drawn from our own logits (aligned by teacher forcing) equal the golden draws but for a few."""
    manifest, _, flips = teacher_forced_run(case_dir)
    sched = manifest["schedule"]
    total = sum(s["t"] * s["h"] * s["w"] * s["d"] for s in sched["steps"])
    allowed = 10 + total // 200_000
    bad = {i: n for i, n in enumerate(flips) if n}
    assert sum(flips) <= allowed, f"{sum(flips)} of {total} drawn bits differ (allowed {allowed}); per step {bad}"
