"""The ops-built flan-t5 encoder against Hugging Face's ``T5EncoderModel`` (what the official scripts run), on random
tiny configurations saved as Hugging Face folders."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import infinitystar.ops as lib_ops
from infinitystar.t5 import T5Config, T5Encoder, load_t5_encoder, relative_position_bucket

transformers = pytest.importorskip("transformers")


def _hf_config(**over):
    kw = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4, feed_forward_proj="gated-gelu",
              dropout_rate=0.0, is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)
    kw.update(over)
    return transformers.T5Config(**kw)


def _save(model, folder, **kw):
    with torch.no_grad():  # T5's init leaves the weights tiny; spread them so that every layer matters
        for p in model.parameters():
            p.normal_(0, 0.5)
    model.save_pretrained(str(folder), **kw)
    return folder


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(_hf_config()).eval()
    return _save(model, tmp_path_factory.mktemp("gated")), model


def _ids_and_mask(batch=2, length=40, valid=(40, 23), vocab=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, length), generator=g)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row, n in enumerate(valid):
        mask[row, :n] = 1
        ids[row, n:] = 0
    return ids, mask


@pytest.mark.parametrize("proj", ["gated-gelu", "relu"])
def test_features_match_hugging_face_with_padding(tmp_path, proj):
    torch.manual_seed(3)
    reference = transformers.T5EncoderModel(_hf_config(feed_forward_proj=proj)).eval()
    folder = _save(reference, tmp_path / proj)
    ours = load_t5_encoder(folder, dtype=torch.float32)
    assert ours.config.gated == (proj == "gated-gelu")
    ids, mask = _ids_and_mask()
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    for row, n in enumerate(mask.sum(1).tolist()):  # padded positions are never used (features are compacted)
        torch.testing.assert_close(got[row, :n], want[row, :n], rtol=1e-5, atol=1e-5)


def test_buckets_match_hugging_face():
    from transformers.models.t5.modeling_t5 import T5Attention

    offsets = torch.arange(-600, 601)[None, :]
    for buckets, distance in ((32, 128), (16, 64), (8, 20)):
        want = T5Attention._relative_position_bucket(offsets, bidirectional=True, num_buckets=buckets,
                                                     max_distance=distance)
        assert torch.equal(relative_position_bucket(offsets, buckets, distance), want)


@pytest.mark.parametrize("autocast", [True, False])
def test_half_storage_is_hugging_face_s_under_bf16_autocast_and_without(gated, autocast):
    """fp16 storage keeps ``wo`` in fp32 as Hugging Face does (its fp16 overflow guard); under the official bf16
    autocast (CPU autocast here) and in plain fp16 (GPUs without bf16) the features are Hugging Face's, bit for bit:
    the same ops in the same order (GELU written out, not fused)."""
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(f"transformers {transformers.__version__} runs T5's attention softmax in fp32 (5.x: in the scores' "
                    "dtype, as ours): on the CPU the half-precision features differ")
    folder, _ = gated
    ours = load_t5_encoder(folder, dtype=torch.float16)
    reference = transformers.T5EncoderModel.from_pretrained(str(folder), dtype=torch.float16).eval()
    want_dtypes = {k: v.dtype for k, v in reference.state_dict().items() if k != "encoder.embed_tokens.weight"}
    assert {k: v.dtype for k, v in ours.state_dict().items()} == want_dtypes
    assert ours.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    ids, mask = _ids_and_mask()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = ours(ids, mask)
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    assert got.dtype == want.dtype == torch.float16
    n = int(mask[1].sum())
    for row, length in ((0, ids.shape[1]), (1, n)):
        assert torch.isfinite(got[row, :length]).all() and torch.equal(got[row, :length], want[row, :length])


def test_encoder_decoder_folder_reads_the_encoder_only(tmp_path, monkeypatch):
    """The published flan-t5-xl folder holds the whole encoder-decoder in two shards: the decoder and LM head are
    never read, and the encoder is the same as an encoder-only save of the same weights."""
    from infinitystar.checkpoint_files import CheckpointReader

    torch.manual_seed(5)
    full = transformers.T5ForConditionalGeneration(_hf_config(is_encoder_decoder=True, num_decoder_layers=2)).eval()
    folder = _save(full, tmp_path / "full", max_shard_size="60KB")
    assert (folder / "model.safetensors.index.json").is_file()
    read = []
    real = CheckpointReader.tensors

    def recording(self, target=None, device="cpu", keys=None):
        for key, tensor in real(self, target, device, keys):
            read.append(key)
            yield key, tensor

    monkeypatch.setattr(CheckpointReader, "tensors", recording)
    ours = load_t5_encoder(folder, dtype=torch.float32)
    assert read and not any(k.startswith(("decoder.", "lm_head.")) for k in read)
    assert len(read) == len(set(read)) == len(ours.state_dict())
    ids, mask = _ids_and_mask()
    with torch.no_grad():
        want = full.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(ours(ids, mask)[0], want[0], rtol=1e-5, atol=1e-5)


def test_embedding_under_the_encoder_s_name_and_legacy_bin_files(gated, tmp_path, monkeypatch):
    """Files that name the embedding ``encoder.embed_tokens.weight`` load; a folder with only ``pytorch_model.bin``,
    or with ``.bin`` shards under ``pytorch_model.bin.index.json`` (as transformers saves without safetensors), is
    read weights-only."""
    folder, reference = gated
    tensors = load_file(str(folder / "model.safetensors"))
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "config.json").write_text((folder / "config.json").read_text())
    tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
    save_file(tensors, str(renamed / "model.safetensors"))
    legacy = tmp_path / "legacy"  # as older transformers saved (and older hub snapshots hold)
    legacy.mkdir()
    (legacy / "config.json").write_text((folder / "config.json").read_text())
    torch.save({k: v.clone() for k, v in reference.state_dict().items()}, legacy / "pytorch_model.bin")
    assert (legacy / "pytorch_model.bin").is_file() and not list(legacy.glob("*.safetensors"))
    shards = tmp_path / "shards"  # as transformers 4 saved with safe_serialization=False and a max_shard_size
    shards.mkdir()
    (shards / "config.json").write_text((folder / "config.json").read_text())
    state = reference.state_dict()
    halves = (list(state)[: len(state) // 2], list(state)[len(state) // 2:])
    weight_map = {}
    for i, keys in enumerate(halves, 1):
        torch.save({k: state[k].clone() for k in keys}, shards / f"pytorch_model-0000{i}-of-00002.bin")
        weight_map.update(dict.fromkeys(keys, f"pytorch_model-0000{i}-of-00002.bin"))
    (shards / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw.get("weights_only")) or real_load(*a, **kw))
    ids, mask = _ids_and_mask()
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        for path in (renamed, legacy, shards):
            torch.testing.assert_close(load_t5_encoder(path, dtype=torch.float32)(ids, mask)[0], want[0],
                                       rtol=1e-5, atol=1e-5)
    assert calls and all(calls)


def test_foreign_or_incomplete_files_name_what_is_wrong(gated, tmp_path):
    folder, _ = gated
    tensors = load_file(str(folder / "model.safetensors"))
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "config.json").write_text((folder / "config.json").read_text())
    del tensors["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"]
    save_file(tensors, str(cut / "model.safetensors"))
    with pytest.raises(ValueError, match=r"1 missing: encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_0\.weight"):
        load_t5_encoder(cut)
    (cut / "config.json").write_text('{"model_type": "bert", "vocab_size": 9}')
    with pytest.raises(ValueError, match="not a T5 config"):
        load_t5_encoder(cut)
    (cut / "config.json").write_text('{"model_type": "bert", "vocab_size": 9, "d_model": 8, "d_kv": 2, "d_ff": 8, '
                                     '"num_heads": 4, "num_layers": 1}')
    with pytest.raises(ValueError, match="'bert' model, not T5"):
        load_t5_encoder(cut)


class _Recorded(lib_ops.cast):
    """An ops namespace as a host gives it: casting Linears and a norm hook that sees every weight read."""
    reads = []

    @staticmethod
    def norm_layer(cls):
        class Hooked(cls):
            def weight_as(self, x, dtype):
                _Recorded.reads.append(dtype)
                return super().weight_as(x, dtype)
        return Hooked


def test_every_layer_comes_from_the_injected_ops(gated):
    folder, reference = gated
    with torch.device("meta"):
        bare = T5Encoder(T5Config.from_folder(folder))
    ours = load_t5_encoder(folder, dtype=torch.float32, ops=_Recorded)
    linears = [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, lib_ops.CastLinear) for m in linears)
    norms = [m for m in ours.modules() if type(m).__name__ == "Hooked"]
    assert len(norms) == 2 * ours.config.num_layers + 1
    assert sum(isinstance(m, torch.nn.Linear) for m in bare.modules()) == len(linears)
    _Recorded.reads.clear()
    ids, mask = _ids_and_mask()
    with torch.no_grad():
        got = ours(ids, mask)
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    assert len(_Recorded.reads) == len(norms)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_fp16_activations_stay_finite():
    from infinitystar.t5 import _clamp_fp16

    x = torch.tensor([float("inf"), -float("inf"), 1.5, 65000.0]).half()
    y = _clamp_fp16(x)  # an overflow: everything within 1000 of the fp16 maximum (as Hugging Face's T5)
    assert torch.isfinite(y).all() and y[2] == 1.5 and y[0] == -y[1] == y[3] == 64512
    finite = torch.tensor([65000.0, -65504.0, 1.5]).half()
    assert torch.equal(_clamp_fp16(finite), finite)  # nothing overflowed: left alone
    same = torch.tensor([1e30, 2.0])
    assert _clamp_fp16(same) is same


def test_folders_without_readable_weights_say_what_they_hold(gated, tmp_path):
    folder, _ = gated
    index = json.dumps({"weight_map": {"shared.weight": "pytorch_model-00001-of-00002.bin",
                                       "encoder.final_layer_norm.weight": "pytorch_model-00002-of-00002.bin"}})
    for name, files, says in (
            ("sharded_bin", {"pytorch_model.bin.index.json": index, "pytorch_model-00001-of-00002.bin": "{}"},
             r"shards listed in pytorch_model\.bin\.index\.json are missing: \['pytorch_model-00002-of-00002\.bin'\]"),
            ("empty", {}, "holds no T5 weights")):
        target = tmp_path / name
        target.mkdir()
        (target / "config.json").write_text((folder / "config.json").read_text())
        for f, text in files.items():
            (target / f).write_text(text)
        with pytest.raises(FileNotFoundError, match=says) as info:
            load_t5_encoder(target)
        assert "720p" not in str(info.value)  # not the transformer's download hint


def test_progress_per_tensor_and_a_cancel_frees_what_was_read(gated):
    """callback(done_bytes, total_bytes) per tensor read, rising to the total; an exception from it (a host's
    cancel) stops the load and leaves no tensor it read on the model the traceback still holds."""
    folder, _ = gated
    seen = []
    load_t5_encoder(folder, dtype=torch.float32, callback=lambda done, total: seen.append((done, total)))
    assert len(seen) > 5 and seen == sorted(seen) and seen[-1][0] == seen[-1][1] > 0

    class Cancel(Exception):
        pass

    def cancel(done, total):
        if done > total // 2:
            raise Cancel

    with pytest.raises(Cancel) as info:
        load_t5_encoder(folder, dtype=torch.float32, callback=cancel)
    frames = [tb.tb_frame for tb in _walk(info.value.__traceback__)]
    models = [f.f_locals["model"] for f in frames if isinstance(f.f_locals.get("model"), T5Encoder)]
    assert models and all(p.is_meta for m in models for p in m.parameters())


def _walk(tb):
    while tb is not None:
        yield tb
        tb = tb.tb_next
