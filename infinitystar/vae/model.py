"""The InfinityStar video tokenizer ("wan_bsq_vae", spec §3): causal 3D CNN encoder/decoder with
DC-AE style blocks, the absorbed 2x patchify, ``proj_down``/``proj_up`` and the learnable scale.

Module and attribute names reproduce the official state-dict keys (301 entries for the released
``infinitystar_videovae.pth``), including the unused ``*_two`` projections and the BSQ ``mask``
buffers that appear twice because the official model aliases ``quantize`` to ``quantizer``.
Parity-tested against the golden cases (tests/golden/test_vae_parity.py).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import norm_layer
from .blocks import (
    CausalConv3d,
    ConvCache,
    DCDownBlock3d,
    DCUpBlock3d,
    Downsample,
    ResnetBlock3D,
    RMSNorm,
    SpatialNorm3D,
    Upsample,
)
from .chunking import decode_chunked, decode_tiled, encode_chunks, plan_decode_chunks
from .config import VaeConfig

logger = logging.getLogger(__name__)

MID_BLOCK_LAYERS = 2  # official: the mid blocks always have 2 resnets
# parity: the official scripts encode images and videos outside their bf16 autocast (spec §3.2, §8), and bf16
# encoding flips bits of the teacher-forced condition, so the encoder runs in fp32 whatever decodes in.
ENCODE_DTYPE = torch.float32


class DownBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, layers: int, pt: int | None, *, ops, device, dtype):
        super().__init__()
        kw = dict(ops=ops, device=device, dtype=dtype)
        self.resnets = nn.ModuleList(ResnetBlock3D(c_in, **kw) for _ in range(layers))
        self.downsamplers = None
        if pt is not None:
            self.downsamplers = nn.ModuleList([Downsample(DCDownBlock3d(c_in, c_out, pt, **kw))])

    def forward(self, x: torch.Tensor, cache: ConvCache | None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, None, cache)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x, cache)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int, zq_channels: int | None, *, ops, device, dtype):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(channels, zq_channels, ops=ops, device=device, dtype=dtype) for _ in range(MID_BLOCK_LAYERS))

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None, cache: ConvCache | None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, zq, cache)
        return x


class UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, layers: int, zq_channels: int, pt: int | None, *, ops, device, dtype):
        super().__init__()
        kw = dict(ops=ops, device=device, dtype=dtype)
        self.resnets = nn.ModuleList(ResnetBlock3D(c_in, zq_channels, **kw) for _ in range(layers))
        self.upsamplers = None
        if pt is not None:
            self.upsamplers = nn.ModuleList([Upsample(DCUpBlock3d(c_in, c_out, pt, **kw))])

    def forward(self, x: torch.Tensor, zq: torch.Tensor, cache: ConvCache | None, split_first: bool) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, zq, cache)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, cache, split_first)
        return x


class Encoder3D(nn.Module):
    """Pixels (B, 3, T, H, W) -> (B, 2*latent, 1 + (T-1)/4, H/8, W/8): mean and logvar channels."""

    def __init__(self, cfg: VaeConfig, *, ops=nn, device=None, dtype=None):
        super().__init__()
        kw = dict(ops=ops, device=device, dtype=dtype)
        ch = cfg.block_out_channels
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0], 3, **kw)
        blocks = []
        for i in range(cfg.num_down_blocks):
            has_time = i < len(cfg.temporal_compression_list)
            has_space = i < len(cfg.spatial_compression_list)
            pt = (cfg.temporal_compression_list[i] if has_time else 1) if (has_time or has_space) else None
            blocks.append(DownBlock(ch[i], ch[i + 1], cfg.layers_per_block, pt, **kw))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(ch[-1], None, **kw)
        self.norm_out = norm_layer(ops, RMSNorm)(ch[-1], device=device, dtype=dtype)
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels, 3, **kw)

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, None, cache)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True), cache)


class Decoder3D(nn.Module):
    """Latent (B, 16, T, h, w) -> pixels (B, 3, 1 + 4(T-1), 8h, 8w); every norm is conditioned on the input."""

    def __init__(self, cfg: VaeConfig, *, ops=nn, device=None, dtype=None):
        super().__init__()
        kw = dict(ops=ops, device=device, dtype=dtype)
        rev = list(reversed(cfg.block_out_channels))
        zq = cfg.latent_channels
        n = cfg.num_down_blocks
        self.conv_in = CausalConv3d(zq, rev[0], 3, **kw)
        self.mid_block = MidBlock(rev[0], zq, **kw)
        blocks = []
        for i in range(n):
            # parity: the official mirrored indexing list[-idx] (idx 0 -> list[0]).
            idx_t = i - (n - len(cfg.temporal_compression_list))
            idx_s = i - (n - len(cfg.spatial_compression_list))
            pt = None
            if idx_t >= 0 or idx_s >= 0:
                pt = cfg.temporal_compression_list[-idx_t] if idx_t >= 0 else 1
            blocks.append(UpBlock(rev[i], rev[i + 1], cfg.layers_per_block + 1, zq, pt, **kw))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = SpatialNorm3D(rev[-1], zq, ops=ops, device=device, dtype=dtype)
        self.conv_out = CausalConv3d(rev[-1], cfg.out_channels, 3, **kw)

    def forward(self, z: torch.Tensor, cache: ConvCache | None = None, split_first: bool = False) -> torch.Tensor:
        x = self.conv_in(z, cache)
        x = self.mid_block(x, z, cache)
        for block in self.up_blocks:
            x = block(x, z, cache, split_first)
        return self.conv_out(F.silu(self.norm_out(x, z), inplace=True), cache)


class _BSQCodebook(nn.Module):
    """Only the ``mask`` buffer (bit weights 2^(d-1) .. 1) of the official BSQ codebook; the math is in bsq.py."""

    def __init__(self, dim: int, device=None):
        super().__init__()
        dev = None if device is None else torch.device(device)
        self.register_buffer("mask", 2 ** torch.arange(dim - 1, -1, -1, device=dev))


class _QuantizerBuffers(nn.Module):
    def __init__(self, cfg: VaeConfig, device=None):
        super().__init__()
        self.lfq_semantic = _BSQCodebook(cfg.semantic_scale_dim, device)
        self.lfq_detail = _BSQCodebook(cfg.detail_scale_dim, device)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C*p*p, T, H/p, W/p), channel c*p*p + i*p + j (pixel_unshuffle per frame)."""
    return F.pixel_unshuffle(x.transpose(1, 2), p).transpose(1, 2)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    return F.pixel_shuffle(x.transpose(1, 2), p).transpose(1, 2)


def _linear_channels(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a Linear over the channel axis of (B, C, T, H, W)."""
    return layer(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


class VideoTokenizer(nn.Module):
    """Official tokenizer with the encode (I2V/V2V) and decode (pixels) paths used at inference."""

    def __init__(self, config: VaeConfig = VaeConfig(), ops=nn, device=None, dtype=None):
        super().__init__()
        self.config = config
        # Registered first so the state-dict order equals the official file's.
        self.scale_learnable_parameters = nn.Parameter(torch.ones(4, device=device, dtype=dtype))
        self.encoder = Encoder3D(config, ops=ops, device=device, dtype=dtype)
        self.decoder = Decoder3D(config, ops=ops, device=device, dtype=dtype)
        self.quantizer = _QuantizerBuffers(config, device)
        self.quantize = self.quantizer  # parity: official alias, duplicates the mask keys
        d = config.embed_dim
        self.proj_down = ops.Linear(d, d, device=device, dtype=dtype)
        self.proj_down_two = ops.Linear(d, d, device=device, dtype=dtype)  # unused, kept for the keys
        self.proj_up = ops.Linear(d, d, device=device, dtype=dtype)
        self.proj_up_two = ops.Linear(d, d, device=device, dtype=dtype)  # unused, kept for the keys
        # Dtype the decoder's convs run in; None = the dtype of the weights (set e.g. bf16 with casting ops).
        # The encoder always runs in fp32 (ENCODE_DTYPE).
        self.compute_dtype: torch.dtype | None = None

    # ---------------------------------------------------------------- helpers
    def _work_dtype(self) -> torch.dtype:
        """Dtype of the decode."""
        return self.compute_dtype or self.decoder.conv_in.conv.weight.dtype

    def _scale(self, like: torch.Tensor) -> torch.Tensor:
        return self.scale_learnable_parameters[0].to(device=like.device, dtype=like.dtype)

    # ---------------------------------------------------------------- encode
    @torch.no_grad()
    def encode_posterior(self, frames: torch.Tensor, *, callback: Callable[[int, int], None] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames (B, 3, T, H, W) in [-1, 1] (or uint8 pixels: ``codec.fit_video``), T = 1 + 4k -> (mean, logvar)
        (B, 64, 1 + k, H/16, W/16).

        Runs the encoder in the official frame chunks (8, the first absorbing the remainder)
        with conv caches; logvar is clamped as the official DiagonalGaussianDistribution does. The frames may be
        anywhere (system memory): each chunk is moved to the tokenizer's device when it is encoded.
        """
        check_frames(frames, self.config)
        h = encode_chunks(self.encoder, frames, self.config.encode_chunk_frames, callback,
                          device=self.encoder.conv_in.conv.weight.device, dtype=ENCODE_DTYPE)
        h = patchify(h.float(), self.config.patch_size)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(self.config.logvar_min, self.config.logvar_max)

    @torch.no_grad()
    def encode_latent(self, frames: torch.Tensor, *, generator: torch.Generator | None = None,
                      sample: bool = True, noise: torch.Tensor | None = None,
                      callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Frames -> latent (B, 64, T_lat, h, w) = proj_down(mean + std * noise) * scale[0].

        ``noise`` overrides the draw (``torch.randn(mean.shape, generator=generator)``, CPU when the
        generator is on CPU); ``sample=False`` uses the posterior mean.
        """
        mean, logvar = self.encode_posterior(frames, callback=callback)
        return self.latent_from_posterior(mean, logvar, generator=generator, sample=sample, noise=noise)

    @torch.no_grad()
    def latent_from_posterior(self, mean: torch.Tensor, logvar: torch.Tensor, *,
                              generator: torch.Generator | None = None, sample: bool = True,
                              noise: torch.Tensor | None = None) -> torch.Tensor:
        z = mean
        if sample or noise is not None:
            if noise is None:
                gen_device = generator.device if generator is not None else mean.device
                noise = torch.randn(mean.shape, generator=generator, device=gen_device, dtype=mean.dtype)
            if tuple(noise.shape) != tuple(mean.shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} != posterior shape {tuple(mean.shape)}")
            z = mean + torch.exp(0.5 * logvar) * noise.to(device=mean.device, dtype=mean.dtype)
        w_dtype = self.proj_down.weight.dtype if self.proj_down.weight.is_floating_point() else z.dtype
        z = _linear_channels(self.proj_down, z.to(w_dtype)).float()
        return z * self._scale(z)

    # ---------------------------------------------------------------- decode
    @torch.no_grad()
    def latent_to_decoder_input(self, summed_codes: torch.Tensor) -> torch.Tensor:
        """(B, 64, T, h, w) codes -> (B, 16, T, 2h, 2w): divide by scale[0], proj_up, unpatchify."""
        check_codes(summed_codes, self.config)
        z = summed_codes.float()
        z = z / self._scale(z)
        w_dtype = self.proj_up.weight.dtype if self.proj_up.weight.is_floating_point() else z.dtype
        z = _linear_channels(self.proj_up, z.to(w_dtype))
        return unpatchify(z, self.config.patch_size)

    @torch.no_grad()
    def decode(self, summed_codes: torch.Tensor, *, chunk_latents: int | None = None,
               memory_budget: int | None = None, tiled: bool = False, tile: int | tuple[int, int] = 32,
               overlap: int | tuple[int, int] = 8,
               callback: Callable[[int, int], None] | None = None,
               max_chunk_latents: int | None = None, images_to: torch.device | str | None = None,
               first_frame: int = 0) -> torch.Tensor:
        """Summed codes (B, 64, T, h, w) -> raw decoder output (B, 3, 1 + 4(T-1), 16h, 16w), RGB, unclamped.

        Decodes latent frames in chunks with conv caches, which equals a one-shot decode
        (see chunking.plan_decode_chunks). ``chunk_latents`` None uses the official 3+2+2... plan,
        or the largest chunk whose estimate fits ``memory_budget`` bytes, at most ``max_chunk_latents`` (a host that
        checks for a cancel in ``callback`` gets to check a few times per video). ``tiled`` decodes
        overlapping spatial tiles (``tile``/``overlap`` in latent cells) and blends them linearly:
        an approximation, for when even one chunk does not fit.

        ``images_to`` (one video, B = 1): (T, H, W, 3) float32 images in [0, 1] on that device instead, each chunk
        post-processed where it was decoded and moved right away, so the whole video never sits on the decoding
        device (a tiled decode blends its tiles there too; the official rule for frame 0 is the caller's:
        ``first_frame_rule``). ``first_frame``: only the frames from it on are kept and returned; the earlier ones
        are still decoded (the causal decoder reads them), so the last clip of a long video costs its own memory.
        """
        from .codec import images_on  # local: codec imports the quantizer
        from .memory import choose_decode_chunk  # local: memory imports the config only

        if images_to is not None and summed_codes.shape[0] != 1:
            raise ValueError(f"images_to decodes one video (1, 64, T, h, w), got {tuple(summed_codes.shape)}")
        frames = self.config.pixel_frames(summed_codes.shape[2])
        if not 0 <= first_frame < frames:
            raise ValueError(f"first_frame {first_frame}: these codes decode to {frames} frames, numbered from 0")
        offload = images_to is not None and not _same_device(torch.device(images_to), summed_codes.device)
        if chunk_latents is None and memory_budget is not None:
            chunk_latents = choose_decode_chunk(self.config, tuple(summed_codes.shape), self._work_dtype(),
                                                memory_budget, tile=tile if tiled else None, video_on_device=not offload,
                                                images=images_to is not None)
        if max_chunk_latents is not None and chunk_latents is not None:
            chunk_latents = min(chunk_latents, max_chunk_latents)
        z = self.latent_to_decoder_input(summed_codes).to(self._work_dtype())
        plan = plan_decode_chunks(z.shape[2], chunk_latents)
        logger.debug("decode %s latent frames in chunks %s (tiled=%s)", z.shape[2], plan, tiled)
        keep = None if images_to is None else images_on(images_to)
        if tiled:
            return decode_tiled(self.decoder, z, plan, tile, overlap, self.config.patch_size, frames, callback=callback,
                                images_to=images_to, sums_on=images_to if offload else None, first_frame=first_frame)
        return decode_chunked(self.decoder, z, plan, callback, keep, frames=frames, first_frame=first_frame)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """"cuda" and "cuda:0" are one device where the current one is 0."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else 0
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index


def check_frames(frames: torch.Tensor, cfg: VaeConfig) -> None:
    """Raise ValueError unless frames are float in [-1, 1] or uint8 pixels, (B, 3, 1 + 4k, H, W) with H, W multiples
    of 16."""
    if not isinstance(frames, torch.Tensor) or frames.ndim != 5:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"expected frames as a tensor (B, 3, T, H, W), got {shape}")
    if not (frames.is_floating_point() or frames.dtype == torch.uint8):
        raise ValueError(f"expected float frames in [-1, 1] or uint8 pixels, got dtype {frames.dtype}")
    b, c, t, h, w = frames.shape
    if c != cfg.in_channels:
        raise ValueError(f"expected {cfg.in_channels} channels (B, 3, T, H, W), got {c} in shape {tuple(frames.shape)}")
    tf = cfg.temporal_factor
    if t < 1 or (t - 1) % tf:
        raise ValueError(f"frame count must be 1 + {tf}k (1, 5, ..., 81), got {t}")
    s = cfg.spatial_factor
    if h % s or w % s or h == 0 or w == 0:
        raise ValueError(f"height and width must be positive multiples of {s}, got {h}x{w}")


def check_codes(codes: torch.Tensor, cfg: VaeConfig) -> None:
    if not isinstance(codes, torch.Tensor) or codes.ndim != 5 or codes.shape[1] != cfg.embed_dim:
        shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"expected summed codes (B, {cfg.embed_dim}, T, h, w), got {shape}")
    if not codes.is_floating_point():
        raise ValueError(f"expected float summed codes, got dtype {codes.dtype}")
    if min(codes.shape[2:]) < 1:
        raise ValueError(f"empty summed codes {tuple(codes.shape)}")


def load_vae_state_dict(model: VideoTokenizer, state_dict: Mapping[str, torch.Tensor], source: str = "<state dict>") -> None:
    """Strictly load an official VAE state dict; ValueError naming ``source`` on any mismatch."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:5])}{more}")
        raise ValueError(f"{source} does not match the InfinityStar VAE "
                         f"(block_out_channels={model.config.block_out_channels}): " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True, assign=_is_meta(model))


def _is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())
