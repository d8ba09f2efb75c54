import types

import pytest
import torch
import torch.nn as nn

from infinitystar.config import TRANSFORMER_PRESETS
from infinitystar.rope import text_rope
from infinitystar.transformer import InfinityStarTransformer, RMSNorm, StepContext, load_transformer_state_dict

TINY = TRANSFORMER_PRESETS["tiny"]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return InfinityStarTransformer(TINY).eval()


def test_official_key_layout():
    sd = tiny_model().state_dict()
    assert len(sd) == 33
    for key in ("sos_token", "cfg_uncond", "norm_hidden_sates.weight", "block_chunks.1.module.0.attn.k_norm.weight",
                "block_chunks.0.module.0.mlp.down_proj.weight", "semantic_head2.bias", "word_embed.bias"):
        assert key in sd
    assert sd["head.weight"].shape == (128, 64) and sd["semantic_head2.weight"].shape == (32, 64)
    assert sd["block_chunks.0.module.0.attn.k_proj.weight"].shape == (32, 64)
    assert not any(k.endswith(".bias") and "proj" in k and "text_proj" not in k for k in sd)


def test_one_chunk_is_the_official_blocks_list_and_computes_the_same():
    """With ``block_chunks`` 1 the official model keeps its blocks as ``blocks.{i}`` (no ``block_chunks`` list): a
    checkpoint in that layout is read back as one chunk, and its weights give the tokens they give when chunked."""
    import re

    from infinitystar.config import detect_transformer_config, with_overrides
    from infinitystar.sampler import TextCondition, sample
    from infinitystar.schedule import build_schedule

    torch.manual_seed(0)
    chunked = InfinityStarTransformer(with_overrides(TINY, depth=3, block_chunks=3)).eval()
    one_cfg = with_overrides(TINY, depth=3, block_chunks=1)
    one = InfinityStarTransformer(one_cfg).eval()
    sd = {re.sub(r"^block_chunks\.(\d+)\.module\.0\.", r"blocks.\1.", k): v for k, v in chunked.state_dict().items()}
    assert sorted(sd) == sorted(one.state_dict()) and len(sd) == 33 + 11
    assert "blocks.2.mlp.down_proj.weight" in sd and not any(k.startswith("block_chunks") for k in sd)
    assert detect_transformer_config({k: v.shape for k, v in sd.items()}) == one_cfg
    load_transformer_state_dict(one, sd)
    assert len(one.blocks) == 3 and one.block_dtype() == torch.float32
    text = TextCondition(torch.randn(5, TINY.text_channels, generator=torch.Generator().manual_seed(1)))
    sched = build_schedule("0.06M", "1:1", 1, image_repetition=(1,) * 5, num_scales=5)
    a, b = sample(chunked, text, sched, seed=3), sample(one, text, sched, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits)) and torch.equal(a.summed_codes, b.summed_codes)


def test_ops_injection_builds_every_linear():
    built = []

    class CountingLinear(nn.Linear):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            built.append(self)

    ops = types.SimpleNamespace(Linear=CountingLinear)
    model = InfinityStarTransformer(TINY, ops=ops, device="meta")
    assert len(built) == 4 + 7 * TINY.depth
    assert all(isinstance(m, CountingLinear) for m in model.modules() if isinstance(m, nn.Linear))


def test_rmsnorm_fp32_and_cast_back():
    norm = RMSNorm(8)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    xf = x.float()
    torch.testing.assert_close(y, (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16())


def test_load_reports_problems():
    model = tiny_model()
    sd = model.state_dict()
    bad = dict(sd)
    bad.pop("head.bias")
    bad["extra.weight"] = torch.zeros(1)
    bad["word_embed.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError) as info:
        load_transformer_state_dict(model, bad)
    msg = str(info.value)
    assert "missing 1: head.bias" in msg and "extra.weight" in msg and "word_embed.weight: file (3, 3)" in msg
    short = dict(sd, cfg_uncond=sd["cfg_uncond"][:100].clone())  # official loader extends cfg_uncond
    load_transformer_state_dict(model, short)
    torch.testing.assert_close(model.cfg_uncond[:100], short["cfg_uncond"])


def test_meta_build_and_assign_load():
    src = tiny_model(1)
    meta = InfinityStarTransformer(TINY, device="meta")
    load_transformer_state_dict(meta, src.state_dict(), assign=True)
    assert meta.word_embed.weight.device.type == "cpu"


def test_precision_layout():
    model = tiny_model().apply_precision_layout(torch.bfloat16)
    assert model.block_dtype() == torch.bfloat16
    assert model.head.weight.dtype == model.cfg_uncond.dtype == model.norm_hidden_sates.weight.dtype == torch.float32
    prefix = model.text_prefix(torch.randn(5, TINY.text_channels))
    hidden = model.forward_blocks(prefix, StepContext(text_rope(5, TINY.head_dim)))
    assert hidden.dtype == torch.bfloat16
    assert model.head_logits(hidden, semantic=True).dtype == torch.float32


def test_text_prefix_null_and_negative():
    model = tiny_model()
    cond = torch.randn(6, TINY.text_channels)
    prefix = model.text_prefix(cond)
    torch.testing.assert_close(prefix[1], model.text_proj(model.cfg_uncond[:6]))
    neg = torch.randn(4, TINY.text_channels)
    prefix = model.text_prefix(cond, neg)
    torch.testing.assert_close(prefix[1, :4], model.text_proj(neg))
    assert torch.all(prefix[1, 4:] == 0)  # zero-padded after projection, not the bias
    with pytest.raises(ValueError, match="negative prompt has 7 tokens"):
        model.text_prefix(cond, torch.randn(7, TINY.text_channels))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_matches_the_official_arithmetic(dtype):
    """The CUDA path (F.rms_norm in the input dtype) against the fp32 composite, to the input dtype's rounding."""
    from infinitystar.transformer import fused_rms_norm

    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(64).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=g) + 0.5)
    x = (torch.randn(3, 50, 64, generator=g) * 4).to(dtype)
    want = norm(x).float()  # CPU: the composite
    got = fused_rms_norm(x, norm.weight, norm.eps)
    assert got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7  # one bf16 ulp of values around 1..4
    assert ((got.float() - want).abs() / want.abs().clamp_min(1)).max() <= tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rmsnorm_on_cuda_matches_cpu():
    norm = RMSNorm(4096).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3000, 4096).to(torch.bfloat16)
    want = norm(x).float()
    got = norm.cuda()(x.cuda()).float().cpu()
    assert ((got - want).abs() / want.abs().clamp_min(1)).max() <= 2 ** -7


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_composite_norms_on_cuda_compute_the_official_formula():
    """use_fused_norms(False): the official composite on CUDA, bit for bit (the same kernels in the same order)."""
    model = tiny_model(3).to("cuda", torch.bfloat16).use_fused_norms(False)
    norm = model.blocks[0].input_layernorm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3000, norm.weight.shape[0], device="cuda").to(torch.bfloat16)
    xf = x.float()
    want = ((xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(norm.eps))) * norm.weight).to(torch.bfloat16)
    assert torch.equal(norm(x), want)
    assert all(not m.fused for m in model.modules() if isinstance(m, RMSNorm))


def test_half_precision_embeddings_compute_as_under_autocast():
    """In bf16 the official scripts run text_proj and word_embed (fp32 weights) under autocast: a bf16 product of
    bf16-rounded inputs and weights. Ours must give exactly that, not a rounded fp32 product."""
    model = tiny_model(3)
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(7, TINY.text_channels, generator=g)
    codes = torch.randn(1, TINY.codebook_dim, 2, 3, 4, generator=g) * 0.3
    with torch.no_grad():
        ours_text, ours_codes = model.text_prefix(cond, dtype=torch.bfloat16), model.embed_codes(codes, torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto_text, auto_codes = model.text_prefix(cond), model.embed_codes(codes)
        fp32_text = model.text_prefix(cond)
    assert ours_text.dtype == ours_codes.dtype == torch.bfloat16
    assert torch.equal(ours_text, auto_text) and torch.equal(ours_codes, auto_codes)
    assert not torch.equal(ours_text, fp32_text.bfloat16())  # the difference the autocast semantics make
    assert fp32_text.dtype == torch.float32 and model.embed_codes(codes).dtype == torch.float32
