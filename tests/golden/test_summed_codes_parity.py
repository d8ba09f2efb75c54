"""Golden: per-clip accumulators rebuilt from the golden bits equal the official summed codes (atol 1e-5)."""
import numpy as np
import pytest
import torch
from golden_cases import cases, load_manifest

from infinitystar.bsq import accumulate

pytestmark = pytest.mark.golden


@pytest.mark.parametrize("case_dir", cases("t2v", "t2i", "i2v", "v2v"))
def test_summed_codes_from_golden_bits(case_dir):
    manifest = load_manifest(case_dir)
    sched = manifest["schedule"]
    steps_npz = np.load(case_dir / "steps.npz")
    ref = torch.from_numpy(np.load(case_dir / "outputs.npz")["summed_codes"])
    _, _, _, H, W = ref.shape
    accs: dict[int, torch.Tensor] = {}
    for step in sched["steps"]:
        clip = step["clip"]
        bits = torch.from_numpy(steps_npz[f"bits_{step['step']:03d}"])[None]
        acc = accs.get(clip, torch.zeros(1, 64, step["t"], H, W))
        accs[clip] = accumulate(acc, bits)
    summed = torch.cat([accs[c] for c in sorted(accs)], dim=2)
    assert summed.shape == ref.shape
    torch.testing.assert_close(summed, ref, rtol=0, atol=1e-5)
