"""Golden: our schedule equals the official one, and our bit sampler replays the official draws.

The replay feeds the golden guided logits, in order, to our one-multinomial-per-step sampler with
the generator seeded once, up to the first step whose logits are not stored for every row.
"""
import numpy as np
import pytest
import torch
from golden_cases import cases, load_manifest

from infinitystar.sampler import draw_bits
from infinitystar.schedule import build_schedule

pytestmark = pytest.mark.golden
AR_KINDS = ("t2v", "t2i", "i2v", "v2v", "vae")


@pytest.mark.parametrize("case_dir", cases(*AR_KINDS))
def test_schedule_matches_manifest(case_dir):
    ref = load_manifest(case_dir)["schedule"]
    ours = build_schedule(ref["pn"], ref["h_div_w_template"], ref["frames"])
    assert ours.h_div_w == pytest.approx(ref["h_div_w_template"])
    assert [list(s) for s in ours.scales] == [list(s) for s in ref["scales"]]
    assert (ours.height, ours.width, ours.latent_frames) == (ref["height"], ref["width"], ref["latent_frames"])
    assert ours.scales_per_clip == ref["scales_in_one_clip"]
    assert list(ours.image_repetition) == ref["image_scale_repetition"]
    assert list(ours.video_repetition) == ref["video_scale_repetition"]
    assert (ours.semantic_scales, ours.detail_scale_min_tokens) == (ref["semantic_scales"], ref["detail_scale_min_tokens"])
    # nearest-template lookup from the requested ratio lands on the same template
    if "h_div_w_requested" in ref:
        assert build_schedule(ref["pn"], ref["h_div_w_requested"], ref["frames"]).h_div_w == ours.h_div_w
    table = ref.get("reference_scales")
    for step in ours.steps:
        if table is not None:
            info = table[str(step.si)]
            assert list(step.ref_sids) == info["ref_sids"], step
            assert (step.frame_ss, step.frame_ee) == (info["frame_ss"], info["frame_ee"]), step
    assert len(ours.steps) == len(ref["steps"])
    for a, b in zip(ours.steps, ref["steps"]):
        got = (a.index, a.si, a.rep, a.real_sid, a.clip, a.t, a.h, a.w, a.d, a.is_last_rep)
        want = tuple(b[k] for k in ("step", "si", "rep", "real_sid", "clip", "t", "h", "w", "d", "last_rep"))
        assert got == want


@pytest.mark.parametrize("case_dir", cases("t2v", "t2i", "i2v", "v2v"))
def test_sampler_replays_golden_draws(case_dir):
    manifest = load_manifest(case_dir)
    steps_npz = np.load(case_dir / "steps.npz")
    generator = torch.Generator("cpu").manual_seed(manifest["sampler"]["seed"])
    replayed = 0
    for s in manifest["schedule"]["steps"]:
        i, shape = s["step"], (1, s["t"], s["h"], s["w"], s["d"])
        if "guided" not in s["stored_logits"] or s["logit_frames"] != list(range(s["t"])):
            # the replay needs every row of a step; one that stores less still takes its draw from the generator,
            # and how much it takes depends on the number of rows only: drawn here from even odds
            draw_bits(torch.zeros(1, s["t"] * s["h"] * s["w"], 2 * s["d"]), shape, generator)
            continue
        guided = torch.from_numpy(steps_npz[f"logits_guided_{i:03d}"])[None]
        drawn = draw_bits(guided, shape, generator)[0]
        key = f"drawn_{i:03d}" if f"drawn_{i:03d}" in steps_npz else f"bits_{i:03d}"
        want = torch.from_numpy(steps_npz[key])
        assert torch.equal(drawn, want), f"step {i}: {(drawn != want).sum().item()} bits differ"
        replayed += 1
    if not replayed:
        pytest.skip(f"{case_dir.name} stores no step's guided logits for every row: nothing to replay")


KNOWN_KINDS = ("t2v", "t2i", "i2v", "v2v", "vae")


def test_every_case_kind_is_known():
    """A case of an unknown kind would be silently left out of every parametrized test."""
    from golden_cases import _case_dirs

    kinds = {d.name: load_manifest(d).get("kind") for d in _case_dirs()}
    unknown = {name: kind for name, kind in kinds.items() if kind not in KNOWN_KINDS}
    assert not unknown, f"golden cases of unknown kind: {unknown}"


@pytest.mark.parametrize("case_dir", cases(*AR_KINDS))
def test_schedule_name_is_supported(case_dir):
    """Our schedules are the released models' (infinity_elegant_clip20frames_v2); another one must fail, not pass."""
    name = load_manifest(case_dir)["schedule"].get("name", "infinity_elegant_clip20frames_v2")
    assert name == "infinity_elegant_clip20frames_v2", f"unsupported dynamic_scale_schedule {name!r}"
