"""Checks of the command line's inputs, made before anything loads: a mistake found after minutes of loading and
sampling (or after the decode) wastes the run, so values, combinations and output paths are refused up front."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed's range, as the nodes' seed widgets
VIDEO_SUFFIX, IMAGE_SUFFIX = ".mp4", ".png"


def temperature(text: str) -> float:
    """argparse type of the tau options: a finite number above 0 (logits are multiplied by 1/tau)."""
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not above 0 (the official temperatures are 1.0 and 0.4)")
    return value


def guidance_scale(text: str) -> float:
    """argparse type of --cfg: a finite number ≥ 0 (1 = the prompt alone, no guidance)."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is below 0 (official: APG 34; interact: plain CFG 3)")
    return value


def seed(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{text} is outside 0 … {SEED_MAX} (2^64 - 1)")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def output_path(path: str, is_image: bool, is_default: bool) -> str:
    """The file the run writes: .mp4 for videos, .png for an image. A name without a suffix gets it, the default
    name follows the output kind, and another suffix is refused (the CLI writes no other format)."""
    target = Path(path)
    suffix = IMAGE_SUFFIX if is_image else VIDEO_SUFFIX
    check_writable(path, "--out")  # a folder is refused before a suffix is added to its name
    if target.suffix.lower() == suffix:
        return path
    if is_default or not target.suffix:
        return str(target.with_suffix(suffix) if is_default else target.with_name(target.name + suffix))
    kind = "an image (--duration 0)" if is_image else "a video"
    raise ValueError(f"--out {path}: this run writes {kind} as {suffix}; name the file {target.with_suffix(suffix)}")


def check_outputs(out: str | None, save_tokens: str | None) -> None:
    """Refuse outputs that cannot be written, before the run: folders, unwritable places, one file for both."""
    for path, option in ((out, "--out"), (save_tokens, "--save-tokens")):
        check_writable(path, option)
    if out and save_tokens and Path(out).resolve() == Path(save_tokens).resolve():
        raise ValueError(f"--out and --save-tokens are the same file ({out}); the video would replace the tokens. "
                         "Give the tokens a name of their own (e.g. tokens.safetensors)")


def check_writable(path: str | None, option: str) -> None:
    """Refuse an output that cannot be written. Creates nothing: the missing folders are made when the file is."""
    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name (e.g. {target / 'out.mp4'})")
    folder = target.parent.absolute()
    while not folder.exists():  # the nearest folder that exists decides whether the rest can be made
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: {folder} is a file, not a folder; choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: the folder {folder} is not writable; choose another path")


def check_sources(args) -> None:
    """Combinations of inputs a command cannot use together."""
    command = args.command
    if command in ("extend", "interact") and getattr(args, "tokens", None) and getattr(args, "video", None):
        raise ValueError(f"{command}: --tokens and --video both given; continue saved tokens or a video, not both")
    if command == "generate":
        if args.image and args.video:
            raise ValueError("--image and --video both given: start from an image (image-to-video) or continue a "
                             "video, not both")
        if args.image and args.duration == 0:
            raise ValueError("--image with --duration 0 would only give the image back; image-to-video needs "
                             "--duration 5 (or 10 with the 480p weights)")


def device(name: str | None):
    """--device as a torch.device this PyTorch can use (default: cuda when available, else cpu)."""
    import torch

    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name PyTorch knows; use cuda, cuda:1 or cpu") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this PyTorch ({torch.__version__}) sees no CUDA GPU; use --device cpu, "
                         "or install a CUDA build of PyTorch")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: Apple's MPS is not available to this PyTorch; use --device cpu")
    if chosen.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: the CLI runs on cuda, mps or cpu")
    return chosen


def read_text(path: str, option: str) -> str:
    """A UTF-8 text file named by ``option``; errors name the file."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{option} {path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except IsADirectoryError:
        raise ValueError(f"{option} {path} is a folder; give the text file") from None
