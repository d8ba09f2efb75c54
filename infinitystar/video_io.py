"""Reading and writing frames: H.264 mp4 through PyAV, PNG/JPEG/WebP through Pillow.

The official scripts write 16 fps mp4s; frames here are uint8 RGB arrays (T, H, W, 3).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import shutil
import time
import uuid
from fractions import Fraction
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_FPS = 16


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask. Writers such as safetensors create files
    0600, which hides a user's own outputs from their other accounts and services (a web UI, a sync client)."""
    try:  # Linux says it without changing it (other threads may be creating files meanwhile)
        with open("/proc/self/status", encoding="ascii") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)  # elsewhere reading the umask means setting it; put it straight back
        os.umask(mask)
    return 0o666 & ~mask


REPLACE_TRIES, REPLACE_WAIT_S = 10, 0.2  # Windows refuses a replace while a scanner holds the new file briefly


def _replace(part: Path, path: Path) -> None:
    for attempt in range(REPLACE_TRIES):
        try:
            return os.replace(part, path)
        except PermissionError:  # Windows: the target open in a player, the new file in an antivirus scan
            if attempt == REPLACE_TRIES - 1:
                raise
            time.sleep(REPLACE_WAIT_S)


def _kept_as(part: Path, path: Path) -> Path:
    """Move a finished file that cannot take its name to a free visible one beside it (else leave it as is)."""
    for n in range(1, 100):
        free = path.with_name(f"{path.stem} ({n}){path.suffix}")
        if not free.exists():
            try:
                os.rename(part, free)
                return free
            except OSError:
                break
    return part


def _kept_said(part: Path, path: Path) -> str:
    """Keep a finished file that cannot take its name (:func:`_kept_as`) and say where; one left under its hidden
    temporary name must be renamed, as a later write removes day-old temporaries (:func:`_drop_stale_parts`)."""
    kept = _kept_as(part, path)
    hidden = " (rename it: hidden temporaries are removed after a day)" if kept == part else ""
    return f"the finished file is kept as {kept}{hidden}"


def as_os_error(exc: BaseException) -> OSError | None:
    """``exc`` as an OSError where it is a failed read or write: safetensors reports those (a full disk, ...) as its
    own SafetensorError ("I/O error: No space left on device (os error 28)"), which is no OSError."""
    if isinstance(exc, OSError):
        return exc
    if type(exc).__name__ == "SafetensorError":
        found = re.search(r"I/O error: (.+?)(?: \(os error (\d+)\))?\s*$", str(exc))
        if found:
            return OSError(int(found.group(2) or 0), found.group(1))
    return None


STALE_PART_S = 24 * 3600  # a temporary file of ours this old was left by a killed writer
OUR_PART = re.compile(r"\..+\.\d+-[0-9a-f]{8}\.part")  # the names written_whole gives its temporaries


def _drop_stale_parts(folder: Path) -> None:
    """Remove the hidden temporaries a hard kill (power cut, OOM killer) left in ``folder`` in an earlier run: ours
    only (by their name's pattern) and a day old, so that a writer's file in progress is never touched."""
    cutoff = time.time() - STALE_PART_S
    with contextlib.suppress(OSError):
        for old in folder.glob(".*.part"):
            with contextlib.suppress(OSError):
                if OUR_PART.fullmatch(old.name) and old.is_file() and old.stat().st_mtime < cutoff:
                    old.unlink()


@contextlib.contextmanager
def written_whole(path: str | Path):
    """Yield a temporary name beside ``path`` and move it onto ``path`` once written: an error or a Ctrl-C while
    writing leaves no truncated file under the name asked for (nor the temporary one). A symlink is written
    through (its target is replaced), an existing file's permissions are kept (a new file gets the umask's), and
    write errors name the path. A finished file that cannot take the name (Windows: the old file open in a player)
    is kept under a free name, which the error gives: a long run's result is never thrown away."""
    asked = Path(path)
    path = Path(os.path.realpath(asked))
    part = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part")
    written = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _drop_stale_parts(path.parent)
        yield part
        written = True
        try:  # best effort: FAT / exFAT and some network mounts refuse modes they cannot hold
            if path.is_file():
                shutil.copymode(path, part)
            else:
                part.chmod(new_file_mode())
        except OSError as e:
            logger.debug("could not set the mode of %s: %s", part, e)
        _replace(part, path)
    except Exception as failed:  # noqa: BLE001 — only read/write errors are handled here; the rest re-raised
        e = as_os_error(failed)
        if e is None:
            raise
        if written and part.is_file():
            held = " (is it open in another program?)" if isinstance(e, PermissionError) else ""
            raise OSError(f"cannot write {asked}: {e.strerror or e}{held}; {_kept_said(part, path)}") from failed
        raise OSError(f"cannot write {asked}: {e.strerror or e}") from failed
    except KeyboardInterrupt:  # Ctrl-C while the name is retried: the finished file stays, visible
        if written and part.is_file():
            with contextlib.suppress(OSError):
                logger.warning("interrupted: %s", _kept_said(part, path))
        raise
    finally:
        if not written:  # best effort: a file still held open (Windows) must not hide the error that stopped us
            with contextlib.suppress(OSError):
                part.unlink(missing_ok=True)


def _check_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give the {what} file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:  # said as it is: the readers would call an unreadable file damaged
        with open(path, "rb"):
            pass
    except PermissionError as exc:
        raise PermissionError(f"{path}: no permission to read this {what} ({exc.strerror}); give the account that "
                              "runs this read access to it.") from None


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

    if not hasattr(frames, "detach"):
        frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_mp4 expects (T, H, W, 3) frames, got shape {tuple(frames.shape)}")
    height, width = frames.shape[1], frames.shape[2]
    pad = ((0, height % 2), (0, width % 2), (0, 0))
    path = Path(path)
    with written_whole(path) as part, av.open(str(part), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(int(fps), 1))
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:  # converted one at a time: a long float video is not copied whole (3x its size)
            pixels = to_uint8(frame)
            if height % 2 or width % 2:
                pixels = np.pad(pixels, pad, mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    logger.debug("wrote %s (%d frames, %dx%d, %d fps)", path, len(frames), width, height, fps)
    return path


def read_video(path: str | Path, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode a video file to (T, H, W, 3) uint8 RGB frames and its frame rate."""
    import av

    path = Path(path)
    _check_file(path, "video")
    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = _fps(stream)
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            if max_frames is not None and len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError(f"{path}: no video frames could be decoded")
    return np.stack(frames), fps


def sample_frames(frames: np.ndarray, fps: float, count: int, seconds: float, *, from_end: bool = False
                  ) -> np.ndarray:
    """Pick ``count`` frames over the first (or last) ``seconds``, as the official reader does (the official V2V
    reads 81 over the first 5 s, the interact script over the last 5 s): :func:`clip_indices`."""
    return frames[clip_indices(len(frames), fps, count, seconds, from_end=from_end)]


def clip_indices(total: int, fps: float, count: int, seconds: float, *, from_end: bool = False) -> np.ndarray:
    """Indices of the official ``get_clip(start, end, count)`` over the first (or last) ``seconds`` of a video of
    ``total`` frames: ``linspace(ceil(fps * start), min(ceil(fps * end), total) - 1, count)`` truncated to integers.
    At 16 fps that repeats the window's first frame and leaves out its 81st (official: frames 0, 0, 1, ..., 79)."""
    fps = checked_fps(fps)
    duration = float(total) / fps
    if duration + 1e-6 < seconds:
        raise ValueError(f"the input video is {duration:.2f} s long; at least {seconds:g} s are needed")
    start, end = (duration - seconds, duration) if from_end else (0.0, float(seconds))
    first, stop = math.ceil(fps * start), min(math.ceil(fps * end), total)
    picks = np.linspace(first, stop - 1, count, dtype=int)
    if count > 1 and fps < (count - 1) / seconds - 0.5:  # clearly slower than the model's rate (not 15.99 VFR)
        repeats = count - len(np.unique(picks))
        logger.warning("the video runs at %g fps, below the model's %g: %d of the %d frames picked repeat the one "
                       "before, so motion will look stepped (if the video's real rate is higher, give that rate)",
                       fps, (count - 1) / seconds, repeats, count)
    return picks


MIN_FPS = 1.0


def checked_fps(fps: float) -> float:
    """``fps`` as a float, refused below :data:`MIN_FPS`: a file may declare any rate (1/10000 fps made three frames
    480,001 picks, a 23 GiB gather at 64x64), and picks repeat frames the slower the rate."""
    fps = float(fps)
    if not fps >= MIN_FPS:
        raise ValueError(f"a frame rate of {fps:g} fps is not a video's (below {MIN_FPS:g}): the video (or its "
                         "file's header) gives a wrong rate; re-encode it with its real rate (ffmpeg -r), or give that "
                         "rate where the input takes one")
    return fps


def whole_clips(total: int, fps: float, clip_seconds: float = 5.0) -> int:
    """How many whole ``clip_seconds`` clips a ``total``-frame video at ``fps`` holds (with :func:`clip_indices`'s
    tolerance of 1e-6 s)."""
    return int(float(total) / checked_fps(fps) / clip_seconds + 1e-6)


def whole_clip_indices(total: int, fps: float, clip_frames: int, clip_seconds: float = 5.0,
                       last: int | None = None) -> np.ndarray:
    """The frames a video continuation is encoded from: every whole ``clip_seconds`` clip of a ``total``-frame video
    at ``fps``, picked as the official V2V reader picks them (:func:`clip_indices`, ``1 + clip_frames`` per clip at
    the model's rate, so a 30 fps video is not played 1.9x too fast). One frame is an image: ``[0]``. A video shorter
    than one clip gives an empty array (the caller says what to do).

    ``last``: at most that many whole clips, ending at the video's last frame (read from its end as the interact
    script reads its reference), so that a continuation starts where the video ends: from its start, up to a clip
    less a frame of the end would be dropped, and a long video would cost a clip per 5 s to encode and to replay."""
    if total == 1:
        return np.zeros(1, dtype=int)
    clips = whole_clips(total, fps, clip_seconds)
    if clips == 0:
        return np.zeros(0, dtype=int)
    if last is not None:
        if last < 1:
            raise ValueError(f"last must be at least 1 clip, got {last}")
        clips = min(clips, int(last))
    return clip_indices(total, fps, 1 + clip_frames * clips, clip_seconds * clips, from_end=last is not None)


def _fps(stream) -> float:
    return float(stream.average_rate or stream.guessed_rate or DEFAULT_FPS)


def _is_path(source) -> bool:
    return isinstance(source, (str, os.PathLike))


def _name(source) -> str:
    return str(source) if _is_path(source) else "the video"


def _open(source):
    """``av.open`` of a path (checked to be a file first) or of a file-like object, rewound: a source is read more
    than once (its count, then its frames)."""
    import av

    if _is_path(source):
        _check_file(Path(source), "video")
        return av.open(str(source))
    source.seek(0)
    return av.open(source)


def video_frame_count(source) -> tuple[int, float]:
    """(frames, fps) of a video file (path or file-like object) without decoding it: its packets are counted, less
    those the container marks to discard. The header's count is not used: a file trimmed without re-encoding (ffmpeg
    ``-c copy``, phone editors) lists samples its edit list drops, which no decoder returns; and a file cut inside a
    group of pictures holds packets before its first keyframe that give no frame.

    A path's count is kept for that version of the file (its device, inode, size, modification and change times:
    the change time also moves when a copy restores the modification time, cp -p or an unzip): the count reads every
    packet (seconds for an hour of 4K), and a run asks for it more than once (a check before the models load, then
    the picks; an Encode queued again with other settings)."""
    return _frame_table(source)[:2]


def _frame_table(source) -> tuple[int, float, np.ndarray | None]:
    """(frames, fps, each frame's pts in presentation order, or None where they cannot place a frame)."""
    if _is_path(source):
        _check_file(Path(source), "video")
        stat = os.stat(source)
        return _counted_file(str(source), os.path.realpath(source), stat.st_dev, stat.st_ino, stat.st_size,
                             stat.st_mtime_ns, stat.st_ctime_ns)
    return _count_frames(source)


@functools.lru_cache(maxsize=32)
def _counted_file(name: str, real: str, device: int, inode: int, size: int, mtime_ns: int,
                  ctime_ns: int) -> tuple[int, float, np.ndarray | None]:
    return _count_frames(name)  # errors are raised each time, not kept


def _count_frames(source) -> tuple[int, float, np.ndarray | None]:
    import av

    name = _name(source)
    try:
        container = _open(source)
    except av.error.FFmpegError as exc:
        raise ValueError(f"{name}: not a video FFmpeg can read ({exc.strerror}); give an .mp4, .mov, .mkv or "
                         ".webm file") from None
    with container:
        if not container.streams.video:
            raise ValueError(f"{name}: holds no video stream; give a video file")
        if "image2" in container.format.name or container.format.name.endswith("_pipe"):
            raise ValueError(f"{name} is a still image, not a video; give an image as the start image instead")
        stream = container.streams.video[0]
        fps = _fps(stream)
        stamps = [packet.pts for packet in container.demux(stream)
                  if packet.size and not getattr(packet, "is_discard", False)]
    if not stamps:
        raise ValueError(f"{name}: no video frames could be decoded")
    total, order = len(stamps), None
    if all(pts is not None for pts in stamps):
        order = np.sort(np.asarray(stamps, dtype=np.int64))
        first = _first_decoded_pts(source)
        dropped = int(np.searchsorted(order, first)) if first is not None else total
        if np.any(np.diff(order) <= 0) or dropped >= total or order[dropped] != first:
            order = None  # two frames at one time, or a first frame no time lists: times cannot place them
        else:  # a file cut inside a group of pictures: the decoder drops the frames before its first keyframe
            order, total = order[dropped:], total - dropped
            order.flags.writeable = False  # shared by every caller of the cached table
    return total, fps, order


def _first_decoded_pts(source) -> int | None:
    """The time of the first frame the decode from the start gives: the first listed one, except in a file cut
    inside a group of pictures (its packets before the first keyframe, or an open GOP's leading B-frames, give no
    frame, so the frame count and every index start after them)."""
    import av

    try:
        with _open(source) as container:
            first = next(iter(container.decode(container.streams.video[0])), None)
    except av.error.FFmpegError:
        return None
    return None if first is None else first.pts


def upright(rgb: np.ndarray, rotation) -> np.ndarray:
    """A decoded frame turned as the file says to show it (a phone's portrait clip is stored landscape with a display
    rotation, in degrees counter-clockwise, as ComfyUI's own video decode turns it)."""
    turns = int(round(float(rotation or 0) / 90)) % 4
    return np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb


class DecodeStopped(ValueError):
    """The decode from a video's start ended (its data ran out, or FFmpeg could not decode a packet) before the last
    frame asked for; ``decoded`` frames came out before it stopped."""

    def __init__(self, message: str, decoded: int):
        super().__init__(message)
        self.decoded = decoded


class _SeekMiss(Exception):
    """The frames after a seek cannot be matched to their indices: decode from the start instead."""


class _SeekLate(_SeekMiss):
    """The seek landed after the first pick (some demuxers seek by decode time, MPEG-TS by byte position): an
    earlier target may land before it."""


SEEK_BACK = (0, 64, 512)  # frames before the first pick to seek to, tried in turn while a seek lands after it


def _seeked(container, stream, order: np.ndarray, first: int, back: int = 0):
    """(index, frame) from the keyframe at or before frame ``first - back`` on, each frame's index read from its
    time. :class:`_SeekLate` when the first frame decoded is after ``first``; :class:`_SeekMiss` when a frame's
    time is not a listed frame's, a frame from ``first`` on is skipped, comes before the decoder has output a
    keyframe (a container may mark as keyframes what the decoder does not: x264's intra-refresh recovery points,
    whose frames would be built from references before the seek), or is decoded damaged."""
    container.seek(int(order[max(first - back, 0)]), stream=stream, backward=True, any_frame=False)
    previous, keyed = -1, False
    for frame in container.decode(stream):
        i = -1 if frame.pts is None else int(np.searchsorted(order, frame.pts))
        if previous < 0 and 0 <= i < len(order) and order[i] == frame.pts and i > first:
            raise _SeekLate
        if i < 0 or i >= len(order) or order[i] != frame.pts or i <= previous or i > max(previous + 1, first):
            raise _SeekMiss
        keyed = keyed or bool(frame.key_frame)
        if i >= first and (not keyed or getattr(frame, "is_corrupt", False)):
            raise _SeekMiss
        previous = i
        yield i, frame


def read_frames(source, index, total: int | None = None, fit=None, repick=None) -> np.ndarray:
    """The frames ``index`` (ascending, repeats allowed) of a video file (path or file-like object), as uint8
    (len(index), H, W, 3) RGB. Decodes up to the last one and keeps only those: each picked frame is written once
    into the output, so memory is the picks, never the video. ``total``: the count the picks were made from, for
    the message when the file holds fewer frames than its header lists. ``fit``: applied to each picked frame as it
    is decoded (``vae.FrameFit``: held at the output's size, not the source's).

    Picks that start later in the video (its last 5 s: Interact Start, Encode's keep) are decoded from the keyframe
    before the first of them, found by the frames' times, instead of from the start (minutes for a long 4K
    video). Where the times cannot place every frame, the video is decoded from its start.

    ``repick``: for picks from the video's end, ``repick(n)`` gives them for a video of ``n`` frames. A file whose
    last frames cannot be decoded (cut short: an unfinished download or recording lists packets whose data is
    missing or partial) then gives the same number of picks ending at its last decodable frame, with a warning,
    where up to a second of frames is lost; without it, or when more is lost, it is refused as damaged."""
    index = np.asarray(index, dtype=np.int64)
    if len(index) == 0:
        raise ValueError("no frames to read")
    if np.any(np.diff(index) < 0) or index[0] < 0:
        raise ValueError("frame indices must be ascending and not negative")
    try:
        return _read_frames(source, index, total, fit)
    except DecodeStopped as stopped:
        decoded = stopped.decoded
        shorter = None if repick is None else _picks_before_the_cut(source, index, total, repick, decoded)
        if shorter is None:
            raise
    return _read_frames(source, shorter, decoded, fit)


def _picks_before_the_cut(source, index: np.ndarray, total: int | None, repick, decoded: int) -> np.ndarray | None:
    """``repick(decoded)`` where the frames that cannot be decoded are the file's last second at most and the picks
    keep their number (a window that no longer fits is refused as before); else None."""
    listed, fps, _ = _frame_table(source)
    listed = total or listed
    lost = listed - decoded
    if not 0 < lost <= max(fps, 1.0):
        return None
    try:
        picks = np.asarray(repick(decoded), dtype=np.int64)
    except ValueError:  # what decodes is shorter than the window
        return None
    if len(picks) != len(index) or picks[-1] >= decoded:
        return None
    logger.warning("%s: its last %d of the %d frames it lists cannot be decoded (the file is cut short, e.g. an "
                   "unfinished download or recording); the frames are picked from its end as if it ended at frame %d, "
                   "the last one that decodes. Re-encode it (e.g. ffmpeg -i in.mp4 out.mp4) to drop them for good.",
                   _name(source), lost, listed, decoded - 1)
    return picks


def _read_frames(source, index: np.ndarray, total: int | None, fit) -> np.ndarray:
    order = None
    if index[0] > 0:
        with contextlib.suppress(ValueError, OSError):  # the decode from the start says what is wrong
            order = _frame_table(source)[2]
    if order is not None and index[-1] < len(order):
        for back in SEEK_BACK:
            try:
                return _read_picks(source, index, total, fit, order, back)
            except _SeekLate:
                continue
            except _SeekMiss:
                break
        logger.debug("%s: frame times do not place every frame after a seek; decoding from the start",
                     _name(source))
    return _read_picks(source, index, total, fit, None)


def _read_picks(source, index: np.ndarray, total: int | None, fit, order: np.ndarray | None,
                back: int = 0) -> np.ndarray:
    import av

    out, cursor, last, i = None, 0, int(index[-1]), -1
    try:
        with _open(source) as container:
            stream = container.streams.video[0]
            frames = (enumerate(container.decode(stream)) if order is None
                      else _seeked(container, stream, order, int(index[0]), back))
            for i, frame in frames:
                if i == index[cursor]:
                    rgb = upright(frame.to_ndarray(format="rgb24"), getattr(frame, "rotation", 0))
                    if fit is not None:
                        rgb = fit(rgb)
                    if out is None:
                        out = np.empty((len(index), *rgb.shape), dtype=np.uint8)
                    while cursor < len(index) and index[cursor] == i:  # a pick repeated at a low frame rate
                        out[cursor] = rgb
                        cursor += 1
                if i >= last:
                    break
    except av.error.FFmpegError as exc:  # damaged data mid-file: FFmpeg's message names neither file nor frame
        if order is not None:
            raise _SeekMiss from exc  # said by the decode from the start, with its frame count
        raise DecodeStopped(f"{_name(source)}: decoding stopped after {i + 1} frame(s) ({exc.strerror}); the file "
                            "is damaged. Re-encode it (e.g. ffmpeg -i in.mp4 out.mp4) or use another copy.",
                            i + 1) from None
    if cursor < len(index):
        if order is not None:
            raise _SeekMiss
        listed = f" of the {total} the container lists" if total else ""
        raise DecodeStopped(f"{_name(source)}: frame {int(index[cursor])}{listed} could not be decoded; the file may "
                            "be damaged or its header wrong (re-encode it, e.g. with ffmpeg)", i + 1)
    return out


def read_video_clip(path, count: int, seconds: float, *, from_end: bool = False,
                    length: tuple[int, float] | None = None, fit=None) -> tuple[np.ndarray, float]:
    """``count`` frames (uint8 (count, H, W, 3) RGB) of the first (or last) ``seconds`` of a video, picked as the
    official reader picks them (:func:`clip_indices`), and its frame rate. Only the frames picked are kept, so a
    long input never has to fit in memory. ``length``: :func:`video_frame_count` of the file, when already known;
    ``fit``: as :func:`read_frames`."""
    total, fps = length or video_frame_count(path)
    index = clip_indices(total, fps, count, seconds, from_end=from_end)
    repick = (lambda n: clip_indices(n, fps, count, seconds, from_end=True)) if from_end else None
    return read_frames(path, index, total, fit, repick), fps


def write_png(path: str | Path, image) -> Path:
    """Write one (H, W, 3) RGB image (or the first frame of a (T, H, W, 3) array) as PNG."""
    from PIL import Image

    image = to_uint8(image)
    if image.ndim == 4:
        image = image[0]
    path = Path(path)
    with written_whole(path) as part:
        Image.fromarray(image).save(part, format="PNG")
    return path


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB (alpha dropped, palette/greyscale converted), as the official
    ``cv2.imread`` reads it: turned upright by its EXIF orientation, and 16-bit greyscale scaled to 8 bits."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    _check_file(path, "image")
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16L", "I;16B", "I"):  # 16-bit grey: keep the high byte (cv2's 8-bit view)
                grey = (np.asarray(img).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            return np.asarray(img.convert("RGB"))
    except UnidentifiedImageError as e:
        raise ValueError(f"{path} is not an image Pillow can read (PNG, JPEG, WebP, ...): {e}") from e
    except OSError as e:  # e.g. "image file is truncated"
        raise ValueError(f"{path}: the image cannot be read ({e}); it may be damaged or incomplete") from e
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: {e}; scale the image down first") from e
