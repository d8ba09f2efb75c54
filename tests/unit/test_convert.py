"""convert: the official fp32 transformer as one bf16/fp16 .safetensors file, read back by safetensors itself and
loaded as the same model the loader makes from the official files."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from infinitystar.checkpoint import CheckpointReader, load_transformer
from infinitystar.cli import main
from infinitystar.convert import convert_safetensors, convert_text_encoder


@pytest.mark.parametrize("variant,dtype", [("720p", "bf16"), ("interact", "bf16"), ("480p", "fp16")])
def test_converted_file_is_the_model_the_loader_makes_from_the_official_files(tiny_models, tmp_path, variant, dtype):
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    out = convert_safetensors(tiny_models[f"transformer_{variant}"], tmp_path / "renamed.safetensors", dtype)
    expect, expect_info = load_transformer(tiny_models[f"transformer_{variant}"], dtype=torch_dtype)
    got, info = load_transformer(out)  # as stored
    assert info.variant == variant == expect_info.variant  # from the metadata: the name says nothing
    assert info.dtype == torch_dtype
    want = expect.state_dict()
    have = got.state_dict()
    assert want.keys() == have.keys()
    for key, tensor in want.items():
        assert have[key].dtype == tensor.dtype and torch.equal(have[key], tensor), key
    fp32 = {k for k, t in have.items() if t.dtype == torch.float32}
    assert any(k.startswith("word_embed") for k in fp32) and "cfg_uncond" in fp32
    assert any(k.endswith("norm.weight") and k.startswith("block_chunks") for k in fp32) == (variant == "interact")
    with safe_open(str(out), "pt") as f:  # a valid file for safetensors itself, tensors included
        assert f.metadata()["variant"] == variant
        source = CheckpointReader(tiny_models[f"transformer_{variant}"]).state_dict()
        assert len(f.keys()) > 10 and set(f.keys()) <= set(source)
        for key in f.keys():  # each tensor is the official one rounded to its dtype
            written = f.get_tensor(key)
            assert torch.equal(written, source[key].to(written.dtype)), key


def test_convert_refuses_what_it_cannot_write_and_leaves_no_partial_file(tiny_models, tmp_path):
    src = tiny_models["transformer_720p"]
    with pytest.raises(ValueError, match="fp8"):
        convert_safetensors(src, tmp_path / "a.safetensors", "fp8")
    with pytest.raises(ValueError, match=r"\*\.safetensors"):
        convert_safetensors(src, tmp_path / "a.bin")
    with pytest.raises(ValueError, match="not an InfinityStar transformer"):
        convert_safetensors(tiny_models["text_encoder"], tmp_path / "t.safetensors")
    from safetensors.torch import save_file

    foreign = CheckpointReader(src).state_dict()  # the official tensors plus one no InfinityStar model has
    foreign["extra.weight"] = torch.zeros(3)
    save_file(foreign, str(tmp_path / "src_extra.safetensors"))
    with pytest.raises(ValueError, match="extra.weight"):  # checked before anything is written
        convert_safetensors(tmp_path / "src_extra.safetensors", tmp_path / "b.safetensors")
    (tmp_path / "src_extra.safetensors").unlink()
    with pytest.raises(ValueError, match="checkpoint being read"):
        convert_safetensors(src, src / "inside.safetensors")
    (tmp_path / "taken.safetensors").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        convert_safetensors(src, tmp_path / "taken.safetensors")

    def interrupt(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_safetensors(src, tmp_path / "cut.safetensors", progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.safetensors"]


def test_cli_convert(tiny_models, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["convert", str(tiny_models["transformer_480p"]), str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert load_transformer(out)[1].variant == "480p"
    assert main(["convert", str(tiny_models["transformer_480p"]), str(out)]) == 2  # exists: refused, not replaced
    assert "exists" in capsys.readouterr().err


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory, tiny_models):
    """A Hugging Face encoder-decoder T5 folder in two shards (as the published flan-t5-xl-official), with the tiny
    set's tokenizer files."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    config = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    model = transformers.T5ForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("t5") / "flan-t5-xl-official"
    model.save_pretrained(str(folder), max_shard_size="60KB")
    for file in tiny_models["text_encoder"].iterdir():
        if file.name not in ("config.json", "model.safetensors"):
            shutil.copy2(file, folder / file.name)
    return folder


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_encoder_only_text_encoder_loads_as_the_published_folder_does(t5_folder, tmp_path, dtype):
    """The converted folder: no decoder, the tokenizer and config copied, and the encoder the loaders make from it
    equal, tensor for tensor and dtype for dtype, to what they make from the published folder at that dtype."""
    from infinitystar.t5 import load_t5_encoder

    torch_dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    out = convert_text_encoder(t5_folder, tmp_path / "t5_enc", dtype)
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".model")) == sorted(
        p.name for p in t5_folder.iterdir() if p.suffix in (".json", ".model") and not p.name.endswith(".index.json"))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith(("decoder.", "lm_head.")) for k in keys)
    want = load_t5_encoder(t5_folder, dtype=torch_dtype).state_dict()
    have = load_t5_encoder(out, dtype=torch_dtype).state_dict()
    assert want.keys() == have.keys()
    for key, tensor in want.items():
        assert have[key].dtype == tensor.dtype and torch.equal(have[key], tensor), key
    size = (out / "model.safetensors").stat().st_size
    published = sum(p.stat().st_size for p in t5_folder.glob("*.safetensors"))
    assert size < published * (0.5 if dtype == "fp32" else 0.3)  # no decoder (and halves)


def test_cli_convert_text_encoder_refuses_what_it_cannot_write(t5_folder, tiny_models, tmp_path, capsys):
    out = tmp_path / "enc"
    assert main(["convert-text-encoder", str(t5_folder), str(out)]) == 0 and (out / "model.safetensors").is_file()
    assert main(["convert-text-encoder", str(t5_folder), str(out)]) == 2 and "exists" in capsys.readouterr().err
    assert main(["convert-text-encoder", str(tiny_models["transformer_720p"]), str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc"]  # nothing left of the refused one
    partial = tmp_path / "partial"  # an encoder missing a block's tensor: refused before anything is written
    shutil.copytree(t5_folder, partial)
    from safetensors.torch import load_file, save_file

    index = partial / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = partial / data["weight_map"].pop("encoder.block.1.layer.1.DenseReluDense.wo.weight")
    tensors = load_file(str(shard))
    del tensors["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index.write_text(json.dumps(data))
    assert main(["convert-text-encoder", str(partial), str(tmp_path / "y")]) == 2
    assert "wo.weight" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_convert_text_encoder_writes_into_a_hidden_folder(t5_folder, tmp_path, monkeypatch):
    """The folder being written is hidden (the loaders' lists skip dot-names): one left by a hard kill is not
    offered as a text encoder; an error removes it."""
    import infinitystar.convert as C

    seen = []

    def stopped(path, *args, **kwargs):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C, "write_streamed", stopped)
    with pytest.raises(OSError):
        convert_text_encoder(t5_folder, tmp_path / "enc")
    assert seen == [[".enc.part"]]
    assert list(tmp_path.iterdir()) == []
