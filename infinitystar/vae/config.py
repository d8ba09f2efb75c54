"""Configuration of the InfinityStar video tokenizer (spec §3.1).

The official code hard-codes one Namespace in ``video_vae_model``; the fields that shape the
network are kept here, with the released values as defaults. ``detect_vae_config`` reads the
same fields back from a state dict's tensor shapes, so tiny test checkpoints and the released
file load through one path.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class VaeConfig:
    # Channels of the encoder stages (the decoder walks them in reverse). Released: 96..384.
    block_out_channels: tuple[int, ...] = (96, 192, 384, 384, 384)
    # Resnets per encoder down block; decoder up blocks have one more (official layout).
    layers_per_block: int = 2
    # Channels of the unpatchified latent (the decoder's spatial-norm condition).
    latent_channels: int = 16
    in_channels: int = 3
    out_channels: int = 3
    # Per down block (encoder order): 2x space / 2x time. The decoder uses them mirrored.
    spatial_compression_list: tuple[int, ...] = (2, 2, 2)
    temporal_compression_list: tuple[int, ...] = (2, 2)
    # Pixel-unshuffle absorbed after the encoder: 16 -> 64 channels, 8x -> 16x spatial.
    patch_size: int = 2
    # Encoder frame chunk (2 x temporal factor) and decoder latent chunk of the official code.
    encode_chunk_frames: int = 8
    decode_chunk_latents: int = 2
    # DiagonalGaussianDistribution clamps logvar to this range.
    logvar_min: float = -30.0
    logvar_max: float = 20.0
    # BSQ codebook widths (bits) of the semantic and detail quantizers (mask buffer lengths).
    semantic_scale_dim: int = 16
    detail_scale_dim: int = 64

    @property
    def num_down_blocks(self) -> int:
        return len(self.block_out_channels) - 1

    @property
    def embed_dim(self) -> int:
        """Channels of the patchified latent the transformer sees (64 released)."""
        return self.latent_channels * self.patch_size ** 2

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along H and W (16 released)."""
        factor = self.patch_size
        for s in self.spatial_compression_list:
            factor *= s
        return factor

    @property
    def temporal_factor(self) -> int:
        """Pixel frames per latent frame after the first (4 released)."""
        factor = 1
        for t in self.temporal_compression_list:
            factor *= t
        return factor

    def latent_frames(self, frames: int) -> int:
        return 1 + (frames - 1) // self.temporal_factor

    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.temporal_factor


VAE_PRESETS: dict[str, VaeConfig] = {
    "full": VaeConfig(),
    "tiny": VaeConfig(block_out_channels=(32,) * 5),
}


def detect_vae_config(state_dict: Mapping[str, torch.Tensor], base: VaeConfig | None = None) -> VaeConfig:
    """Read block channels, resnets per block and latent width from an official VAE state dict."""
    base = base or VaeConfig()
    try:
        first = state_dict["encoder.conv_in.conv.weight"]
        channels = [int(first.shape[0])]
        for i in range(base.num_down_blocks):
            w = state_dict[f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight"]
            if i > 0:
                channels.append(int(w.shape[0]))
        channels.append(int(state_dict["encoder.mid_block.resnets.0.conv1.conv.weight"].shape[0]))
        latent = int(state_dict["decoder.conv_in.conv.weight"].shape[1])
        in_ch = int(first.shape[1])
        out_ch = int(state_dict["decoder.conv_out.conv.weight"].shape[0])
    except KeyError as e:
        raise ValueError(f"not an InfinityStar VAE state dict: missing {e.args[0]!r}") from None
    layers = 0
    while f"encoder.down_blocks.0.resnets.{layers}.conv1.conv.weight" in state_dict:
        layers += 1
    return replace(base, block_out_channels=tuple(channels), layers_per_block=layers,
                   latent_channels=latent, in_channels=in_ch, out_channels=out_ch)
