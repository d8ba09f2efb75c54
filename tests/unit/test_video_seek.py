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


def _encode(path, codec="libx264", gop=None, bframes=True, vfr=False, frames=FRAMES, x264=None):
    """``frames`` frames that all differ (a wrong pick shows), encoded as asked (``x264``: x264-params)."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:48, 0:64]
    pixels = np.empty((frames, 48, 64, 3), np.uint8)
    for t in range(frames):  # moving gradients and a moving box: P-frames that lean on their references
        pixels[t] = np.stack([(3 * xx + 2 * t) % 256, (4 * yy + 3 * t) % 256, (2 * (xx + yy) + 5 * t) % 256], -1)
        pixels[t, 8:20, (3 * t) % 48:(3 * t) % 48 + 16] = 255
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
        if codec == "libx264":
            stream.options = {"crf": "18", **({} if bframes else {"bf": "0"}), **({"x264-params": x264} if x264 else {})}
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
    if kind == "MPEG-TS":  # a broadcast / camcorder stream: its demuxer seeks by byte position
        return _encode(tmp_path / "v.ts", gop=15)
    if kind == "cut inside a GOP":  # its first packets are no keyframe: the decoder drops them
        path = _cut(_encode(tmp_path / "v.mkv", x264="keyint=10:bframes=2"), tmp_path / "cut.mkv", 4)
        try:
            read_video(path)
        except av.error.InvalidDataError:  # PyAV 14 stops at the first of them
            pytest.skip(f"PyAV {av.__version__} does not decode a file that starts inside a GOP")
        return path
    if kind == "trimmed":  # an edit list drops the first 10 samples (a stream-copied trim)
        path = remux_shifted(_encode(tmp_path / "v.mp4", gop=30), tmp_path / "trim.mp4", 10, FPS)
        try:
            read_video(path)
        except av.error.InvalidDataError:
            pytest.skip(f"PyAV {av.__version__} cannot write the trimmed fixture")
        return path
    options = {"short keyframe interval": dict(gop=12), "long keyframe interval": dict(gop=250),
               "no B-frames": dict(gop=30, bframes=False), "variable frame rate": dict(gop=30, vfr=True),
               "mpeg4": dict(codec="mpeg4", gop=24),
               # no keyframe after the first: the container marks recovery points the decoder cannot start from
               "intra-refresh": dict(x264="intra-refresh=1:keyint=30:bframes=0")}[kind]
    return _encode(tmp_path / "v.mp4", **options)


KINDS = ["short keyframe interval", "long keyframe interval", "no B-frames", "variable frame rate", "mpeg4", "webm",
         "trimmed", "intra-refresh", "cut inside a GOP", "MPEG-TS"]


def _cut(source, target, packets: int):
    """``source`` remuxed without its first ``packets`` packets: a file that starts inside a group of pictures (a
    capture or a cut that ignored keyframes)."""
    with av.open(str(source)) as src, av.open(str(target), "w") as out:
        copy = out.add_stream_from_template(src.streams.video[0])
        for n, packet in enumerate(p for p in src.demux(src.streams.video[0]) if p.size):
            if n >= packets:
                packet.stream = copy
                out.mux(packet)
    return target


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


def _watch_seeks(monkeypatch) -> tuple[list[int], list[int]]:
    """(how far back each seek attempt aimed, the index of every frame read after a seek), filled as read_frames
    runs; a decode from the start adds nothing."""
    attempts, seen = [], []
    real = video_io._seeked

    def spy(container, stream, order, first, back=0):
        attempts.append(back)
        for i, frame in real(container, stream, order, first, back):
            seen.append(i)
            yield i, frame

    monkeypatch.setattr(video_io, "_seeked", spy)
    return attempts, seen


def test_late_picks_decode_from_the_keyframe_before_them(tmp_path, monkeypatch):
    """The decode starts at most one keyframe interval before the first pick, not at the first frame."""
    path = _encode(tmp_path / "v.mp4", gop=12)
    attempts, seen = _watch_seeks(monkeypatch)
    index = clip_indices(FRAMES, FPS, 81, 5.0, from_end=True)  # frames 150..299
    got = read_frames(path, index, FRAMES)
    assert index[0] - 12 <= seen[0] <= index[0] and seen[-1] == FRAMES - 1 and len(seen) <= FRAMES - index[0] + 12
    assert attempts == [0]  # an mp4 seeks by time: never after the pick
    seen.clear()
    off_key = np.arange(155, 300, 2)  # a first pick between keyframes (150, 162): from the one before it
    assert np.array_equal(read_frames(path, off_key, FRAMES), read_video(path)[0][off_key])
    assert seen[0] == 150 and attempts == [0, 0]
    seen.clear()
    read_frames(path, np.arange(0, 5), FRAMES)  # picks from the start: nothing to seek
    assert seen == []
    monkeypatch.undo()
    assert np.array_equal(got, read_video(path)[0][index])


def test_a_seek_that_lands_late_is_tried_earlier(tmp_path, monkeypatch):
    """MPEG-TS seeks by byte position and lands after the target: the reader seeks further back, and still decodes
    far less than the whole video."""
    path = _file("MPEG-TS", tmp_path)
    attempts, seen = _watch_seeks(monkeypatch)
    index = clip_indices(FRAMES, FPS, 81, 5.0, from_end=True)  # frames 150..299
    got = read_frames(path, index, FRAMES)
    assert attempts[0] == 0 and len(attempts) > 1 and attempts == sorted(attempts)  # late, then further back
    assert seen and 0 < seen[0] <= index[0]  # not from the first frame
    monkeypatch.undo()
    assert np.array_equal(got, read_video(path)[0][index])


def test_frames_the_times_cannot_place_are_decoded_from_the_start(tmp_path, monkeypatch, caplog):
    """A seek whose frames cannot be matched to their indices, or a file whose frame times cannot place its frames
    (missing or repeated), gives the same frames from a decode from the start."""
    path = _encode(tmp_path / "v.mp4", gop=12)
    whole = read_video(path)[0]
    index = np.arange(200, 260, 3)

    calls = []

    def lost(container, stream, order, first, back=0):
        calls.append(back)
        yield from ()
        raise video_io._SeekMiss

    monkeypatch.setattr(video_io, "_seeked", lost)
    with caplog.at_level("DEBUG", logger="infinitystar.video_io"):
        assert np.array_equal(read_frames(path, index, FRAMES), whole[index])
    assert "decoding from the start" in caplog.text and calls == [0]  # one miss is enough: no seek further back

    real = video_io._count_frames
    monkeypatch.setattr(video_io, "_count_frames", lambda source: (*real(source)[:2], None))
    video_io._counted_file.cache_clear()
    try:
        assert np.array_equal(read_frames(path, index, FRAMES), whole[index])
    finally:
        video_io._counted_file.cache_clear()


def test_a_real_file_s_table_lists_every_frame_time_once(tmp_path):
    path = write_mp4(tmp_path / "v.mp4", distinct_frames(40), fps=16)
    total, fps, order = video_io._count_frames(str(path))
    assert total == 40 and order is not None and len(np.unique(order)) == 40 and not order.flags.writeable


@pytest.mark.parametrize("packets, first, count, table, why", [
    ([0, 512, 512, 1024], 0, 4, None, "two packets at one time cannot tell their frames apart"),
    ([0, 512, 1024, 1536], 256, 4, None, "a first decoded frame at a time no packet lists"),
    ([0, 512, 1024, (1536, "discard")], 0, 3, [0, 512, 1024], "a packet the container marks to discard"),
    ([0, 512, 1024, 1536], None, 4, None, "no frame decodes (a damaged first keyframe)"),
    ([0, 512, 1024, 1536], 512, 3, [512, 1024, 1536], "the decode starts at the second (cut inside a GOP)"),
])
def test_the_count_and_table_follow_what_decodes(monkeypatch, packets, first, count, table, why):
    """The count is the packets that give frames, and the table of times places frames only where the decode's first
    frame is a listed time and no time repeats; otherwise no table (the picks decode from the start)."""
    class Packet:
        def __init__(self, pts):
            discard = isinstance(pts, tuple)
            self.pts, self.size, self.is_discard = (pts[0] if discard else pts), 10, discard

    class Container:
        format = type("F", (), {"name": "mov,mp4"})()
        streams = type("S", (), {"video": [type("V", (), {"average_rate": 16})()]})()

        def demux(self, stream):
            return iter([Packet(pts) for pts in packets])

        def decode(self, stream):
            return iter([] if first is None else [type("Frame", (), {"pts": first})()])

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(video_io, "_open", lambda source: Container())
    total, fps, order = video_io._count_frames("fake.mp4")
    assert (total, fps) == (count, 16.0), why
    assert (order is None and table is None) or (order is not None and order.tolist() == table), why


@pytest.mark.parametrize("stamps, keys, corrupt, why", [
    ([0, 1, 2, 3, 4, 5], {0}, None, None),  # from the keyframe before the pick on: read
    ([4, 5], {4}, None, None),  # the keyframe is the first pick
    ([5, 6], {5}, None, "late"),  # the first pick (4) is behind: seek earlier
    ([2, 3, 5, 6], {2}, None, "frame 4 skipped"),
    ([2, 3, 3, 4], {2}, None, "a frame twice"),
    ([2, 35, 4], {2}, None, "a time no frame has"),
    ([2, None, 4], {2}, None, "a frame without a time"),
    ([2, 3, 4, 5], {2}, 5, "a damaged frame from the first pick on"),
    ([1, 2, 3, 4], {1}, 2, None),  # a damaged frame before the picks is not used
    ([2, 3, 4, 5], set(), None, "no keyframe before the first pick (x264 intra-refresh)"),
    ([2, 3, 4, 100], {2}, None, "a time after the last frame's"),
    ([1, 2, 3, 4], {3}, None, None),  # frames before the first keyframe (open GOP) are not picked
])
def test_a_seek_reads_on_only_while_every_frame_is_placed(stamps, keys, corrupt, why):
    """After the seek, each frame's index comes from its time; one that is not a listed frame's time, out of order,
    a gap over a frame to pick, or a pick before the decoder has output a keyframe (a container's keyframe that is
    none to the decoder, as x264's intra-refresh recovery points) makes the reader decode from the start instead; a
    first frame after the first pick asks for an earlier seek."""
    order = np.arange(0, 100, 10)  # frame i at time 10 i

    class Frame:
        def __init__(self, i):
            self.pts = None if i is None else (35 if i == 35 else 10 * i)
            self.key_frame, self.is_corrupt = i in keys, i == corrupt

    class Container:
        def seek(self, *a, **k):
            self.sought = a

        def decode(self, stream):
            return iter([Frame(i) for i in stamps])

    frames = video_io._seeked(Container(), None, order, 4)
    if why is None:
        assert [i for i, _ in frames] == stamps
    else:
        with pytest.raises(video_io._SeekMiss) as miss:
            list(frames)
        assert (miss.type is video_io._SeekLate) == (why == "late")


def test_a_file_cut_inside_a_gop_counts_and_seeks_what_decodes(tmp_path, monkeypatch):
    """A file that starts inside a group of pictures: the decoder gives no frame for its packets before the first
    keyframe, so the count is the frames it gives (the picks from the end exist), and late picks still seek."""
    path = _file("cut inside a GOP", tmp_path)
    whole = read_video(path)[0]
    total, fps = video_io.video_frame_count(path)
    assert total == len(whole) < FRAMES - 4  # 4 packets cut, and the B-frames that leaned on them
    _, seen = _watch_seeks(monkeypatch)
    index = clip_indices(total, fps, 81, 5.0, from_end=True)
    assert np.array_equal(read_frames(path, index, total), whole[index])
    assert seen and 0 < seen[0] <= index[0]


def test_every_late_pick_of_an_intra_refresh_video_is_its_frame(tmp_path):
    """x264's intra-refresh writes no keyframe after the first but marks recovery points as keyframes in the
    container: a seek to one would build frames from references it never decoded (garbage, with correct times and
    no damage flag). One pick at a time, from late in the video, each equals the decode from the start's."""
    path = _file("intra-refresh", tmp_path)
    whole = read_video(path)[0]
    for k in range(200, len(whole), 3):
        assert np.array_equal(read_frames(path, [k]), whole[[k]]), f"frame {k}"
