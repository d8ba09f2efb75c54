"""The tiny model set: official layout, determinism, and recognition by the loaders."""
import json

import torch
from safetensors.torch import load_file

from infinitystar.checkpoint import identify_file, inspect_transformer
from infinitystar.config import TRANSFORMER_PRESETS
from infinitystar.download import find_models
from infinitystar.tiny import tiny_transformer_state_dict, train_sentencepiece


def test_layout_is_the_hub_layout(tiny_models):
    for variant in ("720p", "480p"):
        paths = find_models(tiny_models["root"], variant)
        folder = paths["transformer"]
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) >= 2 and all((folder / s).is_file() for s in shards)
        keys = set()
        for s in shards:
            keys |= set(load_file(str(folder / s)))
        assert keys == set(index["weight_map"])
        assert "block_chunks.0.module.0.attn.q_proj.weight" in keys and "norm_hidden_sates.weight" in keys
    vae = torch.load(tiny_models["vae"], weights_only=True)
    assert list(vae) == ["vae"] and "scale_learnable_parameters" in vae["vae"]


def test_loaders_recognise_the_tiny_set(tiny_models):
    info = inspect_transformer(tiny_models["transformer_480p"])
    assert info.variant == "480p" and info.config == TRANSFORMER_PRESETS["tiny"] and info.dtype == torch.float32
    assert "(720p)" in identify_file(tiny_models["transformer_720p"])
    assert identify_file(tiny_models["vae"]) == "InfinityStar video tokenizer (VAE)"


def test_text_encoder_matches_transformer_and_loads_offline(tiny_models, monkeypatch):
    from transformers import AutoTokenizer, T5EncoderModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tiny_models["text_encoder"]
    assert (folder / "spiece.model").is_file()
    model = T5EncoderModel.from_pretrained(str(folder))
    assert model.config.d_model == TRANSFORMER_PRESETS["tiny"].text_channels
    tok = AutoTokenizer.from_pretrained(str(folder), legacy=True)
    ids = tok("<<<t=5s>>>a red fox, Close-up").input_ids
    assert ids[-1] == tok.eos_token_id == 1 and tok.pad_token_id == 0 and max(ids) < model.config.vocab_size


def test_a_folder_holding_model_files_is_not_overwritten(tmp_path, capsys):
    """The tiny set has the official file names: a real download in the folder is refused (one typo would replace
    its tokenizer, text encoder and indexes with random weights), unless --force."""
    from infinitystar.cli import main

    (tmp_path / "infinitystar_videovae.pth").write_bytes(b"REAL")
    assert main(["tiny", str(tmp_path)]) == 2
    assert "already holds infinitystar_videovae.pth" in capsys.readouterr().err
    assert (tmp_path / "infinitystar_videovae.pth").read_bytes() == b"REAL" and len(list(tmp_path.iterdir())) == 1
    assert main(["tiny", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "infinitystar_videovae.pth").stat().st_size > 4


def test_deterministic_for_a_seed():
    a, b, c = tiny_transformer_state_dict(0), tiny_transformer_state_dict(0), tiny_transformer_state_dict(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])
    assert train_sentencepiece(0) == train_sentencepiece(0)
