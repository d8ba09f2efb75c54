"""Memory inside a real ComfyUI, in-process on the CPU: every weight of the pack's models goes through ComfyUI's ops
(text encoder and norms included), partial loads give the tokens of full ones, and the sampler's memory plan (reference
K/V kept in host memory when the device lacks room) reaches the nodes. Needs COMFYUI_PATH (see conftest.py).

On a CPU-only ComfyUI ``load_models_gpu`` always loads fully, so these drive the patcher's partial load directly
with a budget below the model's size."""
from __future__ import annotations

import types

import pytest
import torch
from node_kit import SMALL, run


def _partially_loaded(patcher, share: float):
    patcher.partially_load(patcher.load_device, int(patcher.model_size() * share))
    return patcher


def _cast_layers(module) -> tuple[list[str], list[str]]:
    """(layers ComfyUI left to cast in per call, layers holding their own weights without ComfyUI's cast)."""
    cast, plain = [], []
    for name, m in module.named_modules():
        if not any(True for _ in m.parameters(recurse=False)):
            continue
        if getattr(m, "comfy_cast_weights", None) is None:
            plain.append(name)
        elif m.comfy_cast_weights:
            cast.append(name)
    return cast, plain


def test_text_encoder_partly_loaded_encodes_as_fully_loaded(pack, loaded):
    """The Text Encoder Loader builds flan-t5 from comfy.ops (norms too): a third of it loaded, the rest cast in per
    layer, gives the same features; after a Text Encode it stays loaded for the next prompt, as core encoders do."""
    te = run(pack.loaders.InfinityStarTextEncoderLoader, encoder_name="text_encoder/flan-t5-xl-official",
             dtype="fp32")[0]
    want = te.encoder.encode("a red fox in the snow", "blurry", duration_s=5)
    patcher, norms = _partially_loaded(te.patcher, 1 / 3), []
    try:
        cast, plain = _cast_layers(patcher.model)
        assert patcher.model.model_lowvram and not plain
        assert any(name.endswith(".wo") for name in cast)
        norms = [m for name, m in patcher.model.named_modules() if name.endswith("layer_norm")]
        for m in norms:  # as ComfyUI marks the norms it leaves offloaded (these tiny ones fit the budget)
            m.comfy_cast_weights = True
        got = te.encoder.encode("a red fox in the snow", "blurry", duration_s=5)
    finally:
        for m in norms:
            m.comfy_cast_weights = False
        patcher.detach()
    torch.testing.assert_close(got.cond, want.cond, rtol=0, atol=0)
    torch.testing.assert_close(got.uncond, want.uncond, rtol=0, atol=0)
    assert pack.host.is_loaded(loaded["te"].patcher)


def test_the_ops_family_with_norms_dies_with_comfys_family(pack, comfy):
    """ComfyUI makes a new scaled-fp8 ops family on every fp8 load; the pack's subclass of each (its norm hook) must
    not keep them alive (a cache keyed by family grew by one family per load, forever)."""
    import gc
    import weakref

    import comfy.ops

    family = type("Family", (comfy.ops.manual_cast,), {})
    made = pack.host.with_norms(family)
    assert made is pack.host.with_norms(family) and issubclass(made, family) and made.norm_layer
    gone = weakref.ref(family)
    del family, made
    gc.collect()
    assert gone() is None


def test_norms_of_the_transformer_and_tokenizer_are_comfy_layers(pack, loaded, core):
    """No layer of the transformer or the tokenizer holds a weight outside ComfyUI's cast (the root's cfg_uncond and
    sos_token aside, which the ON_LOAD callback places); an offloaded norm computes what a loaded one does."""
    transformer = loaded["model"].patcher.model
    _, plain = _cast_layers(transformer)
    assert plain == [""]  # the root: cfg_uncond, sos_token
    _, plain = _cast_layers(loaded["vae"].patcher.model)
    assert plain in ([], [""])
    norm = transformer.norm_hidden_sates
    assert isinstance(norm, core("transformer").RMSNorm) and hasattr(norm, "weight_function")
    x = torch.randn(3, norm.weight.shape[0])
    kept = norm.weight.detach().clone()
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, norm.weight.shape[0]))
        want = norm(x)
        norm.comfy_cast_weights = True
        calls = []
        norm.weight_function = [lambda w: calls.append(w.dtype) or w]  # a patch ComfyUI would apply
        try:
            got = norm(x)
        finally:
            norm.comfy_cast_weights, norm.weight_function = False, []
            norm.weight.copy_(kept)
    assert calls == [torch.float32] and torch.equal(got, want)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_text_encoder_keeps_its_output_projection_fp32(pack, dtype):
    te = run(pack.loaders.InfinityStarTextEncoderLoader, encoder_name="text_encoder/flan-t5-xl-official",
             dtype=dtype)[0]
    module = te.encoder.module
    stored = {name: p.dtype for name, p in module.named_parameters()}
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert {d for n, d in stored.items() if n.endswith("wo.weight")} == {torch.float32}
    assert {d for n, d in stored.items() if not n.endswith("wo.weight")} == {half}


def test_partial_load_matches_full_load(pack, comfy, loaded, core):
    """A third of the transformer on the load device, the rest cast in per layer: same tokens as a full load.

    On a CPU-only ComfyUI, load and offload device are both the CPU and ``load_models_gpu`` always loads fully
    (vram state DISABLED), so this drives the patcher's partial load directly with the budget
    ``load_models_gpu`` would pass; what is exercised is ComfyUI's lowvram bookkeeping and the comfy.ops
    cast-on-the-fly path of every offloaded layer, not a transfer between two devices.
    """
    pipeline = core("pipeline")

    schedule = pipeline.resolve_schedule("0.06M", "16:9", 0)
    text = loaded["cond"].select(0)

    def tokens_with(budget_share: float | None):
        model = run(pack.loaders.InfinityStarModelLoader, model_name="infinitystar_8b_720p_weights",
                    weight_dtype="bf16", compute_dtype="fp32", attention="sdpa")[0]
        patcher = model.patcher
        if budget_share is None:
            patcher.partially_load(patcher.load_device, patcher.model_size() * 2)
        else:
            patcher.partially_load(patcher.load_device, int(patcher.model_size() * budget_share))
        try:
            module = patcher.model
            lowvram = bool(module.model_lowvram)
            loaded_share = patcher.loaded_size() / patcher.model_size()
            out = pipeline.generate(module, text, schedule, seed=11, compute_dtype=model.compute_dtype)
        finally:
            patcher.detach()
        return out, lowvram, loaded_share

    full, full_lowvram, full_share = tokens_with(None)
    part, part_lowvram, part_share = tokens_with(1 / 3)
    assert not full_lowvram and full_share == pytest.approx(1.0, abs=0.05)
    assert part_lowvram and part_share <= 0.34
    assert all(torch.equal(a, b) for a, b in zip(full.bits, part.bits))
    assert torch.equal(full.summed_codes, part.summed_codes)


def test_root_parameters_follow_a_load_that_is_not_partial(pack):
    """The patcher moves leaf modules, and the root's own parameters (cfg_uncond, sos_token) only when its budget
    exceeds the whole model. A budget that covers every leaf but ends within those few MB is neither partial nor
    full (model_lowvram False): the transformer's ON_LOAD callback must still move them and the fp32 heads."""
    moved = []

    class Head(torch.nn.Module):
        def to(self, *args, **kwargs):
            moved.append(args[0])
            return self

    model = torch.nn.Module()
    model.word_embed, model.cfg_uncond = Head(), torch.nn.Parameter(torch.zeros(2))
    model.fp32_modules, model.model_lowvram = ("word_embed", "cfg_uncond"), False
    pack.host._place_small_tensors(types.SimpleNamespace(model=model), torch.device("cpu"), 0, False, False)
    assert moved == [torch.device("cpu")]


def test_sampling_plan_offloads_only_the_reference_kv_the_device_lacks(pack, comfy, core, monkeypatch):
    """The plan the sampler node hands ComfyUI for the 8B model at 480p 10 s on a CUDA device of a given size
    (ComfyUI's memory queries patched: there is no GPU here): no offload on 24 and 80 GB, the fewest layers that
    fit on 16 GB; on the CPU it never offloads."""
    host = pack.host
    config = core("config").TRANSFORMER_PRESETS["8b"]
    memory = core("memory")
    schedule = core("schedule").build_schedule("480p", "16:9", 161)
    fp8_weights = 8_768_382_112

    class Patcher:
        load_device = torch.device("cuda", 0)
        model = types.SimpleNamespace(block_dtype=lambda: torch.float8_e4m3fn)  # fp8 blocks

        def model_size(self):
            return fp8_weights

    monkeypatch.setattr(comfy, "minimum_inference_memory", lambda: 2**30)
    attention = core("attention")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # a Hopper GPU
    attention._capability.cache_clear()
    plans = {}
    for gb in (16, 24, 80):
        monkeypatch.setattr(comfy, "get_total_memory", lambda dev=None, torch_total_too=False, gb=gb: gb * 2**30)
        plans[gb] = host.sampling_plan(Patcher(), config, schedule, torch.bfloat16)
    fp8 = dict(dtype=torch.bfloat16, weight_dtype=torch.float8_e4m3fn)
    resident = memory.estimate_sampling_memory(config, schedule, **fp8)
    assert plans[80] == (resident, 0) and plans[24] == (resident, 0)
    need, layers = plans[16]
    room = 15 * 2**30 - fp8_weights  # 16 GiB less ComfyUI's minimum inference memory and the weights
    assert 0 < layers < config.depth  # part of the layers: the fewest that fit
    assert need == memory.estimate_sampling_memory(config, schedule, offload_kv=layers, **fp8) <= room
    assert memory.estimate_sampling_memory(config, schedule, offload_kv=layers - 1, **fp8) > room
    assert resident > memory.estimate_sampling_memory(config, schedule, dtype=torch.bfloat16)  # the fp8 upcast copy
    # an RTX 20xx (fp16: no bf16 there) reads GQA K/V through a copy per query head: the plan counts it
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    attention._capability.cache_clear()
    need, _ = host.sampling_plan(Patcher(), config, schedule, torch.float16)
    copies = dict(dtype=torch.float16, weight_dtype=torch.float8_e4m3fn)
    assert need > memory.estimate_sampling_memory(config, schedule, **copies, native_gqa=True)
    attention._capability.cache_clear()
    Patcher.load_device = torch.device("cpu")
    on_cpu = memory.estimate_sampling_memory(config, schedule, **fp8, native_gqa=False)  # the CPU repeats K/V
    assert host.sampling_plan(Patcher(), config, schedule, torch.bfloat16) == (on_cpu, 0) and on_cpu > resident


def test_sampler_and_extend_nodes_carry_the_offload_plan(pack, loaded, core, monkeypatch):
    """When the plan says "offload" (a small GPU; forced here, the CPU never needs it) the Sampler and Extend
    nodes run with the reference K/V of that many layers in host memory, and give the same tokens."""
    host = pack.host
    kv_cache = core("kv_cache")
    made = []

    class Recorded(kv_cache.ScaleKVCache):
        def __init__(self, n, offload=False, **kw):
            super().__init__(n, offload=offload, **kw)
            made.append(self)

    monkeypatch.setattr(core("sampler"), "ScaleKVCache", Recorded)
    real_plan = host.sampling_plan

    def sample(offload: bool | int, **inputs):
        monkeypatch.setattr(host, "sampling_plan", lambda *a: (real_plan(*a)[0], offload))
        made.clear()
        out = run(pack.sampling.InfinityStarSampler, model=loaded["model"], positive=loaded["cond"], duration="5 s",
                  seed=9, **SMALL)[0]
        longer = run(pack.video.InfinityStarExtend, model=loaded["model"], positive=loaded["cond"], tokens=out,
                     clips=1, seed=2, guidance_scale=34.0, apg_threshold=0.05, use_plain_cfg=False, tau_video=0.4)[0]
        return out, longer, [c.offload_layers for c in made], max(c.peak_offloaded_nbytes for c in made)

    plain, plain_longer, flags, offloaded = sample(0)
    assert flags == [0, 0] and offloaded == 0
    depth = loaded["model"].info.config.depth
    for layers, want in ((1, 1), (True, depth)):  # the first layer, every layer
        off, off_longer, flags, offloaded = sample(layers)
        assert flags == [want, want] and offloaded > 0, (layers, flags)
        assert all(torch.equal(a, b) for a, b in zip(plain.bits, off.bits))
        assert all(torch.equal(a, b) for a, b in zip(plain_longer.bits, off_longer.bits))


def test_unguided_runs_plan_and_sample_one_branch(pack, loaded, core, monkeypatch):
    """guidance_scale 1 (and a guidance schedule of ones): the nodes ask ComfyUI for the memory of one branch and
    the sampler runs batch 1, as the official sampler at cfg 1; any guided scale keeps both branches."""
    host = pack.host
    batches, real_plan = [], host.sampling_plan
    monkeypatch.setattr(host, "sampling_plan", lambda *a: (batches.append(a[5]), real_plan(*a))[1])  # batch
    ran, transformer = [], core("transformer").InfinityStarTransformer
    real_forward = transformer.forward_blocks

    def forward_blocks(self, x, ctx, dtype=None):
        ran.append((x[0] if isinstance(x, list) else x).shape[0])
        return real_forward(self, x, ctx, dtype)

    monkeypatch.setattr(transformer, "forward_blocks", forward_blocks)
    unguided = {**SMALL, "guidance_scale": 1.0}
    one = run(pack.sampling.InfinityStarSampler, model=loaded["model"], positive=loaded["cond"], duration="image",
              seed=3, **unguided)[0]
    run(pack.sampling.InfinityStarSampler, model=loaded["model"], positive=loaded["cond"], duration="image", seed=3,
        guidance_schedule="1, 1", **SMALL)
    run(pack.sampling.InfinityStarSampler, model=loaded["model"], positive=loaded["cond"], duration="image", seed=3,
        guidance_schedule="1, 3", **unguided)
    assert batches == [1, 1, 2]
    steps = one.schedule().num_steps + 1  # and the text step
    assert ran == [1] * steps + [1] * steps + [2] * steps
    need = {b: real_plan(loaded["model"].patcher, loaded["model"].info.config, one.schedule(), torch.float32, 0, b)[0]
            for b in (1, 2)}
    assert need[1] < need[2]
