"""The Model Loader's weight and kernel options inside a real ComfyUI, in-process on the CPU: the default layout,
fp8 and GGUF storage through ComfyUI's ops, bf16 compute, the attention choice and compile. Needs COMFYUI_PATH
(see conftest.py)."""
from __future__ import annotations

import os

import pytest
import torch
from node_kit import SMALL, run


def test_compile_option_runs_the_compiled_block_parts(pack, loaded, core, monkeypatch):
    """compile=True on the loader: the Sampler runs every block's parts around attention through torch.compile (a real
    Inductor build on the CPU) and gives the eager run's tokens up to rare bit flips from rounding; without a
    compiler the loader refuses with what to install."""
    import shutil

    transformer = core("transformer")
    if transformer.compile_unavailable("cpu"):
        pytest.skip("no C++ compiler for torch.compile")
    loader = pack.loaders.InfinityStarModelLoader
    inputs = dict(model_name="infinitystar_8b_720p_weights", weight_dtype="default", compute_dtype="auto",
                  attention="auto")
    compiled = run(loader, **inputs, compile=True)[0]
    assert compiled.compile and not loaded["model"].compile
    calls = []
    real = transformer.compiled
    monkeypatch.setattr(transformer, "compiled", lambda fn: calls.append(fn) or real(fn))
    tokens = {}
    for name, model in (("eager", loaded["model"]), ("compiled", compiled)):
        calls.clear()
        tokens[name] = run(pack.sampling.InfinityStarSampler, model=model, positive=loaded["cond"], duration="5 s",
                           seed=9, **SMALL)[0]
        assert bool(calls) == (name == "compiled")
        assert not calls or {transformer.feed_forward} < set(calls)  # the feed-forward and the attention inputs
    a, b = (torch.cat([x.flatten() for x in tokens[k].bits]) for k in ("eager", "compiled"))
    assert a.shape == b.shape and (a == b).float().mean() > 0.99
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="compile is on, but .*C\\+\\+ compiler"):
        run(loader, **inputs, compile=True)


def test_cancel_while_the_transformer_loads_stops_it_and_frees_what_was_read(pack, comfy, comfy_dirs, core,
                                                                             monkeypatch):
    """The Model Loader reports its progress per tensor read and checks ComfyUI's interrupt flag there: a cancel
    raises ComfyUI's InterruptProcessingException at the next tensor, and nothing of the half-loaded model stays
    in memory; the next, uninterrupted run loads it whole, the bar ending at the checkpoint's size."""
    import gc
    import weakref

    import comfy.utils as comfy_utils

    checkpoint = core("checkpoint")
    built, stream_into = [], checkpoint.stream_into
    monkeypatch.setattr(checkpoint, "stream_into", lambda model, *a, **k: built.append(weakref.ref(model))
                        or stream_into(model, *a, **k))
    calls, cancel = [], [True]

    def hook(value, total, preview, node_id=None):
        calls.append((value, total))
        if cancel.pop() if cancel else False:  # the user presses Cancel once, after the first tensor
            comfy.interrupt_current_processing(True)

    kw = dict(model_name="infinitystar_8b_720p_weights", weight_dtype="default", compute_dtype="auto",
              attention="auto")
    comfy_utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.InterruptProcessingException) as caught:
            run(pack.loaders.InfinityStarModelLoader, **kw)
        assert len(calls) == 1 and 0 < calls[0][0] < calls[0][1]  # stopped at the tensor after the flag went up
        model = built[0]()
        assert model is not None and all(t.is_meta for t in [*model.parameters(), *model.buffers()])
        del model, caught
        gc.collect()
        assert built[0]() is None
        calls.clear()
        loaded = run(pack.loaders.InfinityStarModelLoader, **kw)[0]
    finally:
        comfy_utils.set_progress_bar_global_hook(None)
        comfy.interrupt_current_processing(False)
    assert loaded.info.storage == "float32" and not any(p.is_meta for p in loaded.module.parameters())
    total = checkpoint.CheckpointReader(loaded.info.path)
    assert len(calls) > 2 and calls[-1] == (sum(map(checkpoint.stored_bytes, total.entries.values())),) * 2
    assert all(a[0] < b[0] for a, b in zip(calls, calls[1:]))


def test_download_node_copy_reports_per_chunk_and_can_be_cancelled(pack, comfy, comfy_dirs, core, tmp_path,
                                                                  monkeypatch):
    """With local_source the Download node's bar moves per copied chunk, not once for the whole copy, and a
    cancel stops it there with no partial file left."""
    import comfy.utils as comfy_utils
    import folder_paths

    monkeypatch.setattr(core("download"), "COPY_CHUNK", 64 << 10)
    registered = folder_paths.folder_names_and_paths["infinitystar"][0]
    folder_paths.add_model_folder_path("infinitystar", str(tmp_path), is_default=True)
    calls = []
    kw = dict(variant="720p", components="vae", local_source=str(comfy_dirs["models"]))
    comfy_utils.set_progress_bar_global_hook(lambda v, t, p, node_id=None: calls.append((v, t)))
    try:
        run(pack.loaders.InfinityStarDownloadModels, **kw)
        size = (tmp_path / "infinitystar_videovae.pth").stat().st_size
        assert len({v for v, t in calls if t == size}) > 2  # bytes of the one file, chunk by chunk
        (tmp_path / "infinitystar_videovae.pth").unlink()
        comfy.interrupt_current_processing(True)
        with pytest.raises(comfy.InterruptProcessingException):
            run(pack.loaders.InfinityStarDownloadModels, **kw)
        assert list(tmp_path.iterdir()) == []
    finally:
        comfy_utils.set_progress_bar_global_hook(None)
        comfy.interrupt_current_processing(False)
        registered.remove(str(tmp_path))


def test_fp8_on_apple_mps_is_refused_before_loading(pack, comfy_dirs, monkeypatch):
    import torch as _torch

    host = pack.host
    monkeypatch.setattr(host, "devices", lambda kind: (_torch.device("mps"), _torch.device("cpu")))
    monkeypatch.setattr(pack.loaders, "_pick_attention", lambda choice, device: "sdpa")
    monkeypatch.setattr(host, "resolve_compute_dtype", lambda choice, device: _torch.float16)
    with pytest.raises(ValueError, match="fp8 weights are not supported on Apple MPS"):
        run(pack.loaders.InfinityStarModelLoader, model_name="infinitystar_8b_720p_weights",
            weight_dtype="fp8_e4m3fn", compute_dtype="auto", attention="auto")


def test_default_weight_dtype_is_the_official_layout(pack, comfy_dirs, monkeypatch):
    """The official files are fp32 (35 GB): on a GPU weight_dtype "default" stores their blocks in bf16 (17.6 GB)
    as the official scripts do, through ComfyUI's bf16 ops; on the CPU they stay fp32."""
    import torch as _torch

    host = pack.host
    kw = dict(model_name="infinitystar_8b_720p_weights", weight_dtype="default", compute_dtype="auto",
              attention="auto")
    assert run(pack.loaders.InfinityStarModelLoader, **kw)[0].info.storage == "float32"
    monkeypatch.setattr(host, "devices", lambda kind: (_torch.device("cuda"), _torch.device("cpu")))
    monkeypatch.setattr(pack.loaders, "_pick_attention", lambda choice, device: "sdpa")
    monkeypatch.setattr(host, "resolve_compute_dtype", lambda choice, device: _torch.bfloat16)
    asked, pick_ops = [], host.pick_ops
    monkeypatch.setattr(host, "pick_ops",
                        lambda w, c, d: asked.append((w, d.type)) or pick_ops(w, c, _torch.device("cpu")))
    model = run(pack.loaders.InfinityStarModelLoader, **kw)[0]
    assert asked == [(_torch.bfloat16, "cuda")] and model.info.storage == "bfloat16"
    norms = [m.weight for m in model.module.blocks[0].modules() if type(m).__name__ == "RMSNorm"]
    assert norms and all(w.dtype == _torch.bfloat16 for w in norms)  # T2V weights: the T2V scripts' bf16 norms


def test_auto_weight_dtype_stores_fp8_where_bf16_and_the_largest_run_do_not_fit(pack, comfy, comfy_dirs, core,
                                                                              monkeypatch, caplog, tmp_path):
    """weight_dtype auto, the default of new Model Loaders: on a CUDA GPU the official fp32 files' blocks go to
    bf16 where they and the weights' largest run (720p 5 s; 480p 10 s) fit the GPU's total memory, else to fp8
    e4m3fn, and the log says which; explicit choices stay as they are, and on the CPU auto is default (fp32)."""
    import dataclasses
    import logging

    import comfy.model_management as mm

    host, loader = pack.host, pack.loaders.InfinityStarModelLoader
    schema = {i.id: i for i in loader.define_schema().inputs}["weight_dtype"]
    assert schema.default == "auto" and list(schema.options)[:6] == ["default", "bf16", "fp16", "fp32", "fp8_e4m3fn",
                                                                      "fp8_e5m2"]  # saved workflows keep theirs
    kw = dict(compute_dtype="auto", attention="auto")
    assert run(loader, model_name="infinitystar_8b_720p_weights", weight_dtype="auto", **kw)[0].info.storage == \
        "float32"
    checkpoint, memory, big = core("checkpoint"), core("memory"), core("config").TRANSFORMER_PRESETS["8b"]
    inspect = checkpoint.inspect_transformer  # the 8B model's sizes for the choice; the tiny tensors to load
    monkeypatch.setattr(checkpoint, "inspect_transformer", lambda path: dataclasses.replace(inspect(path), config=big))
    monkeypatch.setattr(host, "devices", lambda kind: (torch.device("cuda"), torch.device("cpu")))
    monkeypatch.setattr(pack.loaders, "_pick_attention", lambda choice, device: "sdpa")
    monkeypatch.setattr(host, "resolve_compute_dtype", lambda choice, device: torch.bfloat16)
    monkeypatch.setattr(core("attention"), "takes_gqa", lambda *a, **k: True)  # SDPA on an Ampere+ GPU
    pick_ops = host.pick_ops
    monkeypatch.setattr(host, "pick_ops", lambda w, c, d: pick_ops(w, c, torch.device("cpu")))

    def needs(variant):  # bf16 blocks + the variant's largest run, and what ComfyUI and "auto" keep free
        (_, schedule), = memory.largest_runs(variant)
        bf16 = torch.bfloat16
        run_bytes = memory.estimate_sampling_memory(big, schedule, batch=2, dtype=bf16, offload_kv=True,
                                                    weight_dtype=bf16, native_gqa=True)
        return memory.weight_bytes(big, bf16) + run_bytes + mm.minimum_inference_memory() + core("sampler").AUTO_HEADROOM

    between = (needs("480p") + needs("720p")) // 2  # 480p 10 s fits in bf16, 720p 5 s does not
    assert needs("480p") < between < needs("720p")
    cases = [(16 << 30, "720p", "auto", "float8_e4m3fn"), (16 << 30, "480p", "auto", "float8_e4m3fn"),
             (80 << 30, "720p", "auto", "bfloat16"), (80 << 30, "480p", "auto", "bfloat16"),
             (between, "480p", "auto", "bfloat16"), (between, "720p", "auto", "float8_e4m3fn"),
             (16 << 30, "720p", "bf16", "bfloat16"), (16 << 30, "720p", "default", "bfloat16"),
             (80 << 30, "720p", "fp8_e4m3fn", "float8_e4m3fn"), (80 << 30, "720p", "fp8_e5m2", "float8_e5m2")]
    for total, variant, choice, want in cases:
        monkeypatch.setattr(mm, "get_total_memory", lambda dev=None, torch_total_too=False, total=total: total)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            model = run(loader, model_name=f"infinitystar_8b_{variant}_weights", weight_dtype=choice, **kw)[0]
        assert model.info.storage == want, (total, variant, choice)
        said = [r.getMessage() for r in caplog.records if "weight_dtype auto" in r.getMessage()]
        assert len(said) == (choice == "auto"), said
        assert not said or ("stored in fp8" in said[0]) == (want != "bfloat16")
    # convert's bf16 file: kept as stored where it fits, fp8 where it does not (as the fp32 files)
    import folder_paths

    converted = tmp_path / "infinitystar_8b_720p_bf16.safetensors"
    core("convert").convert_safetensors(comfy_dirs["models"] / "infinitystar_8b_720p_weights", converted)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(tmp_path)], {".safetensors"}))
    for total, want in ((16 << 30, "float8_e4m3fn"), (80 << 30, "bfloat16")):
        monkeypatch.setattr(mm, "get_total_memory", lambda dev=None, torch_total_too=False, total=total: total)
        model = run(loader, model_name=converted.name, weight_dtype="auto", **kw)[0]
        assert model.info.storage == want, total


@pytest.mark.parametrize("weight_dtype", ["fp8_e4m3fn", "fp8_e5m2"])
def test_fp8_weights_load_and_sample_through_comfy_ops(pack, loaded, weight_dtype):
    """fp8 storage through ComfyUI's ops: e4m3fn as ComfyUI's scaled fp8 (each block weight divided by its own
    scale at load, the scale applied in the layer), e5m2 as a plain cast; both sample."""
    model = run(pack.loaders.InfinityStarModelLoader, model_name="infinitystar_8b_720p_weights",
                weight_dtype=weight_dtype, compute_dtype="auto", attention="auto")[0]
    full = dict(loaded["model"].module.named_modules())
    layers = [(name, m) for name, m in model.module.named_modules()
              if name.startswith("block_chunks.") and isinstance(m, torch.nn.Linear)]
    assert layers
    for name, layer in layers:
        want = full[name].weight.float()
        assert layer.weight.dtype == getattr(torch, "float8_" + weight_dtype.split("_")[1])
        scale = getattr(layer, "scale_weight", None)
        if weight_dtype == "fp8_e4m3fn":
            assert scale is not None and 224 < want.abs().max().item() / scale.item() <= 448
            got = layer.weight.float() * scale
        else:
            assert scale is None
            got = layer.weight.float()
        assert ((got - want).norm() / want.norm()).item() < 0.06, name
    tokens = run(pack.sampling.InfinityStarSampler, model=model, positive=loaded["cond"], duration="image",
                 seed=0, **SMALL)[0]
    assert len(tokens.bits) == tokens.schedule().num_steps


def test_fp8_e4m3fn_where_comfyui_has_no_scaled_fp8_family(pack, loaded, monkeypatch):
    """ComfyUI 0.4 and newer dropped ``pick_operations(scaled_fp8=...)``: fp8_e4m3fn then loads into the pack's own
    scaled family, which holds the same fp8 weights and scales and samples the same tokens."""
    import comfy.ops

    kw = dict(model_name="infinitystar_8b_720p_weights", weight_dtype="fp8_e4m3fn", compute_dtype="auto",
              attention="auto")
    theirs = run(pack.loaders.InfinityStarModelLoader, **kw)[0]
    original = comfy.ops.pick_operations

    def newer(weight_dtype, compute_dtype, load_device=None, disable_fast_fp8=False, fp8_optimizations=False,
              model_config=None):  # ComfyUI 0.8's signature
        return original(weight_dtype, compute_dtype, load_device, disable_fast_fp8, fp8_optimizations)

    monkeypatch.setattr(comfy.ops, "pick_operations", newer)
    ours = run(pack.loaders.InfinityStarModelLoader, **kw)[0]
    assert ours.module is not theirs.module
    theirs_layers = dict(theirs.module.named_modules())
    layers = [(n, m) for n, m in ours.module.named_modules() if n.startswith("block_chunks.") and hasattr(m, "scale_weight")]
    assert layers
    for name, layer in layers:
        # the pack's family, not ComfyUI's (0.3.64's is scaled_fp8_ops.<locals>.scaled_fp8_op.Linear, in comfy.ops)
        assert (type(layer).__module__, type(layer).__qualname__) == (pack.host.__name__, "scaled_fp8_ops.<locals>.Linear")
        assert layer.weight.dtype == torch.float8_e4m3fn
        assert torch.equal(layer.weight.view(torch.uint8), theirs_layers[name].weight.view(torch.uint8)), name
        assert torch.equal(layer.scale_weight, theirs_layers[name].scale_weight), name
    sample = dict(positive=loaded["cond"], duration="image", seed=3, **SMALL)
    a = run(pack.sampling.InfinityStarSampler, model=ours, **sample)[0]
    b = run(pack.sampling.InfinityStarSampler, model=theirs, **sample)[0]
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))

    # --fast fp8_matrix_mult on a GPU with fp8 units: the same layer multiplies in fp8 (the CPU's _scaled_mm here)
    name, layer = layers[0]
    fast = pack.host.scaled_fp8_ops(True).Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                                 dtype=torch.float8_e4m3fn)
    fast.load_state_dict(layer.state_dict())
    x = torch.randn(3, 7, layer.in_features, generator=torch.Generator().manual_seed(0))
    exact = torch.nn.functional.linear(x, layer.weight.float() * layer.scale_weight, layer.bias)
    plain, quick = layer(x), fast(x)
    assert torch.allclose(plain, exact, rtol=1e-5, atol=1e-5)
    assert not torch.equal(quick, plain)  # the input went through fp8
    assert ((quick - exact).norm() / exact.norm()).item() < 0.06
    # which family the loader picks under --fast fp8_matrix_mult: the fp8-matmul one only where the device has fp8 units
    monkeypatch.setattr(pack.host.args, "fast", {pack.host.PerformanceFeature.Fp8MatrixMultiplication})
    for units in (True, False):
        monkeypatch.setattr(pack.host.mm, "supports_fp8_compute", lambda device=None, units=units: units)
        family = pack.host.pick_ops(torch.float8_e4m3fn, torch.float32, torch.device("cpu"))
        assert issubclass(family.Linear, pack.host.scaled_fp8_ops(units).Linear)
        assert not issubclass(family.Linear, pack.host.scaled_fp8_ops(not units).Linear)


def test_small_modules_go_back_to_the_load_device_and_unpin_first(pack):
    """ComfyUI 0.3.76+ may partly unload a loaded transformer to fit a run, smallest modules first, without the load
    callback: the embeddings and heads the sampler runs by go back to the load device (their pinned host copies
    unregistered first, as ComfyUI pins offloaded weights since 0.3.68). "meta" plays the GPU here."""
    model = torch.nn.Module()
    model.word_embed, model.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    model.fp32_modules = ("word_embed", "head")
    unpinned = []

    class Patcher:  # what the seam reads of ComfyUI's patcher
        def __init__(self):
            self.model, self.load_device, self.pinned = model, torch.device("meta"), {"word_embed.weight"}

        def unpin_weight(self, key):
            unpinned.append(key)
            self.pinned.discard(key)

    model.head.to("meta")  # the load left only the smallest modules behind
    patcher = Patcher()
    pack.host._small_tensors_home(patcher)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert unpinned == ["word_embed.weight"] and patcher.pinned == set()
    pack.host._small_tensors_home(patcher)  # all home: nothing to do
    assert unpinned == ["word_embed.weight"]


def test_cudnn_attention_choice_reaches_the_sampler(pack, loaded, core, monkeypatch):
    """attention=cudnn on the loader: every attention call of the Sampler gets backend "cudnn" (on a CPU that is
    plain SDPA, so the tokens equal the default loader's bit for bit)."""
    transformer = core("transformer")
    model = run(pack.loaders.InfinityStarModelLoader, model_name="infinitystar_8b_720p_weights",
                weight_dtype="default", compute_dtype="auto", attention="cudnn")[0]
    assert model.attention == "cudnn"
    seen = set()
    real = transformer.attend
    monkeypatch.setattr(transformer, "attend", lambda *a, **k: seen.add(k.get("backend")) or real(*a, **k))
    out = run(pack.sampling.InfinityStarSampler, model=model, positive=loaded["cond"], duration="5 s", seed=9,
              **SMALL)[0]
    assert seen == {"cudnn"}
    monkeypatch.setattr(transformer, "attend", real)
    want = run(pack.sampling.InfinityStarSampler, model=loaded["model"], positive=loaded["cond"], duration="5 s",
               seed=9, **SMALL)[0]
    assert all(torch.equal(a, b) for a, b in zip(out.bits, want.bits))


def test_bf16_compute_through_comfy_ops_equals_the_plain_core(pack, loaded, core, tiny_models):
    """What GPU users run: bf16 blocks computing in bf16 through ComfyUI's cast ops. The fp32 text and code
    embeddings must be computed as the official autocast does (a bf16 product), exactly as the core's plain
    torch.nn path does, with fp32 code accumulators: same tokens, bit for bit (on a CPU)."""
    checkpoint, pipeline = core("checkpoint"), core("pipeline")
    model = run(pack.loaders.InfinityStarModelLoader, model_name="infinitystar_8b_720p_weights",
                weight_dtype="bf16", compute_dtype="bf16", attention="sdpa")[0]
    assert model.compute_dtype == torch.bfloat16
    tokens = run(pack.sampling.InfinityStarSampler, model=model, positive=loaded["cond"], duration="5 s", seed=9,
                 **SMALL)[0]
    plain, _ = checkpoint.load_transformer(tiny_models["transformer_720p"], dtype=torch.bfloat16)
    want = pipeline.generate(plain.eval(), loaded["cond"].select(5), pipeline.resolve_schedule("0.06M", "16:9", 5),
                             seed=9, compute_dtype=torch.bfloat16)
    assert len(tokens.bits) == len(want.bits)
    assert all(torch.equal(a, b) for a, b in zip(tokens.bits, want.bits))
    assert torch.equal(tokens.summed_codes, want.summed_codes)
    patcher = run(pack.loaders.InfinityStarModelLoader, model_name="infinitystar_8b_720p_weights", weight_dtype="bf16",
                  compute_dtype="bf16", attention="sdpa")[0].patcher  # partly loaded: offloaded layers cast on the fly
    patcher.partially_load(patcher.load_device, patcher.model_size() // 3)
    try:
        assert patcher.model.model_lowvram
        part = pipeline.generate(patcher.model, loaded["cond"].select(5), pipeline.resolve_schedule("0.06M", "16:9", 5),
                                 seed=9, compute_dtype=torch.bfloat16)
    finally:
        patcher.detach()
    assert torch.equal(part.summed_codes, want.summed_codes)
    fp32 = pipeline.generate(plain.float().eval(), loaded["cond"].select(5),
                             pipeline.resolve_schedule("0.06M", "16:9", 5), seed=9, compute_dtype=torch.float32)
    assert not torch.equal(fp32.summed_codes, want.summed_codes)  # bf16 really ran


@pytest.fixture(scope="module")
def gguf_file(pack, core, tiny_models, tmp_path_factory):
    """The tiny 720p transformer converted to Q8_0, in a diffusion_models folder of its own."""
    pytest.importorskip("gguf", reason="pip install gguf (requirements.txt) to test GGUF weights")
    import folder_paths

    folder = tmp_path_factory.mktemp("diffusion_models")
    path = core("gguf").convert(tiny_models["transformer_720p"], folder / "tiny_720p_Q8_0.gguf", "Q8_0")
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    return path


def test_gguf_weights_load_and_sample_through_comfy(pack, loaded, core, gguf_file):
    """A .gguf in diffusion_models: listed for the transformer only, loaded with its blocks still quantized (the
    layers dequantize per call, also when a partial load leaves them in system RAM), and sampled to the same
    tokens as the core's own GGUF path; any weight_dtype but default is refused with what to do."""
    assert gguf_file.name in pack.paths.transformer_choices()
    assert gguf_file.name not in pack.paths.vae_choices()
    model = run(pack.loaders.InfinityStarModelLoader, model_name=gguf_file.name, weight_dtype="default",
                compute_dtype="auto", attention="auto")[0]
    assert model.info.storage == "GGUF Q8_0"
    blocks = [m for name, m in model.module.named_modules()
              if name.startswith("block_chunks.") and isinstance(m, torch.nn.Linear)]
    assert blocks and all(m.weight.dtype == torch.uint8 and m.gguf_type == 8 for m in blocks)
    assert all(hasattr(m, "comfy_cast_weights") for m in blocks)  # what lets ComfyUI's partial load offload them
    tokens = run(pack.sampling.InfinityStarSampler, model=model, positive=loaded["cond"], duration="5 s", seed=4,
                 **SMALL)[0]
    checkpoint, pipeline = core("checkpoint"), core("pipeline")
    plain, _ = checkpoint.load_transformer(gguf_file)
    want = pipeline.generate(plain.eval(), loaded["cond"].select(5), pipeline.resolve_schedule("0.06M", "16:9", 5),
                             seed=4)
    assert all(torch.equal(a, b) for a, b in zip(tokens.bits, want.bits))
    full = run(pack.sampling.InfinityStarSampler, model=loaded["model"], positive=loaded["cond"], duration="5 s",
               seed=4, **SMALL)[0]
    assert not all(torch.equal(a, b) for a, b in zip(tokens.bits, full.bits))  # really the quantized weights
    patcher = run(pack.loaders.InfinityStarModelLoader, model_name=gguf_file.name, weight_dtype="default",
                  compute_dtype="auto", attention="auto")[0].patcher  # partly loaded: the rest stays in system RAM
    patcher.partially_load(patcher.load_device, patcher.model_size() // 3)
    try:
        assert patcher.model.model_lowvram
        assert any(getattr(m, "prev_comfy_cast_weights", None) is not None for m in patcher.model.modules())
        part = pipeline.generate(patcher.model, loaded["cond"].select(5),
                                 pipeline.resolve_schedule("0.06M", "16:9", 5), seed=4)
    finally:
        patcher.detach()
    assert torch.equal(part.summed_codes, want.summed_codes)
    with pytest.raises(ValueError, match="already quantized: set weight_dtype to auto or default"):
        run(pack.loaders.InfinityStarModelLoader, model_name=gguf_file.name, weight_dtype="fp8_e4m3fn",
            compute_dtype="auto", attention="auto")
    import shutil

    upper = shutil.copy(gguf_file, gguf_file.with_name("TINY_UPPER.GGUF"))  # Windows: names are case-blind
    try:
        assert "TINY_UPPER.GGUF" in pack.paths.transformer_choices()
        assert "TINY_UPPER.GGUF" not in pack.paths.vae_choices()
        model = run(pack.loaders.InfinityStarModelLoader, model_name="TINY_UPPER.GGUF", weight_dtype="default",
                    compute_dtype="auto", attention="auto")[0]
        assert model.info.storage == "GGUF Q8_0"
    finally:
        os.remove(upper)


@pytest.mark.parametrize("flag, storage, compute", [
    ("bf16_unet", "bfloat16", torch.bfloat16), ("fp32_unet", "float32", torch.float32),
    ("fp8_e4m3fn_unet", "float8_e4m3fn", torch.float32), ("fp8_e5m2_unet", "float8_e5m2", torch.float32),
    ("fp64_unet", "float32", torch.float32)])  # not offered: auto as without it (the CPU's fp32), said so
def test_comfyui_precision_flags_set_the_auto_dtypes(pack, comfy_dirs, monkeypatch, caplog, flag, storage, compute):
    """ComfyUI started with --bf16-unet / --fp8_e4m3fn-unet / --fp16-text-enc / --bf16-vae...: the loaders' auto
    dtypes follow it, as core's loaders do (it was ignored); explicit choices stay as chosen."""
    import logging

    args = pack.host.args
    monkeypatch.setattr(args, flag, True)
    loader = pack.loaders.InfinityStarModelLoader
    kw = dict(model_name="infinitystar_8b_720p_weights", attention="auto")
    with caplog.at_level(logging.INFO):
        model = run(loader, weight_dtype="auto", compute_dtype="auto", **kw)[0]
    assert (model.info.storage, model.compute_dtype) == (storage, compute)
    name = f"--{flag.replace('_unet', '-unet')}"
    said = {"fp64_unet": f"ComfyUI's {name} is not offered for the transformer; its auto weight and compute dtypes "
                         "pick as without the flag",
            "bf16_unet": f"started with {name}, so the transformer's auto weight and compute dtypes are bf16",
            "fp32_unet": f"started with {name}, so the transformer's auto weight and compute dtypes are fp32"}
    assert said.get(flag, f"started with {name}, so the transformer's auto weight dtype is {flag[:-5]}") in caplog.text
    # the log says what the flag set, and only that
    caplog.clear()
    with caplog.at_level(logging.INFO):
        explicit = run(loader, weight_dtype="fp32", compute_dtype="fp32", **kw)[0]
        assert (explicit.info.storage, explicit.compute_dtype) == ("float32", torch.float32)
        assert f"started with {name}; it changes none of the transformer's dtypes (chosen on its loader)" in caplog.text
        assert "WARNING" not in caplog.text  # nothing on auto: nothing to warn about
        caplog.clear()
        half = run(loader, weight_dtype="fp32", compute_dtype="auto", **kw)[0]
    assert half.info.storage == "float32" and half.compute_dtype == compute
    if flag in ("bf16_unet", "fp32_unet"):
        assert f"so the transformer's auto compute dtype is {flag[:4]}" in caplog.text
    elif flag != "fp64_unet":  # fp8: storage only, which the node chose
        assert "changes none of the transformer's dtypes" in caplog.text and "auto" not in caplog.text
    else:
        assert f"{name} is not offered for the transformer; its auto compute dtype picks as without" in caplog.text
    if flag == "bf16_unet":  # a GPU without bf16 compute: the flag leaves compute on auto, and the log says why
        caplog.clear()
        with monkeypatch.context() as m, caplog.at_level(logging.INFO):
            m.setattr(pack.host, "computes_in", lambda choice, device: choice != "bf16")
            run(loader, weight_dtype="fp32", compute_dtype="auto", **kw)
        assert "changes none of the transformer's dtypes (cpu does not compute in bf16)" in caplog.text
    import comfy.model_management as mm

    for has_bf16 in (False, True):  # --bf16-unet computes in bf16 only on a GPU that has it (as core casts)
        monkeypatch.setattr(mm, "should_use_bf16", lambda device=None, *a, has=has_bf16, **k: has)
        assert pack.host.computes_in("bf16", torch.device("cuda")) is has_bf16
    assert pack.host.computes_in("fp32", torch.device("cuda")) and pack.host.computes_in("bf16", torch.device("cpu"))

    monkeypatch.setattr(args, flag, False)
    monkeypatch.setattr(args, "fp16_text_enc", True)
    monkeypatch.setattr(args, "bf16_vae", True)
    def text_dtypes(dtype):
        encoder = run(pack.loaders.InfinityStarTextEncoderLoader, encoder_name="text_encoder/flan-t5-xl-official",
                      dtype=dtype)[0]
        return {p.dtype for p in encoder.patcher.model.parameters()}

    assert torch.float16 in text_dtypes("auto") and torch.float16 not in text_dtypes("fp32")  # (T5 keeps wo fp32)
    vae = run(pack.loaders.InfinityStarVAELoader, vae_name="infinitystar_videovae.pth", dtype="auto")[0]
    assert vae.module.compute_dtype == torch.bfloat16
    assert run(pack.loaders.InfinityStarVAELoader, vae_name="infinitystar_videovae.pth",
               dtype="fp32")[0].module.compute_dtype == torch.float32
