"""Peak host memory while loading a sharded checkpoint, relative to the loaded model's size.

Writes a mid-size transformer (≈175M parameters, ≈0.7 GB fp32) in the official sharded layout, then loads it
in a fresh subprocess per case and reports peak RSS above the post-import baseline divided by the bytes of the
loaded model. ``infinitystar.checkpoint`` targets ≤ 1.2×; the naive "read the whole shard, then
load_state_dict" path is shown for comparison.

    python benchmarks/load_memory.py [--workdir DIR] [--keep]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

CONFIG = dict(depth=12, block_chunks=3, width=1024, num_heads=8, num_kv_heads=2, mlp_hidden=4096,
              text_channels=512)
CASES = [("streamed", "fp32"), ("streamed", "bf16"), ("streamed", "fp8"), ("naive", "fp32"), ("naive", "bf16")]

CHILD = r"""
import json, sys, gc
import torch
from pathlib import Path
from safetensors.torch import load_file

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def rss():
    return status("VmRSS")

mode, dtype_name, folder = sys.argv[1], sys.argv[2], Path(sys.argv[3])
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[dtype_name]
from infinitystar.checkpoint import load_transformer
from infinitystar.config import TransformerConfig
from infinitystar.transformer import InfinityStarTransformer
gc.collect()
base = rss()
if mode == "streamed":
    model, _ = load_transformer(folder, dtype=None if dtype == torch.float32 else dtype)
else:
    config = TransformerConfig(**json.loads(sys.argv[4]))
    model = InfinityStarTransformer(config)
    model.block_stack.to(dtype)
    for f in sorted(folder.glob("*.safetensors")):
        sd = load_file(str(f))
        model.load_state_dict(sd, strict=False)
        del sd
size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
peak = status("VmHWM")  # not ru_maxrss: Linux carries that over from the parent across exec
print(json.dumps({"base": base, "peak": peak, "size": size}))
"""


def write_checkpoint(folder: Path) -> int:
    import torch

    from infinitystar.config import TransformerConfig
    from infinitystar.tiny import write_sharded_safetensors
    from infinitystar.transformer import InfinityStarTransformer

    model = InfinityStarTransformer(TransformerConfig(**CONFIG))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_sharded_safetensors(folder, sd, shards=4)
    return sum(p.numel() for p in sd.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="where to write the checkpoint (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="infinitystar-bench-"))
    folder = work / "infinitystar_8b_720p_weights"
    params = write_checkpoint(folder)
    print(f"checkpoint: {params / 1e6:.0f}M parameters, 4 fp32 shards, {folder}")
    print(f"{'loader':10s} {'dtype':5s} {'model MB':>9s} {'peak-base MB':>13s} {'ratio':>6s}")
    try:
        for mode, dtype in CASES:
            out = subprocess.run([sys.executable, "-c", CHILD, mode, dtype, str(folder), json.dumps(CONFIG)],
                                 capture_output=True, text=True, check=True, cwd=REPO,
                                 env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
            r = json.loads(out.stdout.strip().splitlines()[-1])
            delta = r["peak"] - r["base"]
            print(f"{mode:10s} {dtype:5s} {r['size'] / 2**20:9.0f} {delta / 2**20:13.0f} {delta / r['size']:6.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(folder if args.workdir else work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
