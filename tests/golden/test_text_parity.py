"""T5 features and prompt decoration against the golden cases (golden README "What to compare" 1)."""
import numpy as np
import pytest
import torch
from golden_cases import cases, load_manifest

from infinitystar.text import TextEncoder, decorate_prompt, duration_from_frames, load_encoder_module

pytestmark = pytest.mark.golden


def _encoder(case_dir):
    return TextEncoder(load_encoder_module(case_dir / "text_encoder", dtype=torch.float32), tokenizer=None)


@pytest.mark.parametrize("case_dir", cases("t2v", "t2i", "i2v", "v2v"))
def test_t5_features_match(case_dir):
    inputs = np.load(case_dir / "inputs.npz")
    enc = _encoder(case_dir)
    feats = enc.encode_tokens(torch.from_numpy(inputs["token_ids"]), torch.from_numpy(inputs["attention_mask"]))
    assert feats.shape[0] == int(np.asarray(inputs["t5_cond_len"]).reshape(-1)[0])
    np.testing.assert_allclose(feats.numpy(), inputs["t5_cond"], rtol=1e-5, atol=1e-6)
    if "neg_token_ids" in inputs.files:
        neg = enc.encode_tokens(torch.from_numpy(inputs["neg_token_ids"]),
                                torch.from_numpy(inputs["neg_attention_mask"]))
        assert neg.shape[0] == int(np.asarray(inputs["t5_neg_len"]).reshape(-1)[0])
        np.testing.assert_allclose(neg.numpy(), inputs["t5_neg"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case_dir", cases("t2v", "t2i", "i2v", "v2v"))
def test_decorated_prompt_matches(case_dir):
    manifest = load_manifest(case_dir)
    duration = duration_from_frames(manifest["schedule"]["frames"])
    assert decorate_prompt(manifest["text"]["prompt"], duration) == manifest["text"]["decorated_prompt"]
