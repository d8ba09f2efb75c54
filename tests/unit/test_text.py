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


def test_truncation_is_reported(encoder, caplog):
    with caplog.at_level("WARNING", logger="infinitystar.text"):
        encoder.tokenize("a red fox running through snow")
    assert "T5 tokens" not in caplog.text
    with caplog.at_level("WARNING", logger="infinitystar.text"):
        ids, mask = encoder.tokenize("a red fox running through snow " * 200)
    assert int(mask.sum()) == 512 and "only the first 512 are used" in caplog.text


def test_compaction_equals_the_padded_run(encoder):
    """encode_tokens runs the valid tokens only: the same features as Hugging Face's T5 on all 512 with the mask."""
    from transformers import T5EncoderModel

    ids, mask = encoder.tokenize(decorate_prompt("a dog on a street", 5))
    feats = encoder.encode_tokens(ids, mask)
    n = int(mask.sum())
    assert feats.shape == (n, encoder.channels) and feats.dtype == torch.float32 and n < 512
    with torch.no_grad():
        padded = encoder.module(ids, mask)[0, :n]
        reference = T5EncoderModel.from_pretrained(str(encoder.folder)).eval()(
            input_ids=ids, attention_mask=mask).last_hidden_state[0, :n]
    torch.testing.assert_close(feats, padded, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feats, reference, rtol=1e-5, atol=1e-6)


def test_low_precision_load_is_close(encoder, tmp_path):
    bf16 = TextEncoder.from_folder(encoder.folder, dtype=torch.bfloat16)
    assert bf16.module.shared.weight.dtype == torch.bfloat16
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


def test_negative_longer_than_prompt_is_rejected(encoder, monkeypatch):
    """Refused from the tokenizer's counts, which are the features' lengths, before the encoder runs (a host can
    check before loading it)."""
    pytest.importorskip("infinitystar.sampler")
    long = " ".join(["blurry ugly"] * 40)
    for text in (decorate_prompt("fox", 5), "blurry", long, " ".join(["a red fox"] * 300)):
        assert encoder.token_count(text) == encoder.encode_text(text).shape[0]
    encoder.check_negative("fox", "blurry", 5)
    monkeypatch.setattr(encoder, "encode_text", lambda *a, **k: pytest.fail("encoded before the check"))
    with pytest.raises(ValueError, match="negative prompt is .* tokens but the \\(decorated\\) prompt is only"):
        encoder.encode("fox", negative_prompt=long, duration_s=5)
    with pytest.raises(ValueError, match="negative prompt"):
        encoder.check_negative("fox", long, 5)


def test_missing_folder_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="download"):
        TextEncoder.from_folder(tmp_path)


def _copy_without(src, dst, *skip):
    import shutil

    dst.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


def test_folder_without_tokenizer_files_is_refused(tiny_models, tmp_path):
    """Without spiece.model / tokenizer.json, recent transformers build an empty tokenizer that maps every word to
    <unk> (every prompt the same video); the loader refuses the folder and says what is missing and where to get it."""
    src = tiny_models["text_encoder"]
    bare = _copy_without(src, tmp_path / "bare", "spiece.model", "tokenizer.json")
    assert (bare / "config.json").is_file() and not (bare / "spiece.model").exists()
    with pytest.raises(ValueError, match=r"no tokenizer files \(spiece.model or tokenizer.json\).*download"):
        TextEncoder.from_folder(bare, dtype=torch.float32)


def test_a_folder_s_own_tokenizer_code_is_never_run(tiny_models, tmp_path, monkeypatch):
    """A shared folder whose tokenizer_config.json names a class in the folder's own Python file: the standard
    tokenizer is loaded and the file never runs (without trust_remote_code=False transformers asks on the console,
    where a 'y' runs it, or refuses the folder)."""
    import json

    folder = _copy_without(tiny_models["text_encoder"], tmp_path / "remote")
    ran = tmp_path / "ran"
    (folder / "evil_tok.py").write_text(f"open({str(ran)!r}, 'w').write('x')\n"
                                        "from transformers import T5Tokenizer\nclass EvilTokenizer(T5Tokenizer):\n"
                                        "    pass\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil_tok.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    import transformers

    real, asked = transformers.AutoTokenizer.from_pretrained, []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **kw: asked.append(kw.get("trust_remote_code")) or real(*a, **kw))
    encoder = TextEncoder.from_folder(folder, dtype=torch.float32)
    assert asked == [False]  # said, not left to the installed version's default (a console prompt in 4.x)
    assert type(encoder.tokenizer).__name__ != "EvilTokenizer" and not ran.exists()
    assert encoder.tokenize("a red fox")[0][0, 0] != encoder.tokenizer.unk_token_id


def test_tokenizer_much_smaller_than_the_model_is_refused(tiny_models, tmp_path):
    import json

    folder = _copy_without(tiny_models["text_encoder"], tmp_path / "other")
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 32128  # flan-t5's, while this tokenizer knows a few hundred tokens
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="the tokenizer knows .* tokens but the T5 model 32128"):
        TextEncoder.from_folder(folder, dtype=torch.float32)


def test_damaged_or_missing_weights_say_what_to_do(tiny_models, tmp_path):
    src = tiny_models["text_encoder"]
    cut = _copy_without(src, tmp_path / "cut")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="damaged or incomplete.*download them again"):
        TextEncoder.from_folder(cut, dtype=torch.float32)
    none = _copy_without(src, tmp_path / "none", "model.safetensors")
    with pytest.raises(ValueError, match="cannot load the T5 weights.*download"):
        TextEncoder.from_folder(none, dtype=torch.float32)


def test_half_weights_on_cuda_run_under_the_official_bf16_autocast(monkeypatch):
    """The official scripts run T5's fp16 weights inside their bf16 autocast: on a CUDA GPU with bf16 the encoder's
    half-precision matmuls run in bf16 too; fp32 weights, the CPU and GPUs without bf16 run as stored."""
    from infinitystar.text import official_autocast_dtype

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert official_autocast_dtype(cuda, torch.float16) == torch.bfloat16
    assert official_autocast_dtype(cuda, torch.bfloat16) == torch.bfloat16
    assert official_autocast_dtype(cuda, torch.float32) is None and official_autocast_dtype(cpu, torch.float16) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))  # emulated bf16 only
    assert official_autocast_dtype(cuda, torch.float16) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_encoder_on_cuda_runs_under_bf16_autocast(encoder, monkeypatch):
    """On a CUDA GPU the fp16 encoder's matmuls run in bf16 (the official scripts' autocast): finite features close
    to the fp32 encoder's, and what an explicit bf16 autocast gives, bit for bit."""
    gpu = TextEncoder.from_folder(encoder.folder, dtype=torch.float16, device="cuda")
    got = gpu.encode_text("a red car")
    want = encoder.encode_text("a red car")
    assert torch.isfinite(got).all() and (got - want).abs().max() < 0.25
    import infinitystar.text as text_mod

    monkeypatch.setattr(text_mod, "official_autocast_dtype", lambda *a: None)  # the encoder's own autocast off
    with torch.autocast("cuda", dtype=torch.bfloat16):
        explicit = gpu.encode_text("a red car")
    plain = gpu.encode_text("a red car")  # fp16 matmuls
    assert torch.equal(got, explicit) and not torch.equal(got, plain)
