"""Pixels in and out of the tokenizer, and the multi-scale BSQ encode of a latent (spec §3.3, §3.5, §6).

- ``prepare_image`` / ``prepare_video``: the official ``transform`` (LANCZOS resize to cover with
  int() truncation, center crop, 2x - 1); ``FrameFit`` does its resize and crop as frames are read.
- ``frames_to_uint8`` / ``frames_to_float_images``: the official post-processing (clamp((x+1)/2),
  truncation to uint8, frame 0 := frame 1 for videos only; upstream crashes on single images).
- ``encode_bits``: the encoder-side residual loop over a schedule's steps, one zero accumulator
  per clip, producing the bits the transformer is teacher-forced with (I2V/V2V) and the summed codes.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .. import bsq


def _as_pil(img: Any) -> Image.Image:
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected a PIL image or a uint8 HWC RGB array, got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr, "RGB")


def cover_crop(img: Any, height: int, width: int) -> np.ndarray:
    """The uint8 half of the official transform: resize to cover (LANCZOS, int() on the computed side), center crop;
    uint8 (height, width, 3). A picture already ``height`` x ``width`` comes back unchanged (PIL copies at its own
    size), so fitting frames early (:class:`FrameFit`) and transforming them later gives the same pixels.

    When the source has exactly the target's aspect, int() can land one pixel short of the target (e.g. 223 for
    224; the official transform then crops a single row and fails): the computed side is kept at least the target,
    which changes nothing where the official transform works."""
    pil = _as_pil(img)
    w0, h0 = pil.size
    if w0 / h0 <= width / height:
        rw, rh = width, max(height, int(width / (w0 / h0)))
    else:
        rw, rh = max(width, int((w0 / h0) * height)), height
    arr = np.asarray(pil.resize((rw, rh), resample=Image.LANCZOS))
    y0, x0 = (arr.shape[0] - height) // 2, (arr.shape[1] - width) // 2
    return np.array(arr[y0:y0 + height, x0:x0 + width])


def to_signed_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] as the official transform computes it (x / 255, then x + x - 1)."""
    x = x.float().div(255)
    return x + x - 1  # parity: official im.add(im).add_(-1)


def _transform(pil: Image.Image, height: int, width: int) -> torch.Tensor:
    """:func:`cover_crop`, then to [-1, 1]; (3, H, W)."""
    return to_signed_unit(torch.from_numpy(cover_crop(pil, height, width)).permute(2, 0, 1))


class FrameFit:
    """Fits each frame to the output size as it is read (:func:`cover_crop`), so that a 4K or 8K video's frames are
    held at the output's size, not the source's (a minute of 4K is 24 GB of uint8 frames; at 720p it is 2.6 GB).
    ``size_of(height, width)`` gives the output (height, width) from the first frame's size, which ``source`` then
    holds (for the aspect and crop messages)."""

    def __init__(self, size_of: Callable[[int, int], tuple[int, int]]):
        self.size_of, self.source, self.size = size_of, None, None

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        if self.size is None:
            self.source = (int(frame.shape[0]), int(frame.shape[1]))
            self.size = tuple(int(v) for v in self.size_of(*self.source))
        return cover_crop(frame, *self.size)

    @property
    def aspect(self) -> float:
        """h/w of the frames as read (before fitting)."""
        if self.source is None:
            raise RuntimeError("no frame fitted yet")
        return self.source[0] / self.source[1]


CROP_WARN_SHARE = 0.1  # cutting more of a picture than this is worth telling the user


def cropped_share(height0: int, width0: int, height: int, width: int) -> float:
    """Share of a ``height0`` x ``width0`` picture that :func:`_transform` (resize to cover, center crop) cuts away
    for a ``height`` x ``width`` target: 0 for the same aspect, 0.25 for a 4:3 frame into 16:9."""
    source, target = height0 / width0, height / width
    return 1 - min(source, target) / max(source, target)


def _check_size(height: int, width: int, multiple: int = 16) -> None:
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"target height and width must be positive multiples of {multiple}, got {height}x{width}")


def prepare_image(img: Any, height: int, width: int) -> torch.Tensor:
    """PIL image or uint8 (H, W, 3) RGB -> (1, 3, 1, height, width) float32 in [-1, 1]."""
    _check_size(height, width)
    return _transform(_as_pil(img), height, width)[None, :, None]


def fit_video(frames: Any, height: int, width: int) -> torch.Tensor:
    """uint8 (T, H, W, 3) RGB frames -> uint8 (1, 3, T, height, width), each :func:`cover_crop`-ped; frames already
    that size (:class:`FrameFit`) are viewed, not copied. The tokenizer takes these and turns each chunk to [-1, 1]
    as it encodes it (:func:`to_signed_unit`): a minute at 720p is 2.6 GB as uint8, 10.6 GB as float32."""
    _check_size(height, width)
    arr = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] != 3 or len(arr) == 0:
        raise ValueError(f"expected uint8 video frames (T, H, W, 3) RGB, got {arr.dtype} {arr.shape}")
    if arr.shape[1:3] != (height, width):
        arr = np.stack([cover_crop(f, height, width) for f in arr])
    elif not arr.flags.writeable or min(arr.strides) < 0:  # torch views only writable, unflipped arrays
        arr = arr.copy()
    return torch.from_numpy(arr).permute(3, 0, 1, 2)[None]


def prepare_video(frames: Any, height: int, width: int) -> torch.Tensor:
    """uint8 (T, H, W, 3) RGB frames -> (1, 3, T, height, width) float32 in [-1, 1], per-frame transform
    (contiguous: the layout convolutions have always been given)."""
    return to_signed_unit(fit_video(frames, height, width)).contiguous()


def _to_thwc(x: torch.Tensor) -> torch.Tensor:
    """Decoder output (1, 3, T, H, W) or (3, T, H, W) -> (T, H, W, 3) float32 in [0, 1] (clamp((x+1)/2)), in fp32
    whatever the decoder ran in (the official code post-processes a bf16 decode in bf16, losing a level)."""
    if x.ndim == 5:
        if x.shape[0] != 1:
            raise ValueError(f"expected a single video (1, 3, T, H, W), got {tuple(x.shape)}")
        x = x[0]
    if x.ndim != 4 or x.shape[0] != 3:
        raise ValueError(f"expected decoder output (1, 3, T, H, W), got {tuple(x.shape)}")
    return ((x.float() + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0)


def images_on(device: torch.device | str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Post-processing of one decoded chunk where it was decoded, then the move of its images to ``device``
    (``VideoTokenizer.decode(images_to=...)``): the same values as ``frames_to_float_images`` of the whole."""
    def keep(x: torch.Tensor) -> torch.Tensor:
        return _to_thwc(x).contiguous().to(device)
    return keep


def frames_to_uint8(x: torch.Tensor, *, is_video: bool) -> torch.Tensor:
    """Raw decoder output -> (T, H, W, 3) uint8 RGB on CPU, exactly as the official post-processing.

    Truncation (not rounding) to uint8; for videos frame 0 is then replaced by frame 1 (the
    official "smoothing"); single images keep their only frame.
    """
    img = _to_thwc(x).mul(255).to(torch.uint8).cpu()
    if is_video and img.shape[0] > 1:
        img[0] = img[1]
    return img


def frames_to_float_images(x: torch.Tensor, *, smooth_first_frame: bool = False) -> torch.Tensor:
    """Raw decoder output -> (T, H, W, 3) float32 in [0, 1] on CPU (a ComfyUI IMAGE batch).

    ``smooth_first_frame`` applies the official video rule frame 0 := frame 1 (ignored for one frame).
    """
    img = _to_thwc(x).cpu().contiguous()
    return first_frame_rule(img) if smooth_first_frame else img


def first_frame_rule(images: torch.Tensor) -> torch.Tensor:
    """The official video rule frame 0 := frame 1 on images (T, H, W, 3), in place; one frame stays as it is."""
    if images.shape[0] > 1:
        images[0] = images[1]
    return images


def encode_bits(latent: torch.Tensor, steps: Sequence[Any]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Multi-scale BSQ residual quantization of a latent over schedule steps (spec §3.3).

    ``latent`` (1, 64, T, h, w); each step has ``clip, t, h, w, d, frame_ss, frame_ee`` (a
    ``ScaleStep``). Per clip a zero accumulator of the clip's full size; per step residual =
    target - accumulator, area-resample to (d, t, h, w), sign -> bits, accumulator += trilinear
    codes. A prefix of a schedule (e.g. the image steps for I2V) is fine.

    Returns the bits per step, (1, t, h, w, d) uint8, and the accumulators of the clips seen,
    concatenated along T in clip order: (1, 64, sum of clip lengths, h, w).
    """
    if latent.ndim != 5:
        raise ValueError(f"expected a latent (B, C, T, h, w), got {tuple(latent.shape)}")
    target_all = latent.float()
    accs: dict[int, torch.Tensor] = {}
    ranges: dict[int, tuple[int, int]] = {}
    bits_out: list[torch.Tensor] = []
    for step in steps:
        clip, ss, ee = int(step.clip), int(step.frame_ss), int(step.frame_ee)
        if ee > target_all.shape[2] or ee - ss != int(step.t):
            raise ValueError(f"step {getattr(step, 'index', '?')} wants frames [{ss}, {ee}) with t={step.t}, "
                             f"latent has {target_all.shape[2]} frames")
        if clip not in accs:
            accs[clip] = torch.zeros_like(target_all[:, :, ss:ee])
            ranges[clip] = (ss, ee)
        target = target_all[:, :, ss:ee]
        bits, codes = bsq.quantize_residual(target - accs[clip], int(step.d), (int(step.t), int(step.h), int(step.w)))
        accs[clip] = accs[clip] + codes
        bits_out.append(bits)
    if not accs:
        raise ValueError("encode_bits needs at least one step")
    summed = torch.cat([accs[c] for c in sorted(accs)], dim=2)
    return bits_out, summed
