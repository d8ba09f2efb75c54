"""Previews of a generation in progress, from the code accumulator (no decode).

ComfyUI previews latents through a fixed ``latent_rgb_factors`` table per model family: a linear map from
latent channels to RGB. InfinityStar has no such table, and one fitted to the released tokenizer cannot be
shipped from here, so :func:`fit_rgb_projection` fits it to the tokenizer at hand: sums of random multi-scale
BSQ codes (what an accumulator holds) are decoded once on a small grid, and least squares maps each latent
cell's 64 code values to the mean colour of the pixels the decoder makes of it. The first latent frame (one
video frame) and the later ones (four frames each) get separate maps, as the decoder treats them differently.

Without a fitted map, :func:`preview_rgb` projects the codes onto their three principal components: layout and
motion, not colours.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .bsq import LATENT_CHANNELS, accumulate


@dataclass(frozen=True)
class RGBProjection:
    """Least-squares maps (65, 3) from [64 code channels, 1] to decoded RGB in [-1, 1], per kind of frame."""

    first: torch.Tensor  # the first latent frame of a clip that starts a video (one pixel frame)
    later: torch.Tensor  # every later latent frame (four pixel frames)

    def __call__(self, codes: torch.Tensor, first: bool) -> torch.Tensor:
        """Codes (64, H, W) -> RGB (H, W, 3), about [-1, 1]."""
        c, h, w = codes.shape
        x = codes.float().reshape(c, h * w).T
        m = (self.first if first else self.later).to(x.device)
        return (x @ m[:-1] + m[-1]).reshape(h, w, 3)


def random_code_sums(samples: int, frames: int, grid: Sequence[int], generator: torch.Generator,
                     scales: int = 4) -> torch.Tensor:
    """(samples, 64, frames, h, w) sums of random BSQ codes of ``scales`` scales, coarse to the full grid:
    the kind of values an accumulator holds (every bit pattern is a code the transformer can draw)."""
    h, w = grid
    acc = torch.zeros(samples, LATENT_CHANNELS, frames, h, w)
    for k in range(scales):
        f = 2 ** (scales - 1 - k)
        size = (frames, max(1, h // f), max(1, w // f))
        bits = torch.randint(0, 2, (samples, *size, LATENT_CHANNELS), generator=generator, dtype=torch.uint8)
        acc = accumulate(acc, bits)
    return acc


@torch.no_grad()
def fit_rgb_projection(tokenizer, grid: Sequence[int] = (8, 8), samples: int = 16, seed: int = 0,
                       batch: int = 2) -> RGBProjection:
    """Fit the code -> colour maps of ``tokenizer`` (a :class:`infinitystar.vae.VideoTokenizer`) from decodes
    of ``samples`` two-latent-frame clips on ``grid`` latent cells, ``batch`` at a time (the real tokenizer:
    5 frames of 128 x 128 each, a small fraction of a 720p decode)."""
    codes = random_code_sums(samples, 2, grid, torch.Generator().manual_seed(seed))
    device = next(tokenizer.parameters()).device
    pixels = torch.cat([tokenizer.decode(part.to(device)).float().cpu() for part in codes.split(batch)])
    cell = pixels.shape[-1] // grid[1]
    targets = (F.avg_pool2d(pixels[:, :, 0], cell), F.avg_pool2d(pixels[:, :, 1:].mean(2), cell))  # (n, 3, h, w)
    maps = []
    for t, target in enumerate(targets):
        x = codes[:, :, t].permute(0, 2, 3, 1).reshape(-1, LATENT_CHANNELS)
        x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1).double()
        y = target.permute(0, 2, 3, 1).reshape(-1, 3).double()
        # ridge: a few hundred cells for 65 unknowns; keeps the map tame where the decoder is far from linear
        lam = 1e-3 * x.shape[0]
        m = torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)
        maps.append(m.float())
    return RGBProjection(*maps)


def preview_rgb(accumulator: torch.Tensor, projection: RGBProjection | None = None) -> torch.Tensor:
    """uint8 RGB (H, W, 3) of the last latent frame of a (1, 64, T, H, W) clip accumulator.

    With ``projection``: the fitted colours ([-1, 1] -> [0, 255]). Without: the three principal components of
    the 64 channels (strongest -> red), stretched between their 2nd and 98th percentiles.
    """
    frame = accumulator[0, :, -1].float().cpu()  # (64, H, W)
    c, h, w = frame.shape
    if projection is not None:
        rgb = ((projection(frame, first=accumulator.shape[2] == 1) + 1) / 2).clamp(0, 1)
        return (rgb * 255).round().to(torch.uint8)
    x = frame.reshape(c, -1).T  # (HW, 64)
    x = x - x.mean(0, keepdim=True)
    _, vecs = torch.linalg.eigh(x.T @ x + 1e-6 * torch.eye(c))
    rgb = x @ vecs[:, -3:].flip(1)
    lo, hi = rgb.quantile(0.02, dim=0), rgb.quantile(0.98, dim=0)
    rgb = ((rgb - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    return (rgb.reshape(h, w, 3) * 255).to(torch.uint8)
