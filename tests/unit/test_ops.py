"""infinitystar.ops: layers that upcast stored (fp8) weights at call time; per-tensor scaled e4m3fn storage."""
import math

import pytest
import torch
import torch.nn.functional as F

from infinitystar.checkpoint import load_transformer
from infinitystar.ops import Fp8MatmulLinear, ScaledCastLinear, cast, fp8_matmul_unavailable, quantize_scaled
from infinitystar.sampler import TextCondition, sample
from infinitystar.schedule import build_schedule
from infinitystar.tiny import tiny_transformer_state_dict, write_sharded_safetensors

E4M3 = torch.float8_e4m3fn


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("rows", [1, 500])  # fewer input elements than weight elements, and more
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_linear_computes_with_the_dequantized_weight(rows, dtype):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(64, 32, generator=g) * 0.02, torch.randn(64, generator=g) * 0.1
    q, s = quantize_scaled(w, E4M3)
    assert q.dtype == E4M3 and 224 < w.abs().max().item() / s.item() <= 448  # the top binade of e4m3fn
    assert math.log2(s.item()).is_integer()  # a power of two: scaling is exact in any format
    layer = ScaledCastLinear(32, 64)
    layer.weight = torch.nn.Parameter(q, requires_grad=False)
    layer.bias = torch.nn.Parameter(b, requires_grad=False)
    layer.scale_weight.data.fill_(s.item())
    stored = q.view(torch.uint8).clone()
    x = torch.randn(rows, 32, generator=g).to(dtype)
    want = F.linear(x.float(), q.float() * s, b)
    got = layer(x)
    assert got.dtype == dtype and _rel(got, want) < (1e-6 if dtype == torch.float32 else 1e-2)
    # a power-of-two scale makes scaling the input or the weight exact: the same as the dequantized weight
    assert torch.equal(got, F.linear(x, (q.to(dtype) * s.to(dtype)), b.to(dtype)))
    assert torch.equal(layer.weight.view(torch.uint8), stored)  # the scale went into a copy, not the weight


def test_scaled_linear_leaves_an_uncast_weight_alone():
    layer = ScaledCastLinear(8, 8)
    layer.scale_weight.data.fill_(2.0)
    before = layer.weight.detach().clone()
    x = torch.randn(100, 8)  # more input than weight elements: the weight branch, same dtype (no copy made)
    assert torch.allclose(layer(x), F.linear(x, before * 2, layer.bias), atol=1e-6)
    assert torch.equal(layer.weight, before)


@pytest.mark.parametrize("std", [0.02, 0.01])
def test_scaled_e4m3fn_keeps_more_of_small_weights_than_a_plain_cast(std):
    """Weights near N(0, 0.02) (the official init) sit around e4m3fn's smallest normal (2^-6): a plain cast loses
    mantissa bits there, a per-tensor scale does not."""
    w = torch.randn(2048, 1024, generator=torch.Generator().manual_seed(1)) * std
    q, s = quantize_scaled(w, E4M3)
    scaled, plain = _rel(q.float() * s, w), _rel(w.to(E4M3), w)
    assert scaled < 0.03 and scaled < 0.85 * plain, (scaled, plain)


def test_fp8_blocks_loaded_scaled_give_logits_closer_to_full_precision(tmp_path):
    """The tiny model's blocks stored in e4m3fn, scaled (the default) and plainly cast (ops=cast): per-step
    logits, teacher-forced with the fp32 run's bits, are closer to fp32 with the scale."""
    folder = write_sharded_safetensors(tmp_path / "infinitystar_8b_720p_weights", tiny_transformer_state_dict(seed=2))
    models = {"fp32": load_transformer(folder)[0], "scaled": load_transformer(folder, dtype=E4M3)[0],
              "plain": load_transformer(folder, dtype=E4M3, ops=cast)[0]}
    assert isinstance(models["scaled"].blocks[0].attn.q_proj, ScaledCastLinear)
    assert not any("scale_weight" in k for k in models["plain"].state_dict())
    sched = build_schedule("0.06M", "16:9", 81, num_scales=5)
    text = TextCondition(torch.randn(6, models["fp32"].config.text_channels, generator=torch.Generator().manual_seed(4)))
    logits = {}
    ref = None
    for name, model in models.items():
        steps = []
        out = sample(model, text, sched, seed=1, teacher_bits=None if ref is None else ref.bits,
                     compute_dtype=torch.float32, step_hook=lambda r, steps=steps: steps.append(r.logits.clone()))
        ref = ref or out
        logits[name] = torch.cat([x.flatten() for x in steps])
    scaled, plain = _rel(logits["scaled"], logits["fp32"]), _rel(logits["plain"], logits["fp32"])
    assert 0 < scaled < 0.9 * plain, (scaled, plain)


def _fp8_layer(cls, w, b):
    q, s = quantize_scaled(w, E4M3)
    layer = cls(w.shape[1], w.shape[0])
    layer.weight = torch.nn.Parameter(q, requires_grad=False)
    layer.bias = torch.nn.Parameter(b, requires_grad=False)
    layer.scale_weight.data.fill_(s.item())
    return layer, q.float() * s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_matmul_linear_rounds_only_the_activations(dtype):
    """torch._scaled_mm (CPU here): the weight is used as stored, the input is quantized to e4m3fn with its own
    scale, so the result is a few percent from the dequantized-weight product, shaped and biased like it."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(64, 32, generator=g) * 0.02, torch.randn(64, generator=g) * 0.1
    layer, dequantized = _fp8_layer(Fp8MatmulLinear, w, b)
    x = torch.randn(2, 7, 32, generator=g).to(dtype)
    want = F.linear(x.float(), dequantized, b)
    got = layer(x)
    assert got.shape == (2, 7, 64) and got.dtype == dtype
    assert 1e-3 < _rel(got, want) < 0.05  # activation rounding, nothing worse
    x8 = (x.float() / (x.float().abs().max() / 448)).to(E4M3).float() * (x.float().abs().max() / 448)
    assert _rel(got, F.linear(x8, dequantized, b)) < 1e-2  # = the product with the rounded input


def test_fp8_matmul_linear_row_blocks_and_extremes(monkeypatch):
    """Row blocks give the one-GEMM result (the same quantized rows; only the GEMM's summation order may differ),
    and the largest |x| never turns into NaN without a clamp (the per-tensor scale maps it to 448 at most)."""
    import infinitystar.ops as ops

    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(48, 32, generator=g) * 0.02, torch.randn(48, generator=g) * 0.1
    layer, _ = _fp8_layer(Fp8MatmulLinear, w, b)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(3, 50, 32, generator=g) * torch.logspace(-3, 3, 32)).to(dtype)
        x[1, 7, 5] = -x.abs().max() * 1.0001  # a lone extreme value of either sign sets the scale
        whole = layer(x)
        assert torch.isfinite(whole).all()
        monkeypatch.setattr(ops, "FP8_MATMUL_ROWS", 16)
        tol = 1e-5 if dtype == torch.float32 else 8e-3
        torch.testing.assert_close(layer(x), whole, rtol=tol, atol=tol * whole.abs().max().item())
        monkeypatch.setattr(ops, "FP8_MATMUL_ROWS", 10240)
    for value in (448.0, 1e-30, 3.4e38):  # the quantized extreme is the format's maximum, whatever the scale
        t = torch.full((4, 32), value)
        t[0, 0] = -value
        scale = t.abs().max() / 448
        assert torch.isfinite((t * (1 / scale)).to(torch.float8_e4m3fn).float()).all()


def test_fp8_matmul_linear_falls_back_for_other_weights():
    layer = Fp8MatmulLinear(8, 4)  # fp32 weight (an embedding or head in the official layout)
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_fp8_matmul_availability(monkeypatch):
    assert fp8_matmul_unavailable("cpu") is None
    assert "not available on mps" in fp8_matmul_unavailable("mps")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))  # RTX 30xx
    assert "RTX 40xx" in fp8_matmul_unavailable("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_matmul_unavailable("cuda") is None


def test_load_with_fp8_matmul(tmp_path):
    folder = write_sharded_safetensors(tmp_path / "infinitystar_8b_720p_weights", tiny_transformer_state_dict(seed=2))
    model, _ = load_transformer(folder, dtype=E4M3, fp8_matmul=True)
    assert isinstance(model.blocks[0].mlp.down_proj, Fp8MatmulLinear)
    with pytest.raises(ValueError, match="fp8 matmuls need the blocks stored in fp8 e4m3fn"):
        load_transformer(folder, dtype=torch.bfloat16, fp8_matmul=True)
    sched = build_schedule("0.06M", "16:9", 81, num_scales=4)
    text = TextCondition(torch.randn(6, model.config.text_channels, generator=torch.Generator().manual_seed(4)))
    out = sample(model, text, sched, seed=1, compute_dtype=torch.float32)
    assert len(out.bits) == sched.num_steps and torch.isfinite(out.summed_codes).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or fp8_matmul_unavailable("cuda") is not None,
                    reason="needs a CUDA GPU with fp8 units (sm89+)")
def test_fp8_matmul_linear_on_cuda():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(256, 128, generator=g) * 0.02, torch.randn(256, generator=g) * 0.1
    layer, dequantized = _fp8_layer(Fp8MatmulLinear, w, b)
    layer = layer.cuda()
    for rows in (1, 7, 64):  # row counts that cuBLASLt needs padded, and one it does not
        x = torch.randn(rows, 128, generator=g).cuda().bfloat16()
        want = F.linear(x.float(), dequantized.cuda(), b.cuda())
        assert _rel(layer(x), want) < 0.05, rows


def test_fp8_matmul_row_blocks_give_the_same_rows(monkeypatch):
    """The input is quantized block by block (bounded copies) with one scale for the whole input: the same result
    as a single block (a per-block scale would move it by the fp8 rounding, ~1e-2)."""
    import infinitystar.ops as ops

    g = torch.Generator().manual_seed(3)
    layer, _ = _fp8_layer(Fp8MatmulLinear, torch.randn(48, 32, generator=g) * 0.02, torch.randn(48, generator=g))
    x = torch.randn(3, 11, 32, generator=g)
    whole = layer(x)
    monkeypatch.setattr(ops, "FP8_MATMUL_ROWS", 4)  # 33 rows in 9 blocks, the last one short
    assert _rel(layer(x), whole) < 1e-6  # equal up to the GEMM's summation order for other row counts
