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
