"""mp4/PNG round trips through PyAV and Pillow."""
import av
import numpy as np
import pytest
from video_files import distinct_frames, remux_shifted, rotated

from infinitystar.video_io import read_image, read_video, sample_frames, to_uint8, write_mp4, write_png


def _frames(t, h, w, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(1, h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    big = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)[:, :h, :w]
    return np.concatenate([np.roll(big, i, axis=2) for i in range(t)])


def test_mp4_roundtrip_with_pyav(tmp_path):
    frames = _frames(17, 48, 64)
    path = write_mp4(tmp_path / "a.mp4", frames, fps=16)
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264"
        assert s.codec_context.pix_fmt == "yuv420p"
        assert float(s.average_rate) == 16
    back, fps = read_video(path)
    assert back.shape == frames.shape and fps == 16
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 12


def test_mp4_odd_size_is_padded(tmp_path):
    frames = _frames(3, 33, 47)
    back, _ = read_video(write_mp4(tmp_path / "odd.mp4", frames))
    assert back.shape == (3, 34, 48, 3)


def test_float_frames_are_accepted(tmp_path):
    frames = np.linspace(0, 1, 2 * 16 * 16 * 3, dtype=np.float32).reshape(2, 16, 16, 3)
    assert to_uint8(frames).dtype == np.uint8
    back, _ = read_video(write_mp4(tmp_path / "f.mp4", frames))
    assert back.shape == (2, 16, 16, 3)


def test_png_roundtrip(tmp_path):
    img = _frames(1, 20, 30)[0]
    assert np.array_equal(read_image(write_png(tmp_path / "a.png", img)), img)


def test_read_image_as_the_official_imread(tmp_path):
    """cv2.imread (the official I2V reader) turns a photo upright by its EXIF orientation and reads 16-bit grey as
    its high byte; a file that is no image is refused with a clear message."""
    from PIL import Image

    img = _frames(1, 20, 30)[0]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    Image.fromarray(img).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = read_image(tmp_path / "phone.jpg")
    assert upright.shape == (30, 20, 3)
    grey16 = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 100)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    back = read_image(tmp_path / "g16.png")
    assert back.shape == (20, 30, 3) and np.array_equal(back[..., 0], (grey16 >> 8).astype(np.uint8))
    (tmp_path / "clip.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not an image"):
        read_image(tmp_path / "clip.png")


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "missing.mp4")
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "missing.png")


def test_sample_frames_picks_the_official_readers_frames():
    """The official EncodedVideoDecord/EncodedVideoOpencv.get_clip(start, end, 81): linspace from ceil(fps * start)
    to min(ceil(fps * end), N) - 1 with dtype=int (V2V: the first 5 s; interact: the last 5 s)."""
    frames = np.arange(200)[:, None, None, None] * np.ones((1, 2, 2, 3), dtype=np.int64)
    picked = sample_frames(frames, fps=16.0, count=81, seconds=5)[:, 0, 0, 0]
    assert np.array_equal(picked, np.linspace(0, 79, 81, dtype=int))  # 0, 0, 1, ..., 79
    assert list(picked[:3]) == [0, 0, 1] and picked[-1] == 79
    tail = sample_frames(frames, fps=16.0, count=81, seconds=5, from_end=True)[:, 0, 0, 0]
    assert np.array_equal(tail, np.linspace(120, 199, 81, dtype=int))  # ceil(16 * (12.5 - 5)) = 120
    at30 = sample_frames(frames, fps=30.0, count=81, seconds=5)[:, 0, 0, 0]
    assert np.array_equal(at30, np.linspace(0, 149, 81, dtype=int))
    with pytest.raises(ValueError, match="at least 5"):
        sample_frames(frames[:40], fps=16.0, count=81, seconds=5)


def test_the_last_5_s_window_starts_at_the_official_ceil_at_any_rate():
    """Interact reads the last 5 s: the official get_clip starts at ceil(fps * start). At 29.97 fps a 160-frame video
    lasts 5.3387 s, its window starts at 0.3387 s: ceil(10.15) = 11 (truncating gives 10)."""
    frames = np.arange(160)[:, None, None, None] * np.ones((1, 1, 1, 3), dtype=np.int64)
    tail = sample_frames(frames, fps=29.97, count=81, seconds=5, from_end=True)[:, 0, 0, 0]
    assert tail[0] == 11 and np.array_equal(tail, np.linspace(11, 159, 81, dtype=int))


@pytest.mark.parametrize("fps", [16.0, 24.0, 25.0, 29.97, 30000 / 1001, 30.0, 60.0])
def test_a_window_from_the_end_ends_at_the_last_frame_at_every_length(fps):
    """The official get_clip ends at min(ceil(fps * end), total): for the last seconds, fps * (total / fps) is total
    in exact arithmetic but a float above it at some lengths (248 frames at 30 fps, 218 at 25), whose ceil alone
    would shift every pick one frame and ask for a frame past the end (a valid video refused)."""
    from infinitystar.video_io import clip_indices, whole_clip_indices

    for total in range(int(5 * fps) + 1, 1500):
        tail = clip_indices(total, fps, 81, 5.0, from_end=True)
        assert tail[-1] == total - 1, (total, fps)
        assert whole_clip_indices(total, fps, 80, last=1)[-1] == total - 1, (total, fps)


def test_write_mp4_converts_float_frames_one_at_a_time(tmp_path):
    """A long float video is written without a whole converted copy (the CLI's 40 s at 720p is 7 GB as float32):
    the memory write_mp4 takes stays about one frame, and the file equals the one written from uint8 frames."""
    import tracemalloc

    frames = np.random.default_rng(0).random((60, 64, 96, 3), dtype=np.float32)
    write_mp4(tmp_path / "u8.mp4", to_uint8(frames))
    tracemalloc.start()
    try:
        write_mp4(tmp_path / "f32.mp4", frames)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < frames.nbytes / 10, f"peak {peak / frames[0].nbytes:.1f} frames"
    assert np.array_equal(read_video(tmp_path / "f32.mp4")[0], read_video(tmp_path / "u8.mp4")[0])


def test_float_frames_are_truncated_not_rounded_like_the_official_writer():
    """The official post-processing multiplies by 255 and casts to uint8 (truncation): 0.5 -> 127 (127.5),
    0.999 -> 254 (254.7), 1.0 -> 255; values outside [0, 1] clip."""
    levels = to_uint8(np.array([[[[0.5, 0.999, 1.0]], [[-0.2, 1.7, 0.0]]]], dtype=np.float32))
    assert levels.dtype == np.uint8 and levels.reshape(-1).tolist() == [127, 254, 255, 0, 255, 0]


def test_whole_clip_indices_encode_every_whole_clip_at_the_model_rate():
    """Encode's picks: one frame is an image; otherwise every whole 5 s clip of the video (at its own fps) as the
    official V2V reader picks 1 + 80k frames over the first 5k seconds; shorter than 5 s gives nothing."""
    from infinitystar.video_io import whole_clip_indices

    assert whole_clip_indices(1, 16.0, 80).tolist() == [0]
    assert len(whole_clip_indices(79, 16.0, 80)) == 0 and len(whole_clip_indices(149, 30.0, 80)) == 0
    assert np.array_equal(whole_clip_indices(80, 16.0, 80), np.linspace(0, 79, 81, dtype=int))  # exactly 5 s
    assert np.array_equal(whole_clip_indices(100, 16.0, 80), np.linspace(0, 79, 81, dtype=int))  # 6.25 s: 1 clip
    ten = whole_clip_indices(310, 30.0, 80)  # 10.3 s at 30 fps: 2 clips over the first 10 s, 161 frames
    assert np.array_equal(ten, np.linspace(0, 299, 161, dtype=int)) and ten[-1] == 299
    assert np.array_equal(whole_clip_indices(150, 29.97, 80), np.linspace(0, 149, 81, dtype=int))
    # a declared rate below 1 fps is refused before anything is picked (1/10000 fps: 3 frames -> 480,001 picks)
    for fps in (1e-4, 0.0, -16.0, float("nan")):
        with pytest.raises(ValueError, match="is not a video's"):
            whole_clip_indices(3, fps, 80)
    assert len(whole_clip_indices(5, 1.0, 80)) == 81  # 1 fps is a (slow) video's rate
    assert len(whole_clip_indices(100, 8.0, 80)) == 161 and whole_clip_indices(100, 8.0, 80)[-1] == 79  # 12.5 s


def test_a_file_s_frames_are_counted_once_per_version(tmp_path, monkeypatch):
    """The packet count (seconds for a long video) is kept for a path while the file stays the same; a rewritten
    file is counted again, a file-like object every time, and an error is raised each time."""
    import io

    from infinitystar import video_io

    counted = []
    real = video_io._count_frames
    monkeypatch.setattr(video_io, "_count_frames", lambda source: counted.append(source) or real(source))
    path = video_io.write_mp4(tmp_path / "count_me.mp4", np.zeros((20, 16, 16, 3), np.uint8), fps=16)
    assert video_io.video_frame_count(path) == video_io.video_frame_count(str(path)) == (20, 16.0)
    assert len(counted) == 1
    video_io.write_mp4(path, np.zeros((30, 16, 16, 3), np.uint8), fps=16)
    assert video_io.video_frame_count(path) == (30, 16.0) and len(counted) == 2
    import os
    import time

    stat, data = path.stat(), path.read_bytes()
    time.sleep(0.02)
    with open(path, "r+b") as f:  # rewritten in place, its size and modification time put back (cp -p, unzip)
        f.write(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_size == stat.st_size
    assert video_io.video_frame_count(path) == (30, 16.0) and len(counted) == 3  # its change time moved
    data = path.read_bytes()
    for _ in range(2):
        assert video_io.video_frame_count(io.BytesIO(data)) == (30, 16.0)
    assert len(counted) == 5
    path.write_bytes(b"not a video" * 50)
    for _ in range(2):
        with pytest.raises(ValueError, match="not a video FFmpeg can read"):
            video_io.video_frame_count(path)
    assert len(counted) == 7


def test_the_last_clips_end_at_the_video_s_last_frame():
    """Encode's keep = last 5 s / 10 s, the CLI's --last: the official get_clip window over the video's last 5k
    seconds (linspace(ceil(fps * (duration - 5k)), total - 1, 1 + 80k), as the interact script reads its reference),
    at most as many clips as the video holds; an image stays one frame."""
    from infinitystar.video_io import whole_clip_indices

    twelve = whole_clip_indices(200, 16.0, 80, last=1)  # 12.5 s at 16 fps: the window starts at 7.5 s = frame 120
    assert np.array_equal(twelve, np.linspace(120, 199, 81, dtype=int)) and twelve[-1] == 199
    minute = whole_clip_indices(1800, 30.0, 80, last=2)  # 60 s at 30 fps: 161 frames over its last 10 s
    assert np.array_equal(minute, np.linspace(1500, 1799, 161, dtype=int))
    assert len(whole_clip_indices(1800, 30.0, 80)) == 1 + 80 * 12  # without it: every whole clip, from the start
    seven = whole_clip_indices(210, 30.0, 80, last=2)  # 7 s hold one whole clip: its last 5 s, from 2 s
    assert np.array_equal(seven, np.linspace(60, 209, 81, dtype=int))
    assert np.array_equal(whole_clip_indices(80, 16.0, 80, last=1), whole_clip_indices(80, 16.0, 80))  # exactly 5 s
    assert whole_clip_indices(1, 16.0, 80, last=1).tolist() == [0] and len(whole_clip_indices(79, 16.0, 80, last=1)) == 0
    with pytest.raises(ValueError, match="at least 1 clip"):
        whole_clip_indices(200, 16.0, 80, last=0)


def test_a_video_slower_than_the_model_rate_is_said_to_repeat_frames(caplog):
    """8 fps read at the model's 16: 81 picks over 40 frames, so 41 of them repeat the frame before; at 16 fps and
    above nothing is said (16 fps repeats only the official reader's first frame)."""
    from infinitystar.video_io import clip_indices

    with caplog.at_level("WARNING", logger="infinitystar.video_io"):
        picks = clip_indices(40, 8.0, 81, 5)
    assert len(set(picks.tolist())) == 40
    assert "runs at 8 fps, below the model's 16: 41 of the 81 frames picked repeat" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="infinitystar.video_io"):
        clip_indices(80, 16.0, 81, 5)
        clip_indices(150, 30.0, 81, 5)
        clip_indices(160, 16.0, 161, 10)
    assert caplog.text == ""


def test_cropped_share_is_what_cover_and_center_crop_cut():
    """Checked on the transform itself: a 128x96 picture fitted to 128x80 loses 16 of its 96 rows (1 - 80/96); with
    those 16 rows dark (8 at the top, 8 at the bottom), what the transform keeps is all bright."""
    from infinitystar.vae import cropped_share, prepare_image

    assert cropped_share(480, 640, 480, 848) == pytest.approx(1 - (480 / 848) / (480 / 640))
    assert cropped_share(720, 1280, 480, 848) < 0.01 and cropped_share(64, 64, 64, 64) == 0
    image = np.zeros((96, 128, 3), dtype=np.uint8)  # 4:3; cover at 128x80 (16:10) keeps rows 8..87
    image[8:88] = 255
    out = prepare_image(image, 80, 128)[0, :, 0]
    kept_white = float((out > 0.99).float().mean())
    assert cropped_share(96, 128, 80, 128) == pytest.approx(1 - 80 / 96)
    assert kept_white > 0.97  # the crop removed exactly the dark bands the share counts


def test_read_video_clip_decodes_only_what_it_keeps(tmp_path):
    """The same frames as reading the whole file and picking, from a file longer than what is kept."""
    from infinitystar.video_io import read_video_clip, video_frame_count

    frames = (np.arange(100)[:, None, None, None] * 2 * np.ones((1, 32, 48, 3))).astype(np.uint8)
    path = write_mp4(tmp_path / "long.mp4", frames, fps=16)
    assert video_frame_count(path) == (100, 16.0)
    whole, _ = read_video(path)
    for from_end in (False, True):
        clip, fps = read_video_clip(path, 81, 5, from_end=from_end)
        assert fps == 16.0 and np.array_equal(clip, sample_frames(whole, 16.0, 81, 5, from_end=from_end))


def test_an_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    """Ctrl-C (or an error) while the mp4 is being written: nothing under the name asked for, no temporary file,
    and an earlier file of that name is kept; write errors name the path."""
    real, calls = av.VideoFrame.from_ndarray, []

    def interrupt_at_the_third_frame(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    try:
        monkeypatch.setattr(av.VideoFrame, "from_ndarray", interrupt_at_the_third_frame)
    except TypeError:  # PyAV 14's compiled VideoFrame takes no attributes
        pytest.skip(f"PyAV {av.__version__}'s VideoFrame cannot be patched to interrupt a write")
    with pytest.raises(KeyboardInterrupt):
        write_mp4(tmp_path / "a.mp4", _frames(9, 48, 64))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(av.VideoFrame, "from_ndarray", real)
    kept = write_png(tmp_path / "b.png", _frames(1, 16, 16)).read_bytes()
    from PIL import Image

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(OSError, match="cannot write .*b.png: No space left on device"):
        write_png(tmp_path / "b.png", _frames(1, 16, 16, seed=1))
    assert (tmp_path / "b.png").read_bytes() == kept and sorted(p.name for p in tmp_path.iterdir()) == ["b.png"]


def test_a_symlinked_output_is_written_through(tmp_path):
    """--out link.mp4 where link.mp4 points elsewhere: the target gets the new video, the link stays a link, and
    the target's permissions are kept."""
    target = tmp_path / "real" / "clip.mp4"
    target.parent.mkdir()
    target.write_bytes(b"old")
    target.chmod(0o640)
    (tmp_path / "link.mp4").symlink_to(target)
    write_mp4(tmp_path / "link.mp4", _frames(3, 16, 16))
    assert (tmp_path / "link.mp4").is_symlink() and read_video(target)[0].shape == (3, 16, 16, 3)
    assert target.stat().st_mode & 0o777 == 0o640


def test_new_files_get_the_umask_mode_not_safetensors_0600(tmp_path):
    """safetensors creates files 0600; tokens files and tiny shards are written through ``written_whole`` and get
    what ``open()`` would give under the user's umask."""
    import os

    import torch
    from safetensors.torch import save_file

    from infinitystar.tiny import write_sharded_safetensors
    from infinitystar.video_io import written_whole

    old = os.umask(0o027)
    try:
        with written_whole(tmp_path / "tokens.safetensors") as part:
            save_file({"a": torch.zeros(2)}, str(part))
        write_sharded_safetensors(tmp_path / "shards", {"w": torch.zeros(4), "b": torch.ones(4)}, shards=2)
        write_png(tmp_path / "a.png", _frames(1, 16, 16))
    finally:
        os.umask(old)
    written = [tmp_path / "tokens.safetensors", tmp_path / "a.png", *sorted((tmp_path / "shards").glob("*.safetensors"))]
    assert len(written) == 4
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: "0o640" for p in written}


def test_damaged_or_misnamed_image_inputs_name_the_path(tmp_path):
    png = write_png(tmp_path / "a.png", _frames(1, 64, 64))
    cut = tmp_path / "cut.png"
    cut.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])
    with pytest.raises(ValueError, match="cut.png: the image cannot be read"):
        read_image(cut)
    with pytest.raises(ValueError, match="is a folder; give the image file"):
        read_image(tmp_path)
    with pytest.raises(ValueError, match="is a folder; give the video file"):
        read_video(tmp_path)


def test_read_frames_equals_decoding_everything_and_indexing(tmp_path):
    """Any ascending picks (repeats as the official reader makes them at low rates, gaps, the last frame) from a
    path or from a BytesIO are the frames the whole decode gives at those indices."""
    import io

    from infinitystar.video_io import clip_indices, read_frames, whole_clip_indices

    path = write_mp4(tmp_path / "v.mp4", distinct_frames(100), fps=20)
    whole, fps = read_video(path)
    buffer = io.BytesIO(path.read_bytes())
    picks = [np.array([0, 0, 1, 5, 5, 5, 50, 99]), whole_clip_indices(100, fps, 80),
             clip_indices(100, fps, 81, 5, from_end=True), np.array([42])]
    for index in picks:
        for source in (path, str(path), buffer):
            got = read_frames(source, index, 100)
            assert got.dtype == np.uint8 and np.array_equal(got, whole[index]), (index, type(source))
    assert buffer.tell() > 0 and np.array_equal(read_frames(buffer, [3]), whole[[3]])  # rewound before reading


def test_read_frames_refuses_what_it_cannot_give(tmp_path):
    from infinitystar.video_io import read_frames

    path = write_mp4(tmp_path / "v.mp4", distinct_frames(10), fps=16)
    with pytest.raises(ValueError, match=r"frame 10 of the 12 the container lists could not be decoded"):
        read_frames(path, [2, 10], 12)
    with pytest.raises(ValueError, match="ascending"):
        read_frames(path, [5, 2])
    with pytest.raises(ValueError, match="not negative"):
        read_frames(path, [-1, 2])
    with pytest.raises(ValueError, match="no frames"):
        read_frames(path, [])


def test_frame_count_of_a_file_like_video(tmp_path):
    import io

    from infinitystar.video_io import video_frame_count

    path = write_mp4(tmp_path / "v.mp4", distinct_frames(37), fps=24)
    assert video_frame_count(io.BytesIO(path.read_bytes())) == (37, 24.0)
    with pytest.raises(ValueError, match="the video: not a video FFmpeg can read"):
        video_frame_count(io.BytesIO(b"not a video at all" * 100))


def test_read_frames_holds_only_the_picks(tmp_path):
    """Peak Python/numpy memory while reading 9 frames of 120 is about those 9 frames, far below the video."""
    import tracemalloc

    from infinitystar.video_io import read_frames

    h, w = 192, 256
    path = write_mp4(tmp_path / "v.mp4", distinct_frames(120, h, w), fps=30)
    index = np.linspace(0, 119, 9, dtype=int)
    frame = h * w * 3
    tracemalloc.start()
    try:
        got = read_frames(path, index)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.shape == (9, h, w, 3)
    assert peak < (len(index) + 4) * frame, peak / frame  # the picks and a few frames in flight
    assert peak < 120 * frame / 5


def test_frame_count_is_what_decodes_not_what_a_trimmed_header_lists(tmp_path):
    """A stream-copied trim lists 120 samples but decodes 110: the count (and so the picks and the last frame) is
    the decoded one, as ComfyUI's own decode gives it."""
    from infinitystar.video_io import read_frames, video_frame_count

    path = write_mp4(tmp_path / "v.mp4", distinct_frames(120), fps=16)
    trimmed = remux_shifted(path, tmp_path / "trim.mp4", 10, 16)
    try:
        with av.open(str(trimmed)) as container:
            listed = container.streams.video[0].frames
            decoded = sum(1 for _ in container.decode(video=0))
    except av.error.InvalidDataError:  # PyAV 14's remux drops what its decoder needs
        pytest.skip(f"PyAV {av.__version__} cannot write the trimmed fixture")
    assert listed > decoded  # the case: the header lists the dropped samples
    assert video_frame_count(trimmed)[0] == decoded
    whole, _ = read_video(trimmed)
    assert np.array_equal(read_frames(trimmed, [decoded - 1], decoded), whole[[decoded - 1]])


def test_frames_are_turned_upright_by_the_display_rotation(tmp_path):
    from infinitystar.video_io import read_frames

    frames = np.zeros((3, 32, 48, 3), dtype=np.uint8)
    frames[:, :, 24:] = 255  # dark left half, bright right half
    turned = rotated(write_mp4(tmp_path / "v.mp4", frames, fps=16), tmp_path / "turned.mp4")
    with av.open(str(turned)) as container:
        frame = next(container.decode(video=0))
        rotation = getattr(frame, "rotation", None)
        stored = frame.to_ndarray(format="rgb24")
    if not rotation:
        pytest.skip("this PyAV does not report the display rotation")
    got = read_frames(turned, [0])[0]
    assert stored.shape == (32, 48, 3) and got.shape == (48, 32, 3)
    assert np.array_equal(got, np.rot90(stored, k=round(rotation / 90) % 4))
    top, bottom = got[:24].mean(), got[24:].mean()  # -90: a clockwise turn brings the left half to the top
    assert (top < bottom) if rotation == -90 else (top > bottom)


def test_a_finished_file_that_cannot_take_its_name_is_kept(tmp_path, monkeypatch):
    """Windows refuses to replace a file another program holds open (the last out.mp4 in a player) and, for a
    moment, one an antivirus scans: the replace is retried, and a finished file that still cannot take its name is
    kept under a free one that the error names, never deleted after a long run."""
    import os

    from infinitystar import video_io

    monkeypatch.setattr(video_io, "REPLACE_WAIT_S", 0)
    real, calls = os.replace, []

    def refused(n):
        def replace(src, dst):
            calls.append(dst)
            if len(calls) <= n:
                raise PermissionError(13, "Access is denied")
            return real(src, dst)
        return replace

    out = tmp_path / "out.mp4"
    out.write_bytes(b"old")
    monkeypatch.setattr(video_io.os, "replace", refused(3))  # a scanner lets go after three tries
    with video_io.written_whole(out) as part:
        part.write_bytes(b"new")
    assert out.read_bytes() == b"new" and len(calls) == 4

    calls.clear()
    monkeypatch.setattr(video_io.os, "replace", refused(10**6))  # held open for good
    with pytest.raises(OSError, match=r"cannot write .*out.mp4: .*open in another program.*kept as .*out \(1\).mp4"):
        with video_io.written_whole(out) as part:
            part.write_bytes(b"newer")
    assert len(calls) == video_io.REPLACE_TRIES
    assert out.read_bytes() == b"new" and (tmp_path / "out (1).mp4").read_bytes() == b"newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out (1).mp4", "out.mp4"]


def test_ctrl_c_while_the_name_is_retried_keeps_the_finished_file_visible(tmp_path, monkeypatch, caplog):
    """Kept under a free visible name, said; where even that fails, kept hidden with the hint to rename it."""
    from infinitystar import video_io

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(video_io.os, "replace", interrupted)
    with caplog.at_level("WARNING", logger="infinitystar.video_io"), pytest.raises(KeyboardInterrupt):
        with video_io.written_whole(tmp_path / "out.mp4") as part:
            part.write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out (1).mp4"]
    assert "kept as" in caplog.text and "out (1).mp4" in caplog.text and "rename it" not in caplog.text

    caplog.clear()
    monkeypatch.setattr(video_io.os, "rename", lambda *a: (_ for _ in ()).throw(OSError(5, "Input/output error")))
    with caplog.at_level("WARNING", logger="infinitystar.video_io"), pytest.raises(KeyboardInterrupt):
        with video_io.written_whole(tmp_path / "out.mp4") as part:
            part.write_bytes(b"new")
    assert part.is_file() and f"kept as {part} (rename it: hidden temporaries are removed after a day)" in caplog.text


def test_a_mode_the_file_system_cannot_hold_does_not_fail_the_write(tmp_path, monkeypatch):
    """FAT / exFAT drives and some network mounts refuse to change a file's mode: the file is written all the same;
    a replace that fails otherwise than by a refusal does not blame another program."""
    from pathlib import Path

    from infinitystar import video_io

    def refused(self, mode, **kw):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(Path, "chmod", refused)
    monkeypatch.setattr(video_io.shutil, "copymode", lambda *a, **k: refused(None, 0))
    out = tmp_path / "out.mp4"
    for content in (b"new", b"newer"):  # a new file, then over an existing one
        with video_io.written_whole(out) as part:
            part.write_bytes(content)
        assert out.read_bytes() == content

    def gone(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(video_io.os, "replace", gone)
    with pytest.raises(OSError, match=r"Input/output error; the finished file is kept") as err:
        with video_io.written_whole(out) as part:
            part.write_bytes(b"newest")
    assert "another program" not in str(err.value)
    assert "rename it" not in str(err.value)  # kept under a visible free name

    monkeypatch.setattr(video_io.os, "rename", gone)  # not even a free name: it stays hidden, and the user is told
    with pytest.raises(OSError, match=r"kept as .*\.part \(rename it: hidden temporaries are removed after a day\)"):
        with video_io.written_whole(out) as part:
            part.write_bytes(b"newest")


def test_an_error_while_writing_stays_the_error_when_the_partial_file_cannot_go(tmp_path, monkeypatch):
    """A partial file still open (Windows) cannot be removed; the error that stopped the write is what the user sees
    (Ctrl-C stays an interrupt), not the failed clean-up."""
    from pathlib import Path

    from infinitystar import video_io

    with pytest.raises(KeyboardInterrupt):
        with video_io.written_whole(tmp_path / "a.bin") as part:
            part.write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []  # removed where it can be

    def held(self, missing_ok=False):
        raise PermissionError(32, "The process cannot access the file because it is being used by another process")

    monkeypatch.setattr(Path, "unlink", held)
    with pytest.raises(KeyboardInterrupt):
        with video_io.written_whole(tmp_path / "b.bin") as part:
            part.write_bytes(b"half")
            raise KeyboardInterrupt
    assert not (tmp_path / "b.bin").exists()


def test_a_full_disk_in_safetensors_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
    """safetensors reports a failed write as its own SafetensorError (no OSError): written_whole gives it the path and
    leaves nothing behind, so callers that handle OSError (the CLI, the nodes' messages) say what happened."""
    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    from infinitystar.pipeline import Tokens
    from infinitystar.video_io import written_whole

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    tokens = Tokens([torch.zeros(1, 1, 1, 1, 4, dtype=torch.uint8)], torch.zeros(1, 64, 1, 1, 1), "0.06M", 1.0, 1, 0)
    with pytest.raises(OSError, match=r"cannot write .*t\.safetensors: No space left on device") as err:
        tokens.save(tmp_path / "t.safetensors")
    assert isinstance(err.value.__cause__, SafetensorError)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="not an I/O"):  # other errors pass through as they are
        with written_whole(tmp_path / "x.bin") as part:
            part.write_bytes(b"x")
            raise ValueError("not an I/O error")
    assert list(tmp_path.iterdir()) == []


def test_temporaries_a_killed_writer_left_are_removed_a_day_later(tmp_path):
    """A hard kill leaves written_whole's hidden temporary; the next write into the folder removes ours once a day old,
    and leaves fresh ones (a writer in progress) and other programs' .part files alone."""
    import os
    import time

    from infinitystar import video_io

    with video_io.written_whole(tmp_path / "probe.mp4") as part:  # the name a killed writer would have left
        left = part.name
        part.write_bytes(b"x")
    day_old = time.time() - video_io.STALE_PART_S - 60
    stale, fresh = tmp_path / left.replace("probe", "stale"), tmp_path / left.replace("probe", "fresh")
    others = [tmp_path / ".firefox.mp4.part", tmp_path / "video.mp4.part", tmp_path / ".a.mp4.12-notours.part"]
    for f in (stale, fresh, *others):
        f.write_bytes(b"partial")
        if f is not fresh:
            os.utime(f, (day_old, day_old))
    with video_io.written_whole(tmp_path / "next.mp4") as part:
        part.write_bytes(b"y")
    assert not stale.exists()
    assert fresh.exists() and all(f.exists() for f in others)
    assert (tmp_path / "next.mp4").read_bytes() == b"y" and (tmp_path / "probe.mp4").read_bytes() == b"x"


def test_a_file_rewritten_within_one_timestamp_tick_is_counted_again_by_its_size(tmp_path, monkeypatch):
    """On a file system with coarse times (FAT / exFAT: 2 s for modification, no change time), a video replaced
    by a longer one within one tick keeps its times: the size in the cache key still tells them apart."""
    import os

    from infinitystar import video_io

    counted, real_count, real_stat = [], video_io._count_frames, os.stat
    monkeypatch.setattr(video_io, "_count_frames", lambda source: counted.append(source) or real_count(source))

    def coarse(path, *a, **k):  # what such a disk reports: the same times whatever was written
        st = real_stat(path, *a, **k)
        return os.stat_result(tuple(st), {"st_atime_ns": 0, "st_mtime_ns": 0, "st_ctime_ns": 0})

    monkeypatch.setattr(video_io.os, "stat", coarse)
    path = tmp_path / "coarse.mp4"
    video_io.write_mp4(path, np.zeros((20, 16, 16, 3), np.uint8), fps=16)
    assert video_io.video_frame_count(path) == video_io.video_frame_count(path) == (20, 16.0) and len(counted) == 1
    longer = video_io.write_mp4(tmp_path / "longer.mp4", np.zeros((30, 16, 16, 3), np.uint8), fps=16)
    inode = path.stat().st_ino
    with open(path, "r+b") as f:  # rewritten in place: same name, folder entry and (reported) times
        f.write(longer.read_bytes())
        f.truncate()
    assert path.stat().st_ino == inode and path.stat().st_size == longer.stat().st_size
    assert video_io.video_frame_count(path) == (30, 16.0) and len(counted) == 2
