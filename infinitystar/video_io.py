"""Reading and writing frames: H.264 mp4 through PyAV, PNG/JPEG/WebP through Pillow.

The official scripts write 16 fps mp4s; frames here are uint8 RGB arrays (T, H, W, 3).
"""
from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_FPS = 16


def to_uint8(frames) -> np.ndarray:
    """Accept uint8 or float [0, 1] arrays/tensors of shape (T, H, W, 3) or (H, W, 3); return uint8 numpy.

    Floats are truncated (``x * 255`` then cast), like the official post-processing, so the written pixels
    equal the official pipeline's before compression.
    """
    if hasattr(frames, "detach"):
        frames = frames.detach().cpu().float().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames.astype(np.float32), 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)
    return frames


def write_mp4(path: str | Path, frames, fps: int = DEFAULT_FPS, crf: int = 18) -> Path:
    """Write (T, H, W, 3) RGB frames as an H.264 yuv420p mp4.

    yuv420p needs even sizes; odd heights/widths are padded by one replicated row/column
    rather than rescaled, so no pixel is resampled.
    """
    import av

    frames = to_uint8(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_mp4 expects (T, H, W, 3) frames, got shape {frames.shape}")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(int(fps), 1))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    logger.debug("wrote %s (%d frames, %dx%d, %d fps)", path, len(frames), frames.shape[2], frames.shape[1], fps)
    return path


def read_video(path: str | Path, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode a video file to (T, H, W, 3) uint8 RGB frames and its frame rate."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or DEFAULT_FPS)
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            if max_frames is not None and len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError(f"{path}: no video frames could be decoded")
    return np.stack(frames), fps


def sample_frames(frames: np.ndarray, fps: float, count: int, seconds: float) -> np.ndarray:
    """Pick ``count`` frames linearly spaced over the first ``seconds`` (the official V2V reads 81 over 5 s)."""
    available = len(frames) / max(fps, 1e-6)
    if available + 1e-6 < seconds:
        raise ValueError(f"the input video is {available:.2f} s long; at least {seconds:g} s are needed")
    last = min(len(frames) - 1, int(round(seconds * fps)))  # official: timestamps 0 .. seconds inclusive
    index = np.linspace(0, last, count).round().astype(np.int64)
    return frames[index]


def write_png(path: str | Path, image) -> Path:
    """Write one (H, W, 3) RGB image (or the first frame of a (T, H, W, 3) array) as PNG."""
    from PIL import Image

    image = to_uint8(image)
    if image.ndim == 4:
        image = image[0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB (alpha dropped, palette/greyscale converted)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))
