import torch

from infinitystar.guidance import GuidanceConfig, apg, cfg, guide


def pair(seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, 40, 32, generator=g)
    return cond, cond + spread * torch.randn(1, 40, 32, generator=g)


def test_apg_update_is_orthogonal_to_cond():
    cond, uncond = pair(spread=0.01)  # rms of the difference below the threshold: no clipping
    out = apg(cond, uncond, scale=34.0, threshold=0.05)
    update = (out - cond).double() / 33
    assert abs((update * cond.double()).sum().item()) < 1e-6 * update.norm().item() * cond.norm().item()
    diff = (cond - uncond).double()
    par = (diff * cond.double()).sum() / cond.double().norm() ** 2 * cond.double()
    torch.testing.assert_close(update, diff - par, rtol=1e-5, atol=1e-7)


def test_apg_clips_the_difference_rms():
    cond, uncond = pair(spread=2.0)
    out = apg(cond, uncond, scale=2.0, threshold=0.05)  # update = clipped orth part, rms <= 0.05
    rms = (out - cond).pow(2).mean().sqrt().item()
    assert rms <= 0.05 + 1e-6


def test_eta_and_plain_cfg():
    cond, uncond = pair()
    torch.testing.assert_close(apg(cond, uncond, 5.0, 0.0, eta=1.0), cond + 4 * (cond - uncond), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cfg(cond, uncond, 3.0), 3 * cond - 2 * uncond)
    assert torch.equal(guide(cond, uncond, GuidanceConfig(scale=1.0)), cond)
    torch.testing.assert_close(guide(cond, uncond, GuidanceConfig(scale=3.0, use_apg=False)), cfg(cond, uncond, 3.0))
    assert guide(cond, uncond, GuidanceConfig()).dtype == torch.float32


def test_per_scale_guidance_picks_the_scale_and_repeats_the_last():
    import pytest

    from infinitystar.guidance import parse_scale_list

    assert parse_scale_list(" 34, 20 ;10 ") == (34.0, 20.0, 10.0) and parse_scale_list("") == ()
    for bad in ("34, x", "34,,2", "-1", "nan"):
        with pytest.raises(ValueError, match="guidance schedule"):
            parse_scale_list(bad)
    g = GuidanceConfig(scale=34.0, per_scale=(34.0, 20.0, 1.0))
    assert [g.at(i).scale for i in range(5)] == [34.0, 20.0, 1.0, 1.0, 1.0]
    assert g.at(1).per_scale == () and g.at(1).threshold == g.threshold
    assert GuidanceConfig().at(7) == GuidanceConfig()
    cond, uncond = pair()
    assert torch.equal(guide(cond, uncond, g.at(4)), cond)  # scale 1: the conditional logits, as upstream
    assert torch.equal(guide(cond, uncond, g.at(1)), apg(cond, uncond, 20.0, 0.05))
