import pytest
import torch

from infinitystar import bsq


def test_bits_codes_roundtrip():
    g = torch.Generator().manual_seed(0)
    for d in (16, 64):
        bits = torch.randint(0, 2, (1, 2, 3, 4, d), generator=g, dtype=torch.uint8)
        codes = bsq.bits_to_codes(bits)
        assert codes.shape == (1, d, 2, 3, 4)
        assert torch.allclose(codes.abs(), torch.full_like(codes, d ** -0.5))
        assert torch.equal(bsq.codes_to_bits(codes), bits)


def test_video_accumulate_uses_the_official_code_layout():
    """Codes keep d innermost in memory (as the official indices_to_codes returns them); for t > 1
    that picks the channels-last trilinear kernel, whose rounding differs from a contiguous input's."""
    g = torch.Generator().manual_seed(3)
    bits = torch.randint(0, 2, (1, 20, 2, 3, 16), generator=g, dtype=torch.uint8)
    codes = bsq.bits_to_codes(bits)
    assert codes.stride(1) == 1
    acc = torch.randn(1, 64, 20, 12, 21, generator=g) * 0.1
    signs = bits.float() * 2 - 1
    official = torch.nn.functional.normalize(signs, dim=-1).permute(0, 4, 1, 2, 3)  # [B, d, t, h, w] view
    up = torch.nn.functional.interpolate(official.permute(0, 2, 1, 3, 4), size=(64, 12, 21), mode="trilinear")
    assert torch.equal(bsq.accumulate(acc, bits), acc + up.permute(0, 2, 1, 3, 4))


def test_channel_upsample_is_linear_interpolation_not_repeat():
    codes = torch.arange(16, dtype=torch.float32).view(1, 16, 1, 1, 1)
    up = bsq.upsample_codes(codes, (1, 1, 1)).flatten()
    assert up.shape == (64,)
    # align_corners=False: out[i] = in[clamp((i + 0.5) / 4 - 0.5)] linearly interpolated
    assert up[0] == 0 and up[63] == 15
    assert torch.allclose(up[2], torch.tensor(0.125))


def test_area_down_averages_channel_groups():
    x = torch.arange(64, dtype=torch.float32).view(1, 64, 1, 1, 1)
    down = bsq.resample(x, 16, (1, 1), "area").flatten()
    assert torch.allclose(down, torch.arange(16, dtype=torch.float32) * 4 + 1.5)


def test_resample_rejects_time_change():
    with pytest.raises(ValueError, match="keeps T"):
        bsq.resample(torch.zeros(1, 64, 2, 4, 4), 64, (3, 2, 2), "area")


def test_bf16_accumulator_adds_fp32_codes_in_place_like_the_official_gpu_run():
    g = torch.Generator().manual_seed(0)
    acc = (torch.randn(1, 64, 1, 8, 12, generator=g) * 0.3).bfloat16()
    bits = torch.randint(0, 2, (1, 1, 4, 6, 16), generator=g)
    want = acc.clone()
    want += bsq.upsample_codes(bsq.bits_to_codes(bits, torch.float32), (1, 8, 12))  # official: summed += codes
    got = bsq.accumulate(acc, bits)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    small = bsq.downsample_accumulator(got, (1, 2, 3))
    assert small.dtype == torch.bfloat16 and small.shape == (1, 64, 1, 2, 3)
    torch.testing.assert_close(small.float(), torch.nn.functional.adaptive_avg_pool3d(got.float(), (1, 2, 3)),
                               rtol=1e-2, atol=1e-2)


def test_a_code_of_exactly_zero_is_bit_zero():
    """The spec's quantizer: the sign of each value, with exactly 0 (either sign of zero) giving bit 0."""
    from infinitystar.bsq import codes_to_bits

    codes = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 0.3, -0.3]).reshape(1, 6, 1, 1, 1)
    assert codes_to_bits(codes).reshape(-1).tolist() == [0, 0, 1, 0, 1, 0]
