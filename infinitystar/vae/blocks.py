"""Building blocks of the InfinityStar video tokenizer (spec §3.1): causal Conv3d with a conv
cache, RMS norm, spatial norm, resnet and the DC-AE style space-to-depth down / depth-to-space up
blocks. Written from the spec; attribute names follow the official state-dict keys.

Conv caches: every ``CausalConv3d`` keeps the last two time slices of its time-padded input so the
next chunk of frames continues exactly where the previous one stopped. The cache is one flat
``dict`` keyed by the conv module itself and threaded through ``forward``; ``None`` means
"no carry-over" (a single chunk).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import norm_layer

ConvCache = dict  # {CausalConv3d: Tensor (B, C, 2, H, W)}


class CausalConv3d(nn.Module):
    """k x k x k conv, stride 1, causal in time (frame 0 replicated twice, or the cached frames),
    zero padding in space. A kernel-1 conv is pointwise and needs no padding nor cache."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, ops=nn,
                 device=None, dtype=None):
        super().__init__()
        self.kernel_size = kernel_size
        pad = kernel_size // 2
        # Zero spatial padding inside the conv equals the official explicit F.pad(..., 0).
        self.conv = ops.Conv3d(in_channels, out_channels, kernel_size, padding=(0, pad, pad),
                               device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        k = self.kernel_size
        if k > 1:
            prev = cache.get(self) if cache is not None else None
            if prev is None:
                prev = x[:, :, :1].expand(-1, -1, k - 1, -1, -1)
            x = torch.cat([prev.to(x.dtype), x], dim=2)
            if cache is not None:
                cache[self] = x[:, :, -(k - 1):].clone()
        return _run_conv(self.conv, x)


def _run_conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Call the conv. Host-provided ops (casting, patches, offload) always run their own forward.

    A plain torch Conv3d casts its weights to the input's device/dtype (like the norms), and on CPU
    float32 goes straight to oneDNN: PyTorch routes small batch-1 3D convs to its unvectorised
    ``slow_conv3d``, 2-7x slower here.
    """
    if type(conv) is not nn.Conv3d:
        return conv(x)
    weight, bias = conv.weight, conv.bias
    if weight.dtype != x.dtype or weight.device != x.device:  # plain torch weights follow the input
        weight = weight.to(device=x.device, dtype=x.dtype)
        bias = None if bias is None else bias.to(device=x.device, dtype=x.dtype)
    if (x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and not torch.is_grad_enabled()):
        return torch.mkldnn_convolution(x.contiguous(), weight, bias, conv.padding, conv.stride,
                                        conv.dilation, conv.groups)
    return F.conv3d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class RMSNorm(nn.Module):
    """Channel RMS norm of the official ``RMS_norm``: F.normalize over C (eps 1e-12) * sqrt(C) * gamma."""

    bias = None  # read by hosts' weight casts

    def __init__(self, channels: int, *, device=None, dtype=None):
        super().__init__()
        self.scale = channels ** 0.5
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1, 1, device=device, dtype=dtype))

    @property
    def weight(self) -> nn.Parameter:
        """The name hosts' weight casts read (the file's key is ``gamma``). A host's weight patch is looked up under
        ``<name>.weight``, so patches of these norms (nothing makes any) would not apply."""
        return self.gamma

    def weight_as(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.gamma.to(device=x.device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.weight_as(x, x.dtype)  # follows the input (offloading, casting)
        return F.normalize(x, dim=1).mul_(self.scale).mul_(gamma)  # parity: (x / |x|) * sqrt(C) * gamma


def resize_condition(zq: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Nearest resize of the latent condition to a feature map's (T, H, W), frame 0 apart when T is odd."""
    t = size[0]
    if t > 1 and t % 2 == 1:
        first = F.interpolate(zq[:, :, :1], size=(1, *size[1:]))
        rest = F.interpolate(zq[:, :, 1:], size=(t - 1, *size[1:]))
        return torch.cat([first, rest], dim=2)
    return F.interpolate(zq, size=size)


class SpatialNorm3D(nn.Module):
    """Decoder norm conditioned on the latent: RMSNorm(f) * conv_y(zq) + conv_b(zq), 1x1x1 convs."""

    def __init__(self, channels: int, zq_channels: int, *, ops=nn, device=None, dtype=None):
        super().__init__()
        self.norm_layer = norm_layer(ops, RMSNorm)(channels, device=device, dtype=dtype)
        self.conv_y = CausalConv3d(zq_channels, channels, 1, ops=ops, device=device, dtype=dtype)
        self.conv_b = CausalConv3d(zq_channels, channels, 1, ops=ops, device=device, dtype=dtype)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        out = self.norm_layer(f)
        segments = _repeat_segments(tuple(f.shape[-3:]), tuple(zq.shape[-3:]))
        if segments is None:  # non-integer ratios: resize first, as the official code does
            zq = resize_condition(zq, tuple(f.shape[-3:]))
            return out.mul_(self.conv_y(zq)).add_(self.conv_b(zq))
        # The 1x1x1 convs commute with nearest repetition: run them at the latent's resolution and
        # broadcast the result over each repeated block (same values, far less work and memory).
        y, b = self.conv_y(zq), self.conv_b(zq)
        for (fs, fe), (zs, ze), reps in segments:
            shape = _blocked_shape(out.shape, fe - fs, ze - zs, reps)
            part = out[:, :, fs:fe].view(shape)
            part.mul_(_broadcastable(y[:, :, zs:ze], shape)).add_(_broadcastable(b[:, :, zs:ze], shape))
        return out


def _repeat_segments(f_size, z_size):
    """Frame ranges of f and zq that the official nearest resize maps by whole repetitions, or None."""
    (tf, hf, wf), (tz, hz, wz) = f_size, z_size
    if hf % hz or wf % wz:
        return None
    pairs = [((0, 1), (0, 1)), ((1, tf), (1, tz))] if (tf > 1 and tf % 2 == 1) else [((0, tf), (0, tz))]
    out = []
    for (fs, fe), (zs, ze) in pairs:
        if (fe - fs) % (ze - zs):
            return None
        out.append(((fs, fe), (zs, ze), ((fe - fs) // (ze - zs), hf // hz, wf // wz)))
    return out


def _blocked_shape(shape, tf, tz, reps):
    b, c, _, hf, wf = shape
    kt, kh, kw = reps
    return (b, c, tz, kt, hf // kh, kh, wf // kw, kw)


def _broadcastable(v: torch.Tensor, shape) -> torch.Tensor:
    b, c, tz, _, h, _, w, _ = shape
    return v.reshape(b, c, tz, 1, h, 1, w, 1)


class ResnetBlock3D(nn.Module):
    """h = conv1(silu(norm1(x))); h = conv2(silu(norm2(h))); out = h + x (channels constant).

    Encoder resnets use RMSNorm; decoder resnets (``zq_channels`` given) use SpatialNorm3D.
    """

    def __init__(self, channels: int, zq_channels: int | None = None, *, ops=nn, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        if zq_channels is None:
            self.norm1 = norm_layer(ops, RMSNorm)(channels, **kw)
            self.norm2 = norm_layer(ops, RMSNorm)(channels, **kw)
        else:
            self.norm1 = SpatialNorm3D(channels, zq_channels, ops=ops, **kw)
            self.norm2 = SpatialNorm3D(channels, zq_channels, ops=ops, **kw)
        self.conv1 = CausalConv3d(channels, channels, 3, ops=ops, **kw)
        self.conv2 = CausalConv3d(channels, channels, 3, ops=ops, **kw)

    def _norm(self, norm: nn.Module, x: torch.Tensor, zq: torch.Tensor | None) -> torch.Tensor:
        return norm(x) if zq is None else norm(x, zq)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None, cache: ConvCache | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self._norm(self.norm1, x, zq), inplace=True), cache)
        h = self.conv2(F.silu(self._norm(self.norm2, h, zq), inplace=True), cache)
        return h.add_(x)


def space_to_depth(x: torch.Tensor, pt: int) -> torch.Tensor:
    """(B, C, t*pt, 2h, 2w) -> (B, 4C, t, h, w), channel (ph*2 + pw)*C + c, mean over the pt frames."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t // pt, pt, h // 2, 2, w // 2, 2)
    x = x.permute(0, 5, 7, 1, 2, 3, 4, 6)  # [B, ph, pw, C, t, pt, h, w]
    x = x.reshape(b, 4 * c, t // pt, pt, h // 2, w // 2)
    return x.mean(dim=3) if pt > 1 else x.squeeze(3)


def depth_to_space(x: torch.Tensor, pt: int) -> torch.Tensor:
    """(B, pt*4*C, t, h, w) -> (B, C, t*pt, 2h, 2w), conv channel ((pt_i*2 + ph)*2 + pw)*C + c."""
    b, cc, t, h, w = x.shape
    c = cc // (4 * pt)
    x = x.reshape(b, pt, 2, 2, c, t, h, w)
    x = x.permute(0, 4, 5, 1, 6, 2, 7, 3)  # [B, C, t, pt, h, ph, w, pw]
    return x.reshape(b, c, t * pt, 2 * h, 2 * w)


class DCDownBlock3d(nn.Module):
    """2x space (and ``pt``x time) down block: s2d(conv(silu(norm(x)))) + group-mean of s2d(x).

    Time grouping follows the official split: T = 1 or odd -> frame 0 alone (space only), the rest
    in consecutive groups of ``pt``; T even -> all frames grouped from the start.
    """

    def __init__(self, in_channels: int, out_channels: int, pt: int, *, ops=nn, device=None, dtype=None):
        super().__init__()
        if out_channels % 4:
            raise ValueError(f"DC down block output channels must be divisible by 4, got {out_channels}")
        self.pt = pt
        self.out_channels = out_channels
        self.norm = norm_layer(ops, RMSNorm)(in_channels, device=device, dtype=dtype)
        self.conv = CausalConv3d(in_channels, out_channels // 4, 3, ops=ops, device=device, dtype=dtype)

    def _fold(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[2]
        if self.pt == 1 or t % 2 == 0:
            return space_to_depth(x, self.pt)
        first = space_to_depth(x[:, :, :1], 1)
        if t == 1:
            return first
        return torch.cat([first, space_to_depth(x[:, :, 1:], self.pt)], dim=2)

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        main = self._fold(self.conv(F.silu(self.norm(x), inplace=True), cache))
        short = self._fold(x)
        b, c4, t, h, w = short.shape
        short = short.reshape(b, c4 // self.out_channels, self.out_channels, t, h, w).mean(dim=1)
        return main + short


class DCUpBlock3d(nn.Module):
    """2x space (and ``pt``x time) up block: d2s(conv(silu(norm(x)))) + d2s(x tiled r times).

    With pt > 1, when the input T is odd (or ``split_first``), the first pt output frames of each
    path are replaced by their mean, so 1 + n latents become 1 + pt*n frames.
    """

    def __init__(self, in_channels: int, out_channels: int, pt: int, *, ops=nn, device=None, dtype=None):
        super().__init__()
        self.pt = pt
        conv_channels = out_channels * 4 * pt
        if conv_channels % in_channels:
            raise ValueError(f"DC up block: {conv_channels} conv channels not a multiple of {in_channels}")
        self.repeats = conv_channels // in_channels
        self.norm = norm_layer(ops, RMSNorm)(in_channels, device=device, dtype=dtype)
        self.conv = CausalConv3d(in_channels, conv_channels, 3, ops=ops, device=device, dtype=dtype)

    def _merge_first(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :, :self.pt].mean(dim=2, keepdim=True), x[:, :, self.pt:]], dim=2)

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None, split_first: bool = False) -> torch.Tensor:
        compress_first = self.pt > 1 and (x.shape[2] % 2 == 1 or split_first)
        main = depth_to_space(self.conv(F.silu(self.norm(x), inplace=True), cache), self.pt)
        short = depth_to_space(x.repeat(1, self.repeats, 1, 1, 1), self.pt)  # whole-tensor tiling
        if compress_first:
            main = self._merge_first(main)
            short = self._merge_first(short)
        return main + short


class Downsample(nn.Module):
    """Holder giving the official key path ``downsamplers.0.conv.*``."""

    def __init__(self, block: DCDownBlock3d):
        super().__init__()
        self.conv = block

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        return self.conv(x, cache)


class Upsample(nn.Module):
    """Holder giving the official key path ``upsamplers.0.conv.*``."""

    def __init__(self, block: DCUpBlock3d):
        super().__init__()
        self.conv = block

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None, split_first: bool = False) -> torch.Tensor:
        return self.conv(x, cache, split_first)

