"""Every weight of the pack's models goes through ComfyUI's ops, text encoder and norms included, so a partial load
can leave any layer offloaded and cast it in per call. Needs COMFYUI_PATH (see conftest.py).

On a CPU-only ComfyUI ``load_models_gpu`` always loads fully, so these drive the patcher's partial load directly
with a budget below the model's size (as ``test_partial_load_matches_full_load`` does for the transformer)."""
from __future__ import annotations

import pytest
import torch
from node_kit import run


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
