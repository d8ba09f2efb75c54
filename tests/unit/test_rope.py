import pytest
import torch

from infinitystar.rope import apply_rope, inv_freq, normalized_positions, text_rope, visual_rope


def test_normalized_positions_round_half_even():
    assert normalized_positions(2, 45).tolist() == [0, 22]  # 22.5 rounds to 22
    assert normalized_positions(45, 45).tolist() == list(range(45))
    assert normalized_positions(1, 80).tolist() == [0]


def test_inv_freq():
    f = inv_freq(128)
    assert f.shape == (16,) and f.dtype == torch.float32 and f[0] == 1.0
    torch.testing.assert_close(f, 1.0 / 10000 ** (torch.arange(16) / 16))


def test_text_rope_uses_only_scale_axis():
    cos, sin = text_rope(7, 32)
    assert cos.shape == (7, 16)
    F = 4
    assert torch.all(cos[:, F:] == 1) and torch.all(sin[:, F:] == 0)
    torch.testing.assert_close(sin[:, 0], torch.sin(torch.arange(7.0)))


def test_visual_rope_axis_major_layout():
    cos, sin = visual_rope(512 + 5, 1, 21, 2, 3, 12, 21, head_dim=32)
    assert cos.shape == (20 * 2 * 3, 16)
    f = inv_freq(32)
    t, h, w = torch.meshgrid(torch.arange(1, 21), torch.tensor([0, 6]), torch.tensor([0, 7, 14]), indexing="ij")
    pos = [torch.full_like(t, 517), t, h, w]  # [scale, frame, height, width], rows 0, 6 on 12; cols 0, 7, 14 on 21
    want = torch.cat([torch.outer(p.flatten().float(), f) for p in pos], dim=-1)
    torch.testing.assert_close(cos, want.cos())
    torch.testing.assert_close(sin, want.sin())


def test_apply_rope_is_interleaved_complex_rotation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 32, generator=g)
    cos, sin = visual_rope(520, 0, 1, 1, 5, 3, 9, head_dim=32)
    y = apply_rope(x, cos, sin)
    xc = torch.view_as_complex(x.reshape(2, 3, 5, 16, 2))
    ref = torch.view_as_real(xc * torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))).reshape(x.shape)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert apply_rope(x.bfloat16(), cos, sin).dtype == torch.bfloat16


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_apply_rope_rounds_each_step_like_the_official_in_place_code(device):
    """Half precision: every partial result is stored in x's dtype, the cross products stay fp32 (spec §2.3
    "Numerics": q0' = bf16(bf16(q0*cos) - q1*sin)); written out here step by step, bit for bit, on the model's
    transposed (B, N, L, D) view of (B, L, N, D) memory, on the CPU and on CUDA."""
    g = torch.Generator().manual_seed(1)
    cos, sin = (t.to(device) for t in visual_rope(530, 0, 2, 3, 5, 6, 10, head_dim=32))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = (torch.randn(2, 30, 4, 32, generator=g) * 4).to(device, dtype).transpose(1, 2)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        t1, t2 = x1 * sin, x0 * sin  # fp32 tables: fp32 products
        y0 = ((x0 * cos).to(dtype) - t1).to(dtype)
        y1 = ((x1 * cos).to(dtype) + t2).to(dtype)
        want = torch.stack([y0, y1], dim=-1).reshape(x.shape)
        got = apply_rope(x, cos, sin)
        assert got.dtype == dtype and got.is_contiguous()
        assert torch.equal(got, want), dtype
        with_grad = apply_rope(x.detach().requires_grad_(dtype == torch.float32), cos, sin)
        assert torch.equal(with_grad, want) and with_grad.requires_grad == (dtype == torch.float32)
        # double rounding matters: rounding once (fp32 throughout) differs somewhere in half precision
        if dtype != torch.float32:
            once = torch.stack([x0.float() * cos - t1, x1.float() * cos + t2], dim=-1).reshape(x.shape).to(dtype)
            assert not torch.equal(got, once)
