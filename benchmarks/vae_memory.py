"""Measured vs estimated peak activation memory of the tokenizer's chunked decode and encode (CPU).

Peak = maximum over time of the bytes allocated minus freed, from torch.profiler's per-op CPU
memory records. Random weights; widths from 8 channels up to the released 96..384 at a tiny
spatial size. Used to calibrate infinitystar/vae/memory.py.

    python benchmarks/vae_memory.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from infinitystar.memory import measure_peak_bytes  # noqa: E402
from infinitystar.vae import VaeConfig, VideoTokenizer, estimate_decode_memory, estimate_encode_memory  # noqa: E402


def peak_bytes(fn) -> int:
    return measure_peak_bytes(fn)[1]


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print("what      width  cells  T  chunk  measured_MB  estimate_MB  ratio")
    for chans, cells in [((8, 8, 16, 16, 16), 4), ((32,) * 5, 4), ((96, 192, 384, 384, 384), 2)]:
        cfg = VaeConfig(block_out_channels=chans)
        tok = VideoTokenizer(cfg).eval()
        for t, chunk in [(5, 2), (9, 2), (13, 2), (9, 4), (9, 9)]:
            z = torch.randn(1, 64, t, cells, cells) * 0.3
            meas = peak_bytes(lambda z=z, chunk=chunk, tok=tok: tok.decode(z, chunk_latents=chunk))
            est = estimate_decode_memory(cfg, z.shape, chunk, torch.float32)
            print(f"decode  {chans[0]:7d} {cells:6d} {t:2d} {chunk:6d} {meas / 1e6:12.2f} {est / 1e6:12.2f} {est / meas:6.2f}")
        for frames in (5, 17):
            x = torch.rand(1, 3, frames, cells * 16, cells * 16) * 2 - 1
            meas = peak_bytes(lambda x=x, tok=tok: tok.encode_posterior(x))
            est = estimate_encode_memory(cfg, x.shape, torch.float32)
            print(f"encode  {chans[0]:7d} {cells:6d} {frames:2d}      - {meas / 1e6:12.2f} {est / 1e6:12.2f} {est / meas:6.2f}")


if __name__ == "__main__":
    main()
