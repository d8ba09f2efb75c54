"""mp4/PNG round trips through PyAV and Pillow."""
import av
import numpy as np
import pytest

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


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "missing.mp4")
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "missing.png")


def test_sample_frames_spans_requested_seconds():
    frames = np.arange(200)[:, None, None, None] * np.ones((1, 2, 2, 3), dtype=np.int64)
    picked = sample_frames(frames, fps=16.0, count=81, seconds=5)
    assert len(picked) == 81 and picked[0, 0, 0, 0] == 0 and picked[-1, 0, 0, 0] == 80
    own = sample_frames(frames[:81], fps=16.0, count=81, seconds=5)  # an 81-frame 16 fps clip is kept as is
    assert np.array_equal(own[:, 0, 0, 0], np.arange(81))
    with pytest.raises(ValueError, match="at least 5"):
        sample_frames(frames[:40], fps=16.0, count=81, seconds=5)
