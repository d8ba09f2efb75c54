"""Peak host memory of a video encode's pixels: the frames it picks from a file, up to the tensor the tokenizer gets.

Writes a synthetic mp4 (default 1080p, 5 s at 30 fps), then in a fresh subprocess per case picks the 81 frames the
official V2V reader takes and builds the tokenizer's input, and reports peak RSS above the post-import baseline:

- ``fitted``: what the pack does (``read_frames`` with a ``vae.FrameFit``, then ``vae.fit_video``: 8-bit pixels at
  the output's size, turned to [-1, 1] a chunk at a time inside the tokenizer);
- ``source``: the frames kept at the file's size, then the float32 tensor of the whole clip (``prepare_video``).

The tokenizer's own activations are not part of it (``vae_memory.py`` measures those).

    python benchmarks/encode_frames_memory.py [--height 2160 --width 3840] [--resolution 480p] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

CHILD = r"""
import json, sys
import numpy as np

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

mode, path, resolution = sys.argv[1], sys.argv[2], sys.argv[3]
from infinitystar.pipeline import resolve_schedule
from infinitystar.vae import FrameFit, fit_video, prepare_video
from infinitystar.video_io import read_video_clip
schedule = resolve_schedule(resolution, "16:9", 5)
base = status("VmRSS")
if mode == "fitted":
    frames, _ = read_video_clip(path, 81, 5, fit=FrameFit(lambda h, w: (schedule.height, schedule.width)))
    pixels = fit_video(frames, schedule.height, schedule.width)
else:
    frames, _ = read_video_clip(path, 81, 5)
    pixels = prepare_video(frames, schedule.height, schedule.width)
peak = status("VmHWM")  # not ru_maxrss: Linux carries that over from the parent across exec
print(json.dumps({"base": base, "peak": peak, "pixels": pixels.nelement() * pixels.element_size(),
                  "out": [schedule.height, schedule.width]}))
"""


def write_video(path: Path, height: int, width: int, seconds: float, fps: int) -> None:
    """Moving coloured blocks, every frame different; encoded frame by frame (a 4K clip is never held whole)."""
    from fractions import Fraction

    import av
    import numpy as np

    rng = np.random.default_rng(0)
    count = int(round(seconds * fps))
    tile = rng.integers(0, 256, (height // 32 + 2, width // 32 + count // 8 + 2, 3), dtype=np.uint8)
    big = tile.repeat(32, 0).repeat(32, 1)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for i in range(count):
            frame = np.ascontiguousarray(big[:height, 4 * i:4 * i + width])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def add_source_args(parser: argparse.ArgumentParser, height: int, width: int) -> None:
    """--height, --width, --fps and --workdir of a benchmark's synthetic source video."""
    parser.add_argument("--height", type=int, default=height, help=f"source video height (default {height})")
    parser.add_argument("--width", type=int, default=width, help=f"source video width (default {width})")
    parser.add_argument("--fps", type=int, default=30, help="source frame rate (default 30)")
    parser.add_argument("--workdir", help="where to write the video (default: a temp folder, removed)")


@contextlib.contextmanager
def source_video(args, seconds: float):
    """The synthetic video ``add_source_args`` describe, written once into --workdir (kept) or a temp folder
    (removed afterwards)."""
    work = Path(args.workdir or tempfile.mkdtemp(prefix="infinitystar-bench-"))
    path = work / f"source_{args.width}x{args.height}_{seconds:g}s.mp4"
    try:
        if not path.exists():
            write_video(path, args.height, args.width, seconds, args.fps)
        yield path
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_source_args(parser, 1080, 1920)
    parser.add_argument("--resolution", default="720p", help="output resolution: 720p, 480p, 0.25M, 0.06M")
    args = parser.parse_args()
    with source_video(args, 5.0) as path:
        print(f"source: {args.width}x{args.height}, 5 s at {args.fps} fps; 81 frames picked; output {args.resolution}")
        print(f"{'pixels kept':12s} {'output':>10s} {'tensor MB':>10s} {'peak-base MB':>13s}")
        for mode in ("fitted", "source"):
            out = subprocess.run([sys.executable, "-c", CHILD, mode, str(path), args.resolution],
                                 capture_output=True, text=True, check=True, cwd=REPO,
                                 env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
            r = json.loads(out.stdout.strip().splitlines()[-1])
            size = f"{r['out'][1]}x{r['out'][0]}"
            print(f"{mode:12s} {size:>10s} {r['pixels'] / 2**20:10.0f} {(r['peak'] - r['base']) / 2**20:13.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
