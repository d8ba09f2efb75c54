"""read_frames seeks to picks that start late in a video (its last 5 s: Interact Start, Encode's keep, --last):
the frames must be those the decode from the start gives, bit for bit, whatever the file's structure (long or
short keyframe intervals, B-frames or none, variable frame rate, an edit list, another codec), and a file whose
frame times cannot place its frames is decoded from the start."""
import io
from fractions import Fraction

import av
import numpy as np
import pytest
from video_files import distinct_frames, remux_shifted

from infinitystar import video_io
from infinitystar.video_io import clip_indices, read_frames, read_video, write_mp4

FRAMES, FPS = 300, 30


def _encode(path, codec="libx264", gop=None, bframes=True, vfr=False, frames=FRAMES):
    """``frames`` frames that all differ (a wrong pick shows), encoded as asked."""
    rng = np.random.default_rng(1)
    pixels = distinct_frames(frames, 48, 64) // 2
    pixels[:, :, :, 2] = rng.integers(0, 255, (frames, 1, 64), dtype=np.uint8)  # a per-frame stripe pattern
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
        if codec == "libx264":
            stream.options = {"crf": "18", **({} if bframes else {"bf": "0"})}
        if vfr:
            stream.codec_context.time_base = Fraction(1, 1000)
        t = 0
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(pixels[i], format="rgb24")
            if vfr:  # 20 to 50 ms apart, as a phone's variable-rate clip
                t += int(rng.choice([20, 33, 50]))
                frame.pts, frame.time_base = t, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _file(kind, tmp_path):
    if kind == "webm":
        if "libvpx-vp9" not in av.codecs_available:
            pytest.skip("this PyAV has no VP9 encoder")
        return _encode(tmp_path / "v.webm", codec="libvpx-vp9", gop=60)
    if kind == "trimmed":  # an edit list drops the first 10 samples (a stream-copied trim)
        path = remux_shifted(_encode(tmp_path / "v.mp4", gop=30), tmp_path / "trim.mp4", 10, FPS)
        try:
            read_video(path)
        except av.error.InvalidDataError:
            pytest.skip(f"PyAV {av.__version__} cannot write the trimmed fixture")
        return path
    options = {"short keyframe interval": dict(gop=12), "long keyframe interval": dict(gop=250),
               "no B-frames": dict(gop=30, bframes=False), "variable frame rate": dict(gop=30, vfr=True),
               "mpeg4": dict(codec="mpeg4", gop=24)}[kind]
    return _encode(tmp_path / "v.mp4", **options)


KINDS = ["short keyframe interval", "long keyframe interval", "no B-frames", "variable frame rate", "mpeg4", "webm",
         "trimmed"]


@pytest.mark.parametrize("kind", KINDS)
def test_late_picks_are_the_frames_of_the_decode_from_the_start(kind, tmp_path):
    path = _file(kind, tmp_path)
    whole, fps = read_video(path)
    total = len(whole)
    picks = [clip_indices(total, fps, 81, 5.0, from_end=True),  # the last 5 s, as Interact Start reads them
             np.array([total - 1]), np.array([1, 1, 2]), np.array([total // 2, total // 2, total - 1]),
             np.arange(249, 252) if total > 252 else np.array([total - 2, total - 1])]
    for index in picks:
        got = read_frames(path, index, total)
        assert np.array_equal(got, whole[index]), f"{kind}: picks {index[:3]}...: frames differ"
    source = io.BytesIO(path.read_bytes())  # ComfyUI's VideoFromFile of an upload
    assert np.array_equal(read_frames(source, picks[0], total), whole[picks[0]])


def test_late_picks_decode_from_the_keyframe_before_them(tmp_path, monkeypatch):
    """The decode starts at most one keyframe interval before the first pick, not at the first frame."""
    path = _encode(tmp_path / "v.mp4", gop=12)
    seen = []
    real = video_io._seeked

    def spy(container, stream, order, first):
        for i, frame in real(container, stream, order, first):
            seen.append(i)
            yield i, frame

    monkeypatch.setattr(video_io, "_seeked", spy)
    index = clip_indices(FRAMES, FPS, 81, 5.0, from_end=True)  # frames 150..299
    got = read_frames(path, index, FRAMES)
    assert index[0] - 12 <= seen[0] <= index[0] and seen[-1] == FRAMES - 1 and len(seen) <= FRAMES - index[0] + 12
    seen.clear()
    read_frames(path, np.arange(0, 5), FRAMES)  # picks from the start: nothing to seek
    assert seen == []
    monkeypatch.setattr(video_io, "_seeked", real)
    assert np.array_equal(got, read_video(path)[0][index])


def test_frames_the_times_cannot_place_are_decoded_from_the_start(tmp_path, monkeypatch, caplog):
    """A seek whose frames cannot be matched to their indices, or a file whose frame times cannot place its frames
    (missing or repeated), gives the same frames from a decode from the start."""
    path = _encode(tmp_path / "v.mp4", gop=12)
    whole = read_video(path)[0]
    index = np.arange(200, 260, 3)

    def lost(container, stream, order, first):
        yield from ()
        raise video_io._SeekMiss

    monkeypatch.setattr(video_io, "_seeked", lost)
    with caplog.at_level("DEBUG", logger="infinitystar.video_io"):
        assert np.array_equal(read_frames(path, index, FRAMES), whole[index])
    assert "decoding from the start" in caplog.text

    real = video_io._count_frames
    monkeypatch.setattr(video_io, "_count_frames", lambda source: (*real(source)[:2], None))
    video_io._counted_file.cache_clear()
    try:
        assert np.array_equal(read_frames(path, index, FRAMES), whole[index])
    finally:
        video_io._counted_file.cache_clear()


def test_repeated_frame_times_place_no_frame(tmp_path, monkeypatch):
    """Two packets at one time cannot tell their frames apart: no seek table, the count unchanged."""
    path = write_mp4(tmp_path / "v.mp4", distinct_frames(40), fps=16)
    total, fps, order = video_io._count_frames(str(path))
    assert total == 40 and order is not None and len(order) == 40 and not order.flags.writeable

    class Packet:
        def __init__(self, pts):
            self.pts, self.size, self.is_discard = pts, 10, False

    class Container:
        format = type("F", (), {"name": "mov,mp4"})()
        streams = type("S", (), {"video": [type("V", (), {"average_rate": 16})()]})()

        def demux(self, stream):
            return iter([Packet(0), Packet(512), Packet(512), Packet(1024)])

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(video_io, "_open", lambda source: Container())
    assert video_io._count_frames("repeated.mp4") == (4, 16.0, None)


@pytest.mark.parametrize("stamps, corrupt, why", [
    ([0, 1, 2, 3, 4, 5], None, None),  # from the keyframe before the pick on: read
    ([4, 5], None, None),  # the keyframe is the first pick
    ([5, 6], None, "the first pick (4) was never decoded"),
    ([2, 3, 5, 6], None, "frame 4 skipped"),
    ([2, 3, 3, 4], None, "a frame twice"),
    ([2, 35, 4], None, "a time no frame has"),
    ([2, None, 4], None, "a frame without a time"),
    ([2, 3, 4, 5], 5, "a damaged frame from the first pick on"),
    ([1, 2, 3, 4], 2, None),  # a damaged frame before the picks is not used
])
def test_a_seek_reads_on_only_while_every_frame_is_placed(stamps, corrupt, why):
    """After the seek, each frame's index comes from its time; one that is not a listed frame's time, out of order,
    or a gap over a frame to pick, makes the reader decode from the start instead."""
    order = np.arange(0, 100, 10)  # frame i at time 10 i

    class Frame:
        def __init__(self, i):
            self.pts = None if i is None else (35 if i == 35 else 10 * i)
            self.is_corrupt = i == corrupt

    class Container:
        def seek(self, *a, **k):
            self.sought = a

        def decode(self, stream):
            return iter([Frame(i) for i in stamps])

    frames = video_io._seeked(Container(), None, order, 4)
    if why is None:
        assert [i for i, _ in frames] == stamps
    else:
        with pytest.raises(video_io._SeekMiss):
            list(frames)
