"""Loading official-layout checkpoints: sharded/merged/.pth, dtype casting, detection and error messages."""
import json
import math

import pytest
import torch
from golden_cases import cases
from safetensors.torch import save_file

from infinitystar.checkpoint import (
    CFG_UNCOND_ROWS,
    default_block_dtype,
    describe_keys,
    identify_file,
    initial_cfg_uncond,
    load_tokenizer,
    load_transformer,
)
from infinitystar.tiny import tiny_tokenizer_state_dict, tiny_transformer_state_dict, write_sharded_safetensors


@pytest.fixture(scope="module")
def sd():
    return tiny_transformer_state_dict(seed=3)


@pytest.fixture(scope="module")
def sharded(sd, tmp_path_factory):
    return write_sharded_safetensors(tmp_path_factory.mktemp("ck") / "infinitystar_8b_480p_weights", sd, shards=3)


def _is_block(key):
    return key.startswith("block_chunks.")


def test_sharded_layout_is_official(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_size"] > 0


def test_load_keeps_file_dtype(sd, sharded):
    model, info = load_transformer(sharded)
    assert info.variant == "480p" and info.dtype == torch.float32 and info.path == sharded
    got = model.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_load_casts_blocks_and_keeps_fp32_modules(sd, sharded, dtype):
    model, info = load_transformer(sharded, dtype=dtype)
    got = model.state_dict()
    assert info.dtype == dtype
    for k, v in sd.items():
        if not _is_block(k):
            want = torch.float32
        elif dtype.itemsize == 1 and v.ndim < 2:
            want = torch.bfloat16
        else:
            want = dtype
        assert got[k].dtype == want, k
        if want == torch.float8_e4m3fn:  # stored with a power-of-two scale: the largest |w| in the top binade
            scale = got[k[: -len("weight")] + "scale_weight"]
            assert 224 < v.abs().max().item() / scale.item() <= 448 and math.log2(scale.item()).is_integer(), k
            assert torch.equal(got[k].view(torch.uint8), (v / scale).to(want).view(torch.uint8)), k
            continue
        assert torch.equal(got[k].view(torch.uint8), v.to(want).view(torch.uint8)), k
    scales = {k for k in got if k.endswith("scale_weight")}
    if dtype == torch.float8_e4m3fn:  # every Linear of the blocks; 1.0 on the fp32 modules' Linears
        assert {k[: -len("scale_weight")] + "weight" for k in scales if got[k] != 1} == {
            k for k, v in sd.items() if _is_block(k) and v.ndim == 2}
    else:
        assert not scales


def test_default_storage_is_the_official_scripts():
    """Weight dtype "default": the official files are fp32 (35 GB); the scripts hold their blocks in bf16 on the
    GPU (17.6 GB). The CPU keeps fp32 (the golden arithmetic); files stored otherwise stay as they are."""
    assert default_block_dtype(torch.float32, "cuda") == torch.bfloat16
    assert default_block_dtype(torch.float32, torch.device("mps")) == torch.bfloat16
    assert default_block_dtype(torch.float32, "cpu") is None
    for stored in (torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.uint8):  # uint8: GGUF
        assert default_block_dtype(stored, "cuda") is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_interact_weights_keep_their_norms_fp32(sd, tmp_path, dtype):
    folder = write_sharded_safetensors(tmp_path / "InfinityStarInteract_24K_iters", sd, shards=2)
    model, info = load_transformer(folder, dtype=dtype)
    assert info.variant == "interact" and info.dtype == dtype
    got = model.state_dict()
    norms = [k for k in sd if _is_block(k) and k.endswith("norm.weight")]
    assert norms and all(got[k].dtype == torch.float32 and torch.equal(got[k], sd[k]) for k in norms)
    assert all(got[k].dtype == dtype for k, v in sd.items() if _is_block(k) and v.ndim == 2)


def test_interact_layout_gives_the_logits_of_fp32_blocks_run_in_bf16(sd, tmp_path):
    """The interact script runs fp32 blocks under bf16 autocast: each matmul sees its weight rounded to bf16, each
    norm its fp32 weight. Stored in bf16 with fp32 norms, the interact weights give exactly the logits of fp32
    blocks run in bf16; the T2V layout (bf16 norms, as the T2V scripts) does not, once the norm weights are not
    bf16 numbers."""
    from infinitystar.config import TRANSFORMER_PRESETS
    from infinitystar.sampler import TextCondition, sample
    from infinitystar.schedule import build_schedule
    from infinitystar.transformer import RMSNorm

    g = torch.Generator().manual_seed(1)
    weights = {k: v + 1e-3 * torch.randn(v.shape, generator=g) if _is_block(k) and k.endswith("norm.weight") else v
               for k, v in sd.items()}
    folder = write_sharded_safetensors(tmp_path / "InfinityStarInteract_24K_iters", weights, shards=2)
    text = TextCondition(torch.randn(7, TRANSFORMER_PRESETS["tiny"].text_channels, generator=g))
    schedule = build_schedule("0.06M", "1:1", 1, num_scales=5)

    def logits(model):
        out = []
        sample(model, text, schedule, seed=2, compute_dtype=torch.bfloat16, step_hook=lambda r: out.append(r.logits))
        return out

    stored, _ = load_transformer(folder, dtype=torch.bfloat16)
    want = logits(load_transformer(folder)[0])  # fp32 blocks
    assert all(torch.equal(a, b) for a, b in zip(logits(stored), want, strict=True))
    for block in stored.blocks:
        for m in block.modules():
            if isinstance(m, RMSNorm):
                m.weight.data = m.weight.data.to(torch.bfloat16)
    assert not all(torch.equal(a, b) for a, b in zip(logits(stored), want, strict=True))


def test_merged_bf16_file_and_pth_variants(sd, tmp_path):
    bf16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    merged = tmp_path / "some_model.safetensors"
    save_file(bf16, str(merged))
    model, info = load_transformer(merged)
    assert info.variant == "unknown" and info.dtype == torch.bfloat16
    assert torch.equal(model.head.weight, bf16["head.weight"])
    for i, payload in enumerate((sd, {"trainer": {"gpt_fsdp": sd}})):
        pth = tmp_path / f"infinitystar_720p_{i}.pth"
        torch.save(payload, pth)
        model, info = load_transformer(pth, dtype=torch.bfloat16)
        assert info.variant == "720p"
        assert torch.equal(model.cfg_uncond, sd["cfg_uncond"])


def test_released_weights_under_a_name_without_their_variant_warn(sd, tmp_path, monkeypatch, caplog):
    """The variant (720p / 480p / interact) comes from the hub names; released-size weights renamed lose it, and the
    loader says so (the tiny set stands in for the released size here)."""
    import infinitystar.checkpoint as checkpoint

    merged = tmp_path / "my_weights_b.safetensors"
    save_file(sd, str(merged))
    with caplog.at_level("WARNING", logger="infinitystar.checkpoint"):
        assert load_transformer(merged)[1].variant == "unknown"
    assert "name does not say" not in caplog.text  # not the released size: no note
    monkeypatch.setattr(checkpoint, "is_released_size", lambda config: True)
    with caplog.at_level("WARNING", logger="infinitystar.checkpoint"):
        load_transformer(merged)
    assert "name does not say which released weights" in caplog.text and "InfinityStarInteract_24K_iters" in caplog.text
    caplog.clear()
    named = tmp_path / "infinitystar_8b_480p_weights.safetensors"
    merged.rename(named)
    with caplog.at_level("WARNING", logger="infinitystar.checkpoint"):
        assert load_transformer(named)[1].variant == "480p"
    assert "name does not say" not in caplog.text


def test_one_shard_says_to_choose_its_folder(sharded):
    shard = sorted(sharded.glob("*-of-*.safetensors"))[1]
    with pytest.raises(ValueError, match="It is shard 2 of 3 of a sharded checkpoint: choose the folder"):
        load_transformer(shard)
    from infinitystar.checkpoint import shard_hint

    assert shard_hint("model-00001-of-00001.safetensors") == "" and shard_hint("model.safetensors") == ""


def test_shards_without_their_index_must_all_be_there(sharded, tmp_path):
    """A cancelled copy or download leaves the first shards (the index is copied last): such a folder is refused as
    incomplete, with the shards it lacks, instead of loading as a model with missing tensors; a whole set loads."""
    import shutil

    folder = tmp_path / "copied"
    folder.mkdir()
    shards = sorted(sharded.glob("*-of-*.safetensors"))
    shutil.copy(shards[0], folder / shards[0].name)
    with pytest.raises(FileNotFoundError, match=r"holds 1 of 3 shards \(model-00002-of-00003.safetensors, "
                                                r"model-00003-of-00003.safetensors missing\).*incomplete"):
        load_transformer(folder)
    for shard in shards[1:]:
        shutil.copy(shard, folder / shard.name)
    model, info = load_transformer(folder)
    assert info.config.depth > 0
    unpadded = tmp_path / "unpadded"  # the missing names are given as the set writes them
    unpadded.mkdir()
    for name in ("part-1-of-12.safetensors", "part-10-of-12.safetensors"):
        shutil.copy(shards[0], unpadded / name)
    with pytest.raises(FileNotFoundError, match=r"holds 2 of 12 shards \(part-2-of-12.safetensors, part-3-of-12"):
        load_transformer(unpadded)
    padded = tmp_path / "padded"
    padded.mkdir()
    for name in ("part-01-of-12.safetensors", "part-02-of-12.safetensors", "part-10-of-12.safetensors"):
        shutil.copy(shards[0], padded / name)
    with pytest.raises(FileNotFoundError, match=r"holds 3 of 12 shards \(part-03-of-12.safetensors, part-04-of-12"):
        load_transformer(padded)


def test_empty_pth_names_the_error(tmp_path):
    empty = tmp_path / "infinitystar_videovae.pth"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"infinitystar_videovae.pth is empty \(0 bytes\).*Download it again"):
        load_tokenizer(empty)
    empty.write_bytes(b"PK\x03\x04 and then nothing")  # a zip cut short: torch's own reason, and what it means
    with pytest.raises(ValueError, match=r"cannot read this \.pth \(\w.*corrupted"):
        load_tokenizer(empty)


def test_fp8_file_loads_as_stored_or_upcast(sd, tmp_path):
    fp8 = {k: (v.to(torch.float8_e5m2) if k.startswith("block_chunks.") and v.ndim == 2 else v) for k, v in sd.items()}
    save_file(fp8, str(tmp_path / "fp8.safetensors"))
    kept, info = load_transformer(tmp_path / "fp8.safetensors")
    assert info.dtype == torch.float8_e5m2
    assert kept.blocks[0].mlp.up_proj.weight.dtype == torch.float8_e5m2
    up, info = load_transformer(tmp_path / "fp8.safetensors", dtype=torch.bfloat16)
    key = "block_chunks.0.module.0.mlp.up_proj.weight"
    assert info.dtype == torch.bfloat16 and torch.equal(up.state_dict()[key], fp8[key].to(torch.bfloat16))


@pytest.mark.parametrize("rows", [300, 600])
def test_cfg_uncond_rows_are_adapted(sd, tmp_path, rows):
    changed = dict(sd)
    channels = sd["cfg_uncond"].shape[1]
    changed["cfg_uncond"] = torch.randn(rows, channels, generator=torch.Generator().manual_seed(rows))
    changed["lvl_1L"] = torch.zeros(3)  # legacy buffer, dropped like the official loader does
    save_file(changed, str(tmp_path / "m.safetensors"))
    model, _ = load_transformer(tmp_path / "m.safetensors")
    assert model.cfg_uncond.shape == (CFG_UNCOND_ROWS, channels)
    n = min(rows, CFG_UNCOND_ROWS)
    assert torch.equal(model.cfg_uncond[:n], changed["cfg_uncond"][:n])
    if rows < CFG_UNCOND_ROWS:
        assert torch.equal(model.cfg_uncond[rows:], initial_cfg_uncond(CFG_UNCOND_ROWS, channels)[rows:])


def test_a_cfg_uncond_without_rows_is_refused(sd, tmp_path):
    """The null text is extended to 512 rows on load: a file holding none (or a foreign width) is refused instead of
    having its few bytes turned into 512 rows (0.77 MiB became 834 MiB)."""
    changed = dict(sd)
    changed["cfg_uncond"] = torch.zeros(0, sd["cfg_uncond"].shape[1])
    save_file(changed, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match=r"cfg_uncond \(0, \d+\) .* is no InfinityStar null text"):
        load_transformer(tmp_path / "m.safetensors")


def test_initial_cfg_uncond_is_official_init():
    ref = torch.empty(512, 32)
    torch.nn.init.trunc_normal_(ref, std=1.2, generator=torch.Generator("cpu").manual_seed(0))
    assert torch.equal(initial_cfg_uncond(512, 32), ref / 32 ** 0.5)


@pytest.mark.parametrize("keys,expect", [
    ({"blocks.0.self_attn.q.weight": (8, 8), "patch_embedding.weight": (8, 16, 1, 2, 2)}, "Wan"),
    ({"block_chunks.0.module.0.sa.mat_qkv.weight": (24, 8), "shared_ada_lin.1.weight": (8, 8)}, "Infinity image"),
    ({"diffusion_model.x.lora_A.weight": (4, 8), "diffusion_model.x.lora_B.weight": (8, 4)}, "LoRA"),
    ({"double_blocks.0.img_attn.qkv.weight": (24, 8)}, "Flux"),
])
def test_foreign_files_are_rejected_with_what_they_look_like(tmp_path, keys, expect):
    path = tmp_path / "foreign.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    assert expect in identify_file(path)
    with pytest.raises(ValueError, match=f"foreign.safetensors is not an InfinityStar transformer.*{expect}"):
        load_transformer(path)
    with pytest.raises(ValueError, match="not the InfinityStar video tokenizer"):
        load_tokenizer(path)


def test_truncated_shard_names_the_file(sharded, tmp_path):
    broken = tmp_path / "infinitystar_8b_720p_weights"
    broken.mkdir()
    for f in sharded.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) - 100] if f.name.startswith("model-00002") else data)
    with pytest.raises(ValueError, match="model-00002-of-00003.safetensors.*truncated"):
        load_transformer(broken)
    (broken / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00003-of-00003"):
        load_transformer(broken)


def test_broken_index_and_headers_are_clear_errors(sharded, tmp_path):
    """An index without weight_map, an index that is no JSON, a header that is a JSON list or an entry without
    offsets: each a ValueError naming the file, not a bare KeyError / AttributeError."""
    import json
    import shutil

    folder = tmp_path / "w"
    shutil.copytree(sharded, folder)
    index = folder / "model.safetensors.index.json"
    for text in ('{"metadata": {}}', "not json", '{"weight_map": {"a": ["x.safetensors"]}}', '{"weight_map": {"a": 3}}'):
        index.write_text(text)
        with pytest.raises(ValueError, match="model.safetensors.index.json: not a shard index"):
            load_transformer(folder)
    for header in ([1, 2], {"x": {"dtype": "F32", "shape": [1]}},
                   # odd entries: a ValueError naming the file, not a TypeError / RuntimeError
                   {"x": {"dtype": "F32", "shape": 4, "data_offsets": [0, 4]}},
                   {"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
                   {"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}},
                   {"x": {"dtype": "F32", "shape": [1], "data_offsets": [-8, 0]}},
                   {"x": {"dtype": "F32", "shape": [1], "data_offsets": ["0", 4]}}):
        raw = json.dumps(header).encode()
        (tmp_path / "h.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 8)
        with pytest.raises(ValueError, match="h.safetensors: corrupted safetensors header"):
            load_transformer(tmp_path / "h.safetensors")
    (tmp_path / "h.safetensors").write_bytes((200_000_000).to_bytes(8, "little") + b"{" * 64)
    with pytest.raises(ValueError, match="a safetensors header of 200,000,000 bytes"):  # not read into memory
        load_transformer(tmp_path / "h.safetensors")
    index.write_text(json.dumps({"weight_map": {"a": "../../elsewhere.safetensors"}}))
    with pytest.raises(ValueError, match="names shard files outside its folder"):  # an index lists names only
        load_transformer(folder)


def test_garbage_file_names_the_file(tmp_path):
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_transformer(bad)


def test_missing_and_misshaped_keys(sd, tmp_path):
    partial = {k: v for k, v in sd.items() if "mlp.down_proj" not in k}
    save_file(partial, str(tmp_path / "p.safetensors"))
    with pytest.raises(ValueError, match="missing: .*mlp.down_proj"):
        load_transformer(tmp_path / "p.safetensors")
    wrong = dict(sd)
    wrong["block_chunks.1.module.0.mlp.down_proj.weight"] = torch.zeros(3, 3)
    save_file(wrong, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="mis-shaped"):
        load_transformer(tmp_path / "w.safetensors")


def test_missing_path_says_how_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m infinitystar download"):
        load_transformer(tmp_path / "nothing_here")


def test_tokenizer_pth_and_safetensors(tmp_path):
    vae_sd = tiny_tokenizer_state_dict(seed=1)
    torch.save({"vae": vae_sd}, tmp_path / "infinitystar_videovae.pth")
    save_file(vae_sd, str(tmp_path / "vae.safetensors"))
    for path in (tmp_path / "infinitystar_videovae.pth", tmp_path / "vae.safetensors"):
        assert identify_file(path) == "InfinityStar video tokenizer (VAE)"
        model = load_tokenizer(path)
        got = model.state_dict()
        assert set(got) == set(vae_sd)
        assert all(torch.equal(got[k], v) for k, v in vae_sd.items())
    half = load_tokenizer(tmp_path / "vae.safetensors", dtype=torch.bfloat16)
    assert half.proj_up.weight.dtype == torch.bfloat16
    assert half.state_dict()["quantizer.lfq_detail.mask"].dtype == vae_sd["quantizer.lfq_detail.mask"].dtype
    with pytest.raises(ValueError, match="not the InfinityStar video tokenizer.*transformer"):
        save_file(tiny_transformer_state_dict(0), str(tmp_path / "t.safetensors"))
        load_tokenizer(tmp_path / "t.safetensors")


def test_full_size_key_manifests_are_recognised():
    from golden_cases import checkpoint_keys_dir

    folder = checkpoint_keys_dir()
    if folder is None:
        pytest.skip("no golden checkpoint_keys folder")
    for name, variant in (("transformer_720p.json", "720p"), ("transformer_480p.json", "480p")):
        keys = json.loads((folder / name).read_text())["keys"]
        shapes = {k: tuple(v["shape"]) for k, v in keys.items()}
        assert describe_keys(shapes, f"/m/infinitystar_8b_{variant}_weights") == f"InfinityStar 8B transformer ({variant})"
    vae = json.loads((folder / "vae_full.json").read_text())["keys"]
    assert describe_keys({k: tuple(v["shape"]) for k, v in vae.items()}) == "InfinityStar video tokenizer (VAE)"


@pytest.mark.golden
@pytest.mark.parametrize("case_dir", cases("t2v", "t2i", "i2v", "v2v"))
def test_golden_transformer_files_load(case_dir):
    from golden_cases import load_manifest

    path = case_dir / "transformer.safetensors"
    spec = load_manifest(case_dir)["transformer"]
    model, info = load_transformer(path)
    cfg = info.config
    assert (cfg.depth, cfg.block_chunks, cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.text_channels) == (
        spec["depth"], spec["block_chunks"], spec["width"], spec["num_heads"], spec["num_kv_heads"],
        spec["text_channels"])
    assert "transformer" in identify_file(path)
    from safetensors.torch import load_file

    ref = load_file(str(path))
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.items() if k in got)


def test_the_variant_comes_from_the_nearest_name_that_says_it(tmp_path):
    """The file's own name before its folders' (a merged file kept in a folder named after another variant), the
    official folder names as downloaded, GGUF metadata above any name, and no word at all gives 'unknown'."""
    from infinitystar.checkpoint import detect_variant

    assert detect_variant(tmp_path / "720p" / "infinitystar_480p_merged.safetensors") == "480p"
    assert detect_variant(tmp_path / "480p" / "InfinityStar-Interact.safetensors") == "interact"
    assert detect_variant(tmp_path / "models" / "infinitystar_8b_720p_weights") == "720p"
    assert detect_variant(tmp_path / "InfinityStarInteract_24K_iters") == "interact"
    assert detect_variant(tmp_path / "720p" / "q8.gguf", {"variant": "480p"}) == "480p"
    assert detect_variant(tmp_path / "weights" / "model.safetensors") == "unknown"


def test_pth_files_on_torch_before_2_6_warn(tmp_path, monkeypatch, caplog):
    """torch < 2.6's weights-only loader can be got past by a crafted file (CVE-2025-32434): a .pth still loads there
    (the official tokenizer is one), with a warning to load only trusted files; from 2.6 on, silently."""
    from infinitystar import checkpoint_files

    torch.save({"w": torch.ones(2)}, tmp_path / "t.pth")
    for version, warned in (("2.5.1+cu124", True), ("2.6.0", False), ("2.13.0+cpu", False)):
        monkeypatch.setattr(torch, "__version__", version)
        caplog.clear()
        with caplog.at_level("WARNING", logger="infinitystar.checkpoint_files"):
            assert torch.equal(checkpoint_files._torch_load(tmp_path / "t.pth")["w"], torch.ones(2))
        assert ("CVE-2025-32434" in caplog.text) == warned, version


def test_load_reports_its_bytes_and_a_raising_callback_stops_it_and_frees_the_model(sd, sharded, monkeypatch):
    """The loader's callback sees the file bytes read so far, increasing to the whole checkpoint; an exception
    from it (a host's cancel) stops the load, and what was read is freed even while the traceback is kept."""
    import gc
    import weakref

    from infinitystar import checkpoint

    seen = []
    load_transformer(sharded, dtype=torch.float8_e4m3fn, callback=lambda done, total: seen.append((done, total)))
    total = json.loads((sharded / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert len(seen) == len(sd) and {t for _, t in seen} == {total}
    assert all(a < b for (a, _), (b, _) in zip(seen, seen[1:])) and seen[-1][0] == total

    class Cancelled(Exception):
        pass

    def cancel(done, total):
        if done > total // 3:
            raise Cancelled

    built, stream_into = [], checkpoint.stream_into
    monkeypatch.setattr(checkpoint, "stream_into", lambda model, *a, **k: built.append(weakref.ref(model))
                        or stream_into(model, *a, **k))
    with pytest.raises(Cancelled) as caught:
        load_transformer(sharded, dtype=torch.bfloat16, callback=cancel)
    model = built[0]()
    assert model is not None  # the traceback holds the loader's frame ...
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])  # ... but none of what it read
    del model, caught
    gc.collect()
    assert built[0]() is None
