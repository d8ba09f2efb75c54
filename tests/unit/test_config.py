import pytest
import torch

from infinitystar.config import FP32_MODULES, TRANSFORMER_PRESETS, TransformerConfig, detect_transformer_config
from infinitystar.transformer import InfinityStarTransformer


def test_presets_and_derived_fields():
    big = TRANSFORMER_PRESETS["8b"]
    assert (big.head_dim, big.blocks_per_chunk, big.kv_groups) == (128, 6, 4)
    tiny = TRANSFORMER_PRESETS["tiny"]
    assert (tiny.depth, tiny.block_chunks, tiny.width, tiny.num_heads, tiny.num_kv_heads) == (2, 2, 64, 2, 1)
    assert tiny.head_dim == 32 and TRANSFORMER_PRESETS["8b-720p"] == TRANSFORMER_PRESETS["8b-480p"] == big


@pytest.mark.parametrize("cfg", [TRANSFORMER_PRESETS["tiny"],
                                 TransformerConfig(depth=4, block_chunks=2, width=128, num_heads=4, num_kv_heads=2,
                                                   mlp_hidden=96, text_channels=24)])
def test_detect_roundtrip(cfg):
    with torch.device("meta"):
        model = InfinityStarTransformer(cfg)
    assert detect_transformer_config(model.state_dict()) == cfg


def test_detect_rejects_foreign_state_dict():
    with pytest.raises(ValueError, match="not an InfinityStar transformer"):
        detect_transformer_config({"blocks.0.sa.mat_qkv.weight": (3, 2)})


def test_invalid_config():
    with pytest.raises(ValueError):
        TransformerConfig(depth=5, block_chunks=2)
    with pytest.raises(ValueError):
        TransformerConfig(width=64, num_heads=3)


def test_fp32_modules_exist():
    with torch.device("meta"):
        model = InfinityStarTransformer(TRANSFORMER_PRESETS["tiny"])
    for name in FP32_MODULES:
        assert hasattr(model, name)
