"""A video cut short (an unfinished download or recording, its index written first): its container lists a few
frames whose data is missing or partial. Picks from its end (Interact Start, Encode's keep, --last) end at its
last decodable frame, with a warning; picks from its start are unaffected; more than a second lost is refused."""
import logging

import numpy as np
import pytest
from video_files import cut_short, decodable

from infinitystar.video_io import (
    DecodeStopped,
    clip_indices,
    read_frames,
    read_video_clip,
    video_frame_count,
    whole_clip_indices,
    write_mp4,
)

FPS = 30


def _frames(count: int) -> np.ndarray:
    """``count`` frames that all differ (a strip sliding over noise), 48x64."""
    base = np.repeat(np.repeat(np.random.default_rng(2).integers(0, 255, (6, 8 + count, 3)), 8, 0), 8, 1)
    return np.stack([base[:, 8 * i:8 * i + 64] for i in range(count)]).astype(np.uint8)


@pytest.fixture()
def cut(tmp_path):
    """An 8 s 30 fps mp4 whose every frame differs, cut to 90% of its bytes."""
    path = cut_short(write_mp4(tmp_path / "whole.mp4", _frames(8 * FPS), fps=FPS), tmp_path / "cut.mp4")
    good = decodable(path)
    listed, fps = video_frame_count(path)
    assert fps == FPS and 6 * FPS < len(good) < listed, (len(good), listed)  # what the tests below stand on
    return path, good, listed


def test_the_last_seconds_of_a_cut_file_end_at_its_last_decodable_frame(cut, caplog):
    path, good, listed = cut
    want = good[clip_indices(len(good), FPS, 81, 5.0, from_end=True)]
    with caplog.at_level(logging.WARNING, logger="infinitystar.video_io"):
        got, fps = read_video_clip(path, 81, 5.0, from_end=True)
    assert fps == FPS and np.array_equal(got, want)
    lost = listed - len(good)
    assert f"its last {lost} of the {listed} frames it lists cannot be decoded" in caplog.text
    assert f"as if it ended at frame {len(good) - 1}" in caplog.text

    def last_clip(n):  # Encode's keep = last 5 s
        return whole_clip_indices(n, FPS, 80, last=1)

    assert np.array_equal(read_frames(path, last_clip(listed), listed, repick=last_clip), good[last_clip(len(good))])


def test_picks_from_the_start_of_a_cut_file_read_as_before(cut):
    path, good, _ = cut
    got, _ = read_video_clip(path, 81, 5.0)
    assert np.array_equal(got, good[clip_indices(len(good), FPS, 81, 5.0)])


def test_without_a_repick_or_with_more_than_a_second_lost_a_cut_file_is_refused(cut):
    """read_frames without ``repick`` (picks not from the end) refuses as damaged; so it does when the frames that
    cannot be decoded are more than a second (a container listing 40 more frames than decode)."""
    path, good, listed = cut

    def tail(n):
        return clip_indices(n, FPS, 81, 5.0, from_end=True)

    with pytest.raises(DecodeStopped, match="cut.mp4: .*damaged") as stopped:
        read_frames(path, tail(listed), listed)
    assert stopped.value.decoded == len(good)
    with pytest.raises(DecodeStopped, match="damaged"):
        read_frames(path, tail(len(good) + 40), len(good) + 40, repick=tail)
    assert np.array_equal(read_frames(path, tail(len(good) + 20), len(good) + 20, repick=tail), good[tail(len(good))])


def test_a_window_that_no_longer_fits_is_refused(tmp_path):
    """A cut file whose decodable frames are shorter than the window asked for: refused, not a shorter window."""
    path = cut_short(write_mp4(tmp_path / "whole.mp4", _frames(5 * FPS + 1), fps=FPS), tmp_path / "cut.mp4", 0.999)
    listed, _ = video_frame_count(path)
    good = decodable(path)
    if not len(good) < 5 * FPS <= listed:
        pytest.skip(f"the cut left {listed} listed and {len(good)} decodable frames; the test needs 5 s between them")
    with pytest.raises(DecodeStopped, match="damaged"):
        read_video_clip(path, 81, 5.0, from_end=True)
