"""convert: the official fp32 transformer as one bf16/fp16 .safetensors file, read back by safetensors itself and
loaded as the same model the loader makes from the official files."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from infinitystar.checkpoint import CheckpointReader, load_transformer
from infinitystar.cli import main
from infinitystar.convert import convert_safetensors


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
