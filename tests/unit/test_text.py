"""Prompt decoration, tokenization and T5 compaction on the tiny T5 folder of the tiny model set."""
import pytest
import torch

from infinitystar.text import CLOSING_PHRASE, TextEncoder, decorate_prompt, duration_from_frames


@pytest.fixture(scope="module")
def encoder(tiny_models):
    return TextEncoder.from_folder(tiny_models["text_encoder"], dtype=torch.float32)


def test_decoration_matches_official_scripts():
    assert decorate_prompt("a cat", 5) == "<<<t=5s>>>a cat" + CLOSING_PHRASE
    assert decorate_prompt("a cat", 10).startswith("<<<t=10s>>>a cat,")
    assert decorate_prompt("a cat", 0) == "a cat" + CLOSING_PHRASE
    assert decorate_prompt("a cat", None) == "a cat" + CLOSING_PHRASE
    assert decorate_prompt("a cat", 5, enabled=False) == "a cat"
    assert decorate_prompt(" a cat\n", 5, closing=False) == "<<<t=5s>>>a cat"  # tools/infer_interact_480p.py


def test_duration_from_frames():
    assert [duration_from_frames(f) for f in (1, 81, 161, 241)] == [None, 5, 10, 15]


def test_tokenize_pads_to_512_and_ends_with_eos(encoder):
    ids, mask = encoder.tokenize("a red fox running through snow")
    assert ids.shape == mask.shape == (1, 512)
    n = int(mask.sum())
    assert ids[0, n - 1].item() == 1 and ids[0, n:].eq(0).all() and mask[0, :n].eq(1).all()


def test_truncation_at_512(encoder):
    ids, mask = encoder.tokenize(" ".join(["fox"] * 2000))
    assert int(mask.sum()) == 512 and ids[0, -1].item() == 1


def test_compaction_equals_unpadded_run(encoder):
    ids, mask = encoder.tokenize(decorate_prompt("a dog on a street", 5))
    feats = encoder.encode_tokens(ids, mask)
    n = int(mask.sum())
    assert feats.shape == (n, encoder.channels) and feats.dtype == torch.float32
    with torch.no_grad():
        full = encoder.module(input_ids=ids, attention_mask=mask).last_hidden_state[0, :n]
    torch.testing.assert_close(feats, full)


def test_low_precision_load_is_close(encoder, tmp_path):
    folder = encoder.module.name_or_path
    bf16 = TextEncoder.from_folder(folder, dtype=torch.bfloat16)
    assert next(bf16.module.parameters()).dtype == torch.bfloat16
    a, b = encoder.encode_text("a red car"), bf16.encode_text("a red car")
    assert b.dtype == torch.float32 and a.shape == b.shape
    assert (a - b).abs().max() < 0.25


def test_encode_returns_text_condition(encoder):
    pytest.importorskip("infinitystar.sampler")
    text = encoder.encode("a red fox running through snow", duration_s=5)
    assert text.uncond is None
    ids, mask = encoder.tokenize(decorate_prompt("a red fox running through snow", 5))
    assert text.cond.shape == (int(mask.sum()), encoder.channels)
    neg = encoder.encode("a red fox running through snow", negative_prompt="blurry", duration_s=5)
    assert neg.uncond is not None and neg.uncond.shape[0] < neg.cond.shape[0]
    torch.testing.assert_close(neg.uncond, encoder.encode_text("blurry"))
    torch.testing.assert_close(neg.cond, text.cond)


def test_negative_longer_than_prompt_is_rejected(encoder):
    pytest.importorskip("infinitystar.sampler")
    with pytest.raises(ValueError, match="negative prompt"):
        encoder.encode("fox", negative_prompt=" ".join(["blurry ugly"] * 40), duration_s=5)


def test_missing_folder_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="download"):
        TextEncoder.from_folder(tmp_path)
