"""benchmarks/gpu: the one-call GPU kit, rehearsed on the CPU so that device time is not spent on its plumbing.

``REHEARSE=1`` runs run_all.sh's steps with the tiny model and small cases. Our steps run everywhere; the
official ones need an official checkout and its dependencies (INFINITYSTAR_OFFICIAL_PATH) and are skipped
otherwise.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infinitystar.transformer import compile_unavailable

ROOT = Path(__file__).resolve().parents[2]
RUN_ALL = ROOT / "benchmarks" / "gpu" / "run_all.sh"
OURS = ["gpu_tests", "ours_fp8", "ours_480p10_16gb"]
OFFICIAL = ["parity_480p5", "official_720p5", "official_480p5"]
# the steps' timeouts come out of this budget: wide, so that a busy CPU (a CI runner shared with other jobs) does not
# turn a rehearsal's plumbing check into a timing test (it takes about 2 minutes on an idle 2-core machine)
REHEARSAL_BUDGET_S = 2400


def _rehearse(tmp_path, steps, **env):
    out = tmp_path / "out"
    env = {**os.environ, "REHEARSE": "1", "OUT": str(out), "SITE": str(tmp_path / "site"), "PYTHON": sys.executable,
           "STEPS": " ".join(steps), "BUDGET": str(REHEARSAL_BUDGET_S), **env}
    proc = subprocess.run(["bash", str(RUN_ALL)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=REHEARSAL_BUDGET_S + 300)
    summary = (out / "summary.txt").read_text()
    return proc, out, summary


def _table_rows(text: str, impl: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    return [r for r in rows if len(r) > 1 and r[1] == impl]


def test_run_all_rehearsal_runs_our_steps(tmp_path):
    proc, out, summary = _rehearse(tmp_path, OURS)
    assert proc.returncode == 0, (summary, proc.stdout[-3000:], (out / "run_all.log").read_text()[-3000:])
    for step in OURS[1:]:
        assert f"{step}: rc=0 (ok)" in summary, summary
    assert "gpu_tests: rc=0" in summary
    assert not any(name in summary for name in OFFICIAL)  # STEPS left them out, not skipped for time
    fp8 = (out / "ours_fp8.md").read_text()
    assert [r[0] for r in _table_rows(fp8, "ours")] == ["mid5", "mid5", "mid10"]  # the stand-ins of the 3 cases
    assert "config tiny" in fp8 and "weights fp8" in fp8
    assert [r[0] for r in _table_rows((out / "ours_480p10_16gb.md").read_text(), "ours")] == ["mid10"]
    assert "----- ours_fp8.md" in proc.stdout  # the tables come back in the call's output too


def test_run_all_marks_a_failing_step(tmp_path):
    """A step that fails makes the call fail and says so in the summary (here: no official checkout)."""
    proc, _, summary = _rehearse(tmp_path, ["official_480p5"], OFFICIAL=str(tmp_path / "missing"))
    assert proc.returncode == 1
    assert "official_480p5: rc=1 (failed)" in summary or "official_480p5: rc=2 (failed)" in summary, summary


def test_run_all_skips_what_has_no_time_left_and_extras_unless_named(tmp_path):
    """Out of budget, every regular step is reported as skipped (and the call fails); the extra torch.compile
    step is not part of a plain call at all."""
    proc, _, summary = _rehearse(tmp_path, [], BUDGET="1")
    assert proc.returncode == 1
    for step in OURS[1:] + OFFICIAL:
        assert f"{step}: skipped" in summary, summary
    assert "ours_compile_720p5" not in summary and "ours_fp8mm_720p5" not in summary


@pytest.mark.parametrize("step, setting", [("ours_compile_720p5", "compile True"),
                                           ("ours_fp8mm_720p5", "fp8 matmul True"),
                                           ("ours_graphs_compile_720p5", "compile True"),
                                           ("ours_cudnn_fp8mm_720p5", "attention cudnn"),
                                           ("probe_kernels", "attention of a whole generation (ms), SDPA flash"),
                                           ("profile_720p5", "time by step size: "),
                                           ("profile_720p5_fast", "compile True, cuda graphs off"),
                                           ("ours_gguf_720p5", "weights gguf_q8_0"),
                                           ("ours_gguf_q4k_720p5", "weights gguf_q4_k")])
def test_run_all_runs_a_named_extra_step(tmp_path, step, setting):
    if "compile" in step and compile_unavailable("cpu") is not None:
        pytest.skip("no C++ compiler for torch.compile")
    proc, out, summary = _rehearse(tmp_path, [step])
    assert proc.returncode == 0 and f"{step}: rc=0 (ok)" in summary, summary
    assert setting in (out / f"{step}.md").read_text()


def _official_path() -> str:
    path = os.environ.get("INFINITYSTAR_OFFICIAL_PATH")
    if not path:
        pytest.skip("set INFINITYSTAR_OFFICIAL_PATH to an official InfinityStar checkout to rehearse the official steps")
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import official; official.import_official(sys.argv[2])")
    proc = subprocess.run([sys.executable, "-c", probe, str(ROOT / "benchmarks"), path], capture_output=True,
                          text=True, timeout=300)
    if proc.returncode:
        pytest.skip(f"official code not importable here: {proc.stderr.strip().splitlines()[-1:]}")
    return path


def test_run_all_rehearsal_runs_the_official_steps(tmp_path):
    proc, out, summary = _rehearse(tmp_path, OFFICIAL, OFFICIAL=_official_path())
    assert proc.returncode == 0, (summary, (out / "run_all.log").read_text()[-3000:])
    for step in OFFICIAL:
        assert f"{step}: rc=0 (ok)" in summary, summary
    assert (out / "parity_480p5.csv").stat().st_size > 0
    parity_md = (out / "parity_480p5.md").read_text()
    assert "norms composite" in parity_md and "none in the recorded steps" in parity_md, parity_md
    for name in ("official_720p5", "official_480p5"):
        text = (out / f"{name}.md").read_text()
        assert _table_rows(text, "ours") and _table_rows(text, "official"), text


FOLLOW_UPS = ["parity_img_official32", "parity_img_ours32", "official_720p5_cudnn", "parity_img_fp32",
              "parity_img_cudnn", "parity_img_fast", "official_720p5_warm", "decode_720p5", "official_720p5_graphs",
              "parity_480p5_graphs"]


def test_run_all_rehearsal_runs_the_official_follow_ups(tmp_path):
    proc, out, summary = _rehearse(tmp_path, FOLLOW_UPS, OFFICIAL=_official_path())
    assert proc.returncode == 0, (summary, (out / "run_all.log").read_text()[-3000:])
    for step in FOLLOW_UPS:
        assert f"{step}: rc=0 (ok)" in summary, summary
    assert "precision: ours fp32, official fp32" in (out / "parity_img_fp32.md").read_text()
    assert "attention cudnn" in (out / "official_720p5_cudnn.md").read_text()
    assert "trace (ours vs official, first steps)" in (out / "parity_img_fast.md").read_text()
    warm = (out / "official_720p5_warm.md").read_text()
    assert "mid5 ours: first run" in warm and "mid5 official: first run" in warm, warm
    assert "mid5 official: first run" in (out / "official_720p5_graphs.md").read_text()
    assert (out / "parity_480p5_graphs.csv").stat().st_size > 0
    decode = (out / "decode_720p5.md").read_text()
    assert "| official code |" in decode and "largest |ours - official|" in decode, decode


FAST = ["parity_480p5_fast", "official_720p5_fast", "parity_480p5_routed", "parity_480p5_exact_compiled"]


def test_run_all_rehearsal_times_and_checks_the_fast_settings_alike(tmp_path):
    """Issue 7 asks for the speed and the logits parity at once: the "fast" timing and its parity run the same
    settings of ours (torch.compile, composite norms, the default attention routing; CUDA graphs on a GPU), and
    the two diagnostics each change one thing."""
    if compile_unavailable("cpu") is not None:
        pytest.skip("no C++ compiler for torch.compile")
    proc, out, summary = _rehearse(tmp_path, FAST, OFFICIAL=_official_path())
    assert proc.returncode == 0, (summary, (out / "run_all.log").read_text()[-3000:])
    for step in FAST:
        assert f"{step}: rc=0 (ok)" in summary, summary
    fast = "compile True, cuda graphs off, fp8 matmul False, offload_kv auto, norms composite"  # graphs: CUDA only
    for step in ("parity_480p5_fast", "official_720p5_fast"):
        text = (out / f"{step}.md").read_text()
        assert "attention sdpa, " in text and fast in text, text
    assert "mid5 official: first run" in (out / "official_720p5_fast.md").read_text()
    routed = (out / "parity_480p5_routed.md").read_text()
    assert "attention sdpa, " in routed and "compile False" in routed and "norms composite" in routed, routed
    assert "floor mid5 official cudnn vs official flash: max rel L2 " in routed, routed  # the kernel floor ran
    exact = (out / "parity_480p5_exact_compiled.md").read_text()
    assert "attention sdpa_flash, " in exact and fast in exact, exact
    for step in ("parity_480p5_fast", "parity_480p5_routed", "parity_480p5_exact_compiled"):
        assert (out / f"{step}.csv").stat().st_size > 0


def test_run_all_times_the_fast_settings_in_whole_steps(tmp_path):
    """The extra that settles 1.496x (token blocks) against 1.503x (whole steps) in one call: the fast settings with
    --chunk 0, ours against the official code, both warm."""
    if compile_unavailable("cpu") is not None:
        pytest.skip("no C++ compiler for torch.compile")
    step = "official_720p5_fast_whole"
    proc, out, summary = _rehearse(tmp_path, [step], OFFICIAL=_official_path())
    assert proc.returncode == 0 and f"{step}: rc=0 (ok)" in summary, (summary, (out / "run_all.log").read_text()[-3000:])
    text = (out / f"{step}.md").read_text()
    assert "chunk 0, compile True" in text and "norms composite" in text and "mid5 official: first run" in text, text
    assert [r[1] for r in _table_rows(text, "official")] == ["official"]


def test_run_all_times_an_interact_clip_against_the_official_code(tmp_path):
    step = "official_interact480"
    proc, out, summary = _rehearse(tmp_path, [step], OFFICIAL=_official_path())
    assert proc.returncode == 0 and f"{step}: rc=0 (ok)" in summary, (summary, (out / "run_all.log").read_text()[-3000:])
    text = (out / f"{step}.md").read_text()
    assert [r[0] for r in _table_rows(text, "ours")] == ["interact_mid"] and _table_rows(text, "official"), text


def test_prepare_refuses_without_an_official_checkout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "INFINITYSTAR_OFFICIAL_PATH"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "prepare.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr
