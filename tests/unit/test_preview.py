import torch
import torch.nn.functional as F

from infinitystar.bsq import LATENT_CHANNELS
from infinitystar.preview import RGBProjection, fit_rgb_projection, preview_rgb, random_code_sums
from infinitystar.tiny import tiny_set_vae_config
from infinitystar.vae import VideoTokenizer


def _r2(pred: torch.Tensor, target: torch.Tensor) -> float:
    return 1 - ((pred - target) ** 2).sum().item() / ((target - target.mean((0, 2, 3), keepdim=True)) ** 2).sum().item()


def test_fitted_colours_predict_held_out_decodes(single_thread):
    """On unseen code sums, the fitted maps explain a good part of the decoded colours of each latent cell (mean
    over its pixels): first frame and later frames, each with its own map. A random-weight tokenizer is far less
    linear than a trained one, so this is a floor."""
    torch.manual_seed(0)
    tokenizer = VideoTokenizer(tiny_set_vae_config()).eval()
    projection = fit_rgb_projection(tokenizer)
    codes = random_code_sums(4, 2, (8, 8), torch.Generator().manual_seed(123))
    with torch.no_grad():
        pixels = tokenizer.decode(codes).float()
    cell = pixels.shape[-1] // 8
    for t, first, floor in ((0, True, 0.5), (1, False, 0.2)):
        target = F.avg_pool2d(pixels[:, :, 0] if first else pixels[:, :, 1:].mean(2), cell)
        pred = torch.stack([projection(c[:, t], first) for c in codes]).permute(0, 3, 1, 2)
        assert _r2(pred, target) > floor, (first, _r2(pred, target))
        swapped = torch.stack([projection(c[:, t], not first) for c in codes]).permute(0, 3, 1, 2)
        assert _r2(pred, target) > _r2(swapped, target)  # the map of the other kind of frame does worse


def test_random_code_sums_are_accumulator_values():
    codes = random_code_sums(2, 3, (4, 6), torch.Generator().manual_seed(0), scales=3)
    assert codes.shape == (2, LATENT_CHANNELS, 3, 4, 6)
    coarse = random_code_sums(2, 3, (4, 6), torch.Generator().manual_seed(0), scales=1)  # one full-size scale
    assert torch.allclose(coarse.abs(), torch.full_like(coarse, 1 / 8))  # +-1/sqrt(64) per channel


def test_preview_rgb_with_and_without_a_projection():
    acc = random_code_sums(1, 3, (5, 7), torch.Generator().manual_seed(1))
    pca = preview_rgb(acc)
    assert pca.shape == (5, 7, 3) and pca.dtype == torch.uint8 and pca.max() > 200 and pca.min() < 50
    gray = torch.zeros(LATENT_CHANNELS + 1, 3)
    gray[-1] = torch.tensor([1.0, 0.0, -1.0])  # constant colour: bias only
    red = torch.zeros(LATENT_CHANNELS + 1, 3)
    red[0, 0] = 8.0  # channel 0 drives red
    out = preview_rgb(acc, RGBProjection(first=red, later=gray))
    assert out.shape == (5, 7, 3) and (out == torch.tensor([255, 128, 0], dtype=torch.uint8)).all()  # later map
    first = preview_rgb(acc[:, :, :1], RGBProjection(first=red, later=gray))  # a one-frame clip: the first map
    want = ((acc[0, 0, 0] * 8 + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)
    assert torch.equal(first[..., 0], want) and (first[..., 1] == 128).all()
