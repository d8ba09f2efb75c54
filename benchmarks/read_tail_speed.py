"""Time to read the last 5 s of a long video: the 81 frames Interact Start, Encode (keep = last 5 s) and the CLI's
--last pick, decoded from the keyframe before them (what the pack does) vs from the video's first frame.

Writes a synthetic mp4 (default 2 minutes of 720p30, x264 with its default keyframe interval), then times, after
one warm-up read of the file (so both rows read it from the page cache):

- ``count``: the packet count and frame times (:func:`video_frame_count`, no decode);
- ``seek``: ``read_frames`` of the last 5 s (a seek to the keyframe before them);
- ``from start``: the same picks decoded from the first frame (the reader before seeking).

    python benchmarks/read_tail_speed.py [--seconds 600 --height 2160 --width 3840] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # run from a checkout without installing

from encode_frames_memory import add_source_args, source_video  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="source video length (default 120)")
    add_source_args(parser, 720, 1280)
    args = parser.parse_args()

    import numpy as np

    from infinitystar import video_io

    with source_video(args, args.seconds) as path:
        path.read_bytes()  # warm the page cache: both rows read the file from memory
        start = time.perf_counter()
        total, fps = video_io.video_frame_count(path)
        counted = time.perf_counter() - start
        index = video_io.clip_indices(total, fps, 81, 5.0, from_end=True)
        start = time.perf_counter()
        sought = video_io.read_frames(path, index, total)
        seek_s = time.perf_counter() - start
        start = time.perf_counter()
        whole = video_io._read_picks(path, index, total, None, None)
        start_s = time.perf_counter() - start
        if not np.array_equal(sought, whole):
            raise SystemExit("the frames read after a seek differ from those decoded from the start")
        print(f"source: {args.width}x{args.height}, {total} frames at {fps:g} fps ({total / fps:.0f} s, "
              f"{path.stat().st_size / 1e6:.0f} MB); the last 5 s: frames {index[0]}..{index[-1]}, 81 picked")
        print(f"{'read':12s} {'seconds':>8s}")
        for name, seconds in (("count", counted), ("seek", seek_s), ("from start", start_s)):
            print(f"{name:12s} {seconds:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
