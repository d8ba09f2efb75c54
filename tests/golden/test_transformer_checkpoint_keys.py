"""Golden: the full-size transformer built on the meta device has exactly the released keys and shapes."""
import json

import pytest
import torch
from golden_cases import checkpoint_keys_dir

from infinitystar.config import TRANSFORMER_PRESETS, detect_transformer_config
from infinitystar.transformer import InfinityStarTransformer

pytestmark = pytest.mark.golden
RELEASED_PARAMS = 8_768_382_112  # spec §2.1, also in the manifests


@pytest.mark.parametrize("variant", ["720p", "480p"])
def test_full_size_keys_and_shapes(variant):
    folder = checkpoint_keys_dir()
    path = folder / f"transformer_{variant}.json" if folder else None
    if path is None or not path.is_file():
        pytest.skip(f"no checkpoint_keys/transformer_{variant}.json under INFINITYSTAR_GOLDEN_DIRS")
    ref = json.loads(path.read_text())
    with torch.device("meta"):
        model = InfinityStarTransformer(TRANSFORMER_PRESETS[f"8b-{variant}"])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    want = {k: v["shape"] for k, v in ref["keys"].items()}
    assert sorted(set(want) - set(ours))[:5] == [] and sorted(set(ours) - set(want))[:5] == []
    assert {k: s for k, s in ours.items() if want[k] != s} == {}
    assert len(ours) == ref["num_entries"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"] == RELEASED_PARAMS
    assert detect_transformer_config({k: tuple(s) for k, s in want.items()}) == TRANSFORMER_PRESETS["8b"]
