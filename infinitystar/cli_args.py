"""The command line's arguments: the parser, and checks of its inputs made before anything loads. A mistake found
after minutes of loading and sampling (or after the decode) wastes the run, so values, combinations and output
paths are refused up front."""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

import torch

from . import pipeline as P
from .attention import BACKENDS
from .convert import DTYPES as CONVERT_DTYPES
from .convert import TEXT_DTYPES
from .download import COMPONENTS, REPO_ID, TRANSFORMER_DIRS
from .gguf import WRITABLE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn,
          "fp8_e5m2": torch.float8_e5m2}
RESOLUTION_CHOICES = ("720p", "480p", "0.06M", "0.25M", "0.40M", "0.90M")
DEMO_PROMPT = "a red fox running through snow"
TAU_IMAGE, TAU_VIDEO = 1.0, 0.4  # the official scripts' temperatures of the image clip and of video clips

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed's range, as the nodes' seed widgets
VIDEO_SUFFIX, IMAGE_SUFFIX = ".mp4", ".png"
# Suffixes of other formats: --out x.avi is refused rather than written as x.avi.mp4; any other suffix is part of
# the name (--out take1.0 writes take1.0.mp4).
OTHER_FORMATS = {".avi", ".mov", ".mkv", ".webm", ".gif", ".m4v", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff",
                 ".mp4", ".png", ".safetensors", ".pt", ".pth", ".gguf", ".txt", ".json"}


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
        value = int(text)
    except ValueError:
        try:  # 0x10, 0b101
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


def output_path(path: str, is_image: bool, is_default: bool, kind: str | None = None) -> str:
    """The file the run writes: .mp4 for videos, .png for an image. A name without a suffix gets it, the default
    name follows the output kind, and another suffix is refused (the CLI writes no other format)."""
    target = Path(path)
    suffix = IMAGE_SUFFIX if is_image else VIDEO_SUFFIX
    check_writable(path, "--out")  # a folder is refused before a suffix is added to its name
    if target.suffix.lower() == suffix:
        return path
    if is_default:
        return str(target.with_suffix(suffix))
    if target.suffix.lower() not in OTHER_FORMATS:
        return str(target.with_name(target.name + suffix))
    kind = kind or ("an image (--duration 0)" if is_image else "a video")
    raise ValueError(f"--out {path}: this run writes {kind} as {suffix}; name the file {target.with_suffix(suffix)}")


TOKENS_SUFFIX = ".safetensors"


def tokens_path(path: str | None) -> str | None:
    """--save-tokens: a name without the .safetensors suffix gets it (Load Tokens lists only those); a media or
    weights suffix is refused, as it would name a tokens file like a video."""
    if not path:
        return path
    target = Path(path)
    check_writable(path, "--save-tokens")
    if target.suffix.lower() == TOKENS_SUFFIX:
        return path
    if target.suffix.lower() in OTHER_FORMATS:
        raise ValueError(f"--save-tokens {path}: tokens are written as a {TOKENS_SUFFIX} file; name it "
                         f"{target.with_suffix(TOKENS_SUFFIX)}")
    return str(target.with_name(target.name + TOKENS_SUFFIX))


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
    example = target / ("tokens.safetensors" if option == "--save-tokens" else "out.mp4")
    if target.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name (e.g. {example})")
    if path.endswith(("/", os.sep)):  # "outs/": a folder meant, which a Path would take for a file name
        raise ValueError(f"{option} {path} names a folder; give a file name (e.g. {example})")
    folder = target.parent.absolute()
    while not folder.exists():  # the nearest folder that exists decides whether the rest can be made
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: {folder} is a file, not a folder; choose another path")
    try:  # a real file: os.access says yes to every folder on Windows, and to root everywhere
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"{option} {path}: the folder {folder} is not writable ({e.strerror or e}); choose another "
                         "path") from None


def check_sources(args) -> None:
    """Input files that do not exist, and combinations of inputs a command cannot use together."""
    command = args.command
    if command == "extend" and args.clips < 1:
        raise ValueError(f"--clips {args.clips}: give 1 or more clips of 5 s to add")
    if command == "interact" and (args.tau_image, args.tau_video) != (TAU_IMAGE, TAU_VIDEO):
        raise ValueError("interact samples every scale at one temperature: give --tau (official 0.5); --tau-image "
                         "and --tau-video are for generate and extend")
    if getattr(args, "last", None) and not getattr(args, "video", None):
        raise ValueError(f"--last {args.last} picks the end of --video; give --video, or leave --last out")
    if command in ("extend", "interact") and getattr(args, "tokens", None) and getattr(args, "video", None):
        raise ValueError(f"{command}: --tokens and --video both given; continue saved tokens or a video, not both")
    if command == "generate":
        if args.image and args.video:
            raise ValueError("--image and --video both given: start from an image (image-to-video) or continue a "
                             "video, not both")
        if args.video and args.duration < 10:
            raise ValueError(f"--video with --duration {args.duration}: a continuation keeps 5 s of the video "
                             f"({'its last' if args.last else 'its first'} 5 s) and generates what follows, so it "
                             "needs --duration 10 (the 480p weights); to add 5 s clips to a video, use `extend "
                             "--video`")
        if args.image and args.duration == 0:
            raise ValueError("--image with --duration 0 would only give the image back; image-to-video needs "
                             "--duration 5 (or 10 with the 480p weights)")
    dtype, fp8_matmul = getattr(args, "dtype", None), getattr(args, "fp8_matmul", False)
    if fp8_matmul and dtype not in (None, "fp8"):
        raise ValueError(f"--fp8-matmul multiplies fp8 e4m3fn weights; drop --dtype {dtype} (or use --dtype fp8)")
    if dtype in ("fp8", "fp8_e5m2") and str(getattr(args, "device", None) or "").startswith("mps"):
        raise ValueError(f"--dtype {dtype}: Apple's MPS has no fp8 tensors; use --dtype fp16 or bf16")
    transformer = getattr(args, "transformer", None)
    if transformer and Path(transformer).suffix.lower() == ".gguf" and (dtype or fp8_matmul):
        raise ValueError(f"--transformer {transformer} is a GGUF file, already quantized: it runs as it was converted; "
                         "drop --dtype / --fp8-matmul")
    for option in ("image", "video", "tokens", "prompts_file"):
        given = getattr(args, option, None)
        if given and not Path(given).exists():
            raise FileNotFoundError(f"--{option.replace('_', '-')} {given}: no such file")


def device(name: str | None):
    """--device as a torch.device this PyTorch can use (default: cuda when available, else cpu)."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name PyTorch knows; use cuda, cuda:1, mps or cpu") from None
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


def _add_model_args(p: argparse.ArgumentParser, resolution_default: str | None = None) -> None:
    p.add_argument("--models", default=os.environ.get("INFINITYSTAR_MODELS", "models"),
                   help="folder laid out like the hub repo (default $INFINITYSTAR_MODELS or ./models)")
    p.add_argument("--variant", choices=list(TRANSFORMER_DIRS), help="weights to use (default: from --resolution)")
    p.add_argument("--transformer", help="transformer file or folder to use instead of the one under --models "
                                         "(e.g. a .gguf written by convert-gguf)")
    p.add_argument("--tiny", action="store_true", help="use tiny random weights written to a cache folder (offline)")
    p.add_argument("--tiny-seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--resolution", choices=RESOLUTION_CHOICES, default=resolution_default,
                   help="720p (0.90M), 480p (0.40M) or a pixel class (default: what the --variant weights were "
                        "trained at, 720p without --variant; 0.06M with --tiny)")
    p.add_argument("--aspect", default="16:9", help="W:H such as 16:9, 1:1, 9:16, or an h/w ratio")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--negative-prompt", default="", help="empty: the model's learned null text (official default)")
    p.add_argument("--no-decorate", action="store_true", help="skip the official duration tag and closing phrase")
    p.add_argument("--seed", type=seed, default=41, help="seed of every draw (default: the official scripts' 41; "
                                                      "interact: 0, as its script)")
    p.add_argument("--cfg", type=guidance_scale, default=34.0, help="APG guidance scale (official 34)")
    p.add_argument("--cfg-schedule", default="", help="guidance scale per scale of the pyramid, coarse to fine, "
                   "comma-separated, the last repeating (e.g. '34,34,34,20,10'); every clip's pyramid follows it; default: "
                   "--cfg everywhere")
    p.add_argument("--tau-image", type=temperature, default=TAU_IMAGE)
    p.add_argument("--tau-video", type=temperature, default=TAU_VIDEO)
    p.add_argument("--dtype", choices=list(DTYPES),
                   help="transformer block storage (default: fp32 on the CPU; on a GPU bf16, or fp8 when bf16 "
                        "weights and the run do not fit its free memory); fp32 blocks also compute in fp32")
    p.add_argument("--device", help="cuda, cuda:1, mps, cpu (default: cuda when available)")
    p.add_argument("--generator", choices=list(P.GENERATOR_CHOICES), default="auto",
                   help="where the bits are drawn: auto = a CUDA generator on GPU, like the official code; "
                        "cpu = the same bits on any device for the same logits")
    p.add_argument("--offload-kv", choices=list(P.OFFLOAD_KV_CHOICES), default="auto",
                   help="keep the reference scales' K/V in host memory (10 s videos on small GPUs; exact, slower); "
                        "auto = only for as many layers as the run needs to fit the GPU")
    p.add_argument("--fp8-matmul", action="store_true",
                   help="fp8 e4m3fn weights multiplied in fp8 (RTX 40xx / H100 and newer): faster matmuls, "
                        "activations rounded to fp8 (not the official numerics)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the blocks' parts around attention: norms, projections, RoPE, SwiGLU "
                        "(needs Triton on a GPU; the first run compiles)")
    p.add_argument("--attention", choices=list(BACKENDS), default="auto",
                   help="attention kernel: auto = flash-attn when installed on CUDA, else PyTorch SDPA (its own "
                        "pick for large calls: cuDNN on Hopper with recent PyTorch; FlashAttention-2 for small ones); "
                        "cudnn = cuDNN's kernel for every call; "
                        "sdpa_flash = PyTorch's FlashAttention-2 (the official kernel family: bf16 runs equal to "
                        "the official GPU run); sage = SageAttention (changes the numerics)")
    p.add_argument("--norms", choices=["fused", "composite"], default="fused",
                   help="CUDA, bf16/fp16: RMSNorm as PyTorch's fused kernel, or as the official code computes it "
                        "(fp32 statistics; with --attention sdpa_flash, bf16 runs equal to the official GPU run)")
    p.add_argument("--save-tokens", help="also write the generated tokens (.safetensors), to continue later "
                                          "(`extend`; a story: `interact --tokens`)")
    p.add_argument("--out", help="output .mp4 (a .png for --duration 0; default out.mp4 / out.png)")
    p.add_argument("--new-only", action="store_true",
                   help="write only the clips this run adds to its --video / --tokens / --image (a video's "
                        "earlier frames are still decoded, as the decoder reads them, but not held; a story decodes "
                        "only its new clips' windows); --save-tokens keeps all")


def _set_help(p: argparse.ArgumentParser, dest: str, text: str) -> None:
    """Say a subcommand's own default of a shared option in its --help."""
    next(a for a in p._actions if a.dest == dest).help = text


def _add_last(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--last", type=int, choices=(5, 10), metavar="SECONDS", help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m infinitystar", description="InfinityStar video generation")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text-to-video / image (--duration 0) / image-to-video / video continuation")
    _add_model_args(g)
    g.add_argument("--duration", type=int, default=5, help="seconds: 0 (image), 5, 10 (480p)")
    g.add_argument("--image", help="conditioning image (I2V)")
    g.add_argument("--video", help="video to continue (V2V, as the official 480p script: its first 5 s, and "
                                   "--duration 10)")
    _add_last(g, "read the last 5 s of --video instead of its first 5 s, ending at its last frame, so the new 5 s "
                 "start where it ends (a 10 s output continues 5 s of the video: --last 10 reads 5 s too)")
    g.add_argument("--steps-preview", action="store_true", help="print the AR step schedule and exit")

    d = sub.add_parser("demo", help="generate with tiny random weights, offline (checks the install)")
    _add_model_args(d, resolution_default="0.06M")
    d.add_argument("--duration", type=int, default=5)
    d.set_defaults(tiny=True, image=None, video=None, last=None, steps_preview=False)
    _set_help(d, "out", "output .mp4 (default demo.mp4)")

    e = sub.add_parser("extend", help="append 5 s clips to saved tokens or to a video")
    _add_model_args(e)
    e.add_argument("--tokens", help="tokens file from generate --save-tokens")
    e.add_argument("--video", help="video to encode and extend (whole 5 s clips are used)")
    _add_last(e, "encode at most the last 5 or 10 s of --video, ending at its last frame, so the new clips start "
                 "where it ends (default: its whole 5 s clips from the start, as the official V2V reader, dropping "
                 "up to 5 s at the end)")
    e.add_argument("--clips", type=int, default=1, help="clips of 5 s to add")
    _set_help(e, "out", "output .mp4 (default out.mp4)")

    it = sub.add_parser("interact", help="InfinityStar-Interact: continue a video 5 s per prompt (interact weights)")
    _add_model_args(it)
    it.add_argument("--video", help="reference video; its last 5 s start the story")
    it.add_argument("--tokens", help="a story (or video tokens) saved with --save-tokens, to continue")
    it.add_argument("--prompts", nargs="+", help="one prompt per new 5 s clip (default: --prompt, one clip)")
    it.add_argument("--prompts-file", help="a text file with one prompt per line, a clip each (blank lines skipped)")
    it.add_argument("--skip-first-line", action="store_true",
                    help="the file is laid out as the official prompt.txt: its first line captions the reference "
                         "video and is not generated; each later line is a clip")
    it.add_argument("--tau", type=temperature, default=0.5, help="temperature of every scale (official 0.5)")
    it.add_argument("--apg", action="store_true", help="APG instead of the official plain CFG (raise --cfg)")
    it.set_defaults(cfg=3.0, aspect=None, seed=0)  # the official interact script's seed (T2V/I2V: 41)
    _set_help(it, "cfg", "guidance scale (official: plain CFG 3; with --apg about 34)")
    _set_help(it, "resolution", "480p (0.40M, what the interact weights were trained at) or a pixel class for "
                                "drafts (default 480p; 0.06M with --tiny)")
    _set_help(it, "variant", "weights to use (default: interact)")
    _set_help(it, "out", "output .mp4 (default out.mp4)")
    from .interact import STORY_PNS

    next(a for a in it._actions if a.dest == "resolution").choices = ["480p", *STORY_PNS]  # no 720p stories
    _set_help(it, "tau_image", argparse.SUPPRESS)  # interact has one --tau
    _set_help(it, "tau_video", argparse.SUPPRESS)

    dc = sub.add_parser("decode", help="decode a tokens file (--save-tokens, Save Tokens) to an mp4 / PNG with the "
                                       "video tokenizer alone: no transformer or text encoder loads")
    dc.add_argument("tokens", help="the tokens .safetensors file")
    dc.add_argument("--models", default=os.environ.get("INFINITYSTAR_MODELS", "models"),
                    help="folder laid out like the hub repo, for its video tokenizer (default $INFINITYSTAR_MODELS "
                         "or ./models)")
    source = dc.add_mutually_exclusive_group()
    source.add_argument("--vae", help="video tokenizer file to use instead of the one under --models")
    source.add_argument("--tiny", action="store_true",
                        help="the tiny random-weight tokenizer (tokens made with --tiny or demo)")
    dc.add_argument("--tiny-seed", type=int, default=0, help=argparse.SUPPRESS)
    dc.add_argument("--device", help="cuda, cuda:1, mps, cpu (default: cuda when available)")
    dc.add_argument("--out", help="output .mp4 (a .png for an image's tokens; default out.mp4 / out.png)")
    frames = dc.add_mutually_exclusive_group()
    frames.add_argument("--new-only", action="store_true",
                        help="write only the clips the run that saved the tokens added to its start video, image or "
                             "tokens (a video's earlier frames are still decoded, as the decoder reads them, but not "
                             "held; a story decodes only its new clips' windows)")
    frames.add_argument("--last-clip", action="store_true",
                        help="write only the last 5 s clip (80 frames; a 5 s video whole); a story (interact) "
                             "decodes only its last window")
    dc.add_argument("--tiled", action="store_true",
                    help="also split each frame into overlapping spatial tiles (less memory; seams are possible). "
                         "Without it a decode that runs out of GPU memory is retried tiled")

    dl = sub.add_parser("download", help=f"fetch one variant from huggingface.co/{REPO_ID}")
    dl.add_argument("--variant", choices=list(TRANSFORMER_DIRS), default="720p")
    dl.add_argument("--dest", default=os.environ.get("INFINITYSTAR_MODELS", "models"))
    dl.add_argument("--components", nargs="+", choices=COMPONENTS, default=list(COMPONENTS))
    dl.add_argument("--local-source", help="copy from a local folder laid out like the hub repo")

    c = sub.add_parser("convert-gguf", help="write a transformer checkpoint as GGUF (block-quantized weights)")
    c.add_argument("source", help="transformer file or sharded folder (the official layout)")
    c.add_argument("out", help="the .gguf file to write")
    c.add_argument("--type", default="Q8_0", choices=list(WRITABLE),
                   help="quantization of the blocks' matmul weights (Q8_0 ≈ 9.4 GB for the 8B model, Q6_K ≈ 7.2, "
                        "Q5_K ≈ 6.1, Q4_K ≈ 5.0; everything else is kept in F32)")
    c.add_argument("--variant", choices=list(TRANSFORMER_DIRS), help="stored in the file (default: from the path)")

    v = sub.add_parser("convert", help="write the official fp32 transformer as one bf16 (or fp16) .safetensors file: "
                                       "half the size and half the read at every load, same model")
    v.add_argument("source", help="transformer sharded folder or file (the official layout)")
    v.add_argument("out", help="the .safetensors file to write (e.g. infinitystar_8b_720p_bf16.safetensors)")
    v.add_argument("--dtype", default="bf16", choices=list(CONVERT_DTYPES),
                   help="the blocks' dtype (bf16: the official scripts' GPU layout, 17.6 GB for the 8B model); "
                        "embeddings, heads and the null text stay fp32")
    v.add_argument("--variant", choices=list(TRANSFORMER_DIRS), help="stored in the file (default: from the path)")

    e = sub.add_parser("convert-text-encoder", help="write the flan-t5-xl folder (11 GB, with a decoder nothing "
                                                    "reads) as an encoder-only folder: fp16 about 2.9 GB")
    e.add_argument("source", help="the text_encoder/flan-t5-xl-official folder")
    e.add_argument("out", help="the folder to write (e.g. models/text_encoders/flan-t5-xl-encoder-fp16)")
    e.add_argument("--dtype", default="fp16", choices=list(TEXT_DTYPES),
                   help="fp16: what the loaders make of the published folder on a GPU, bit for bit (wo stays fp32); "
                        "fp32: every bit of the published encoder (about 4.9 GB)")

    t = sub.add_parser("tiny", help="write the tiny random-weight model set")
    t.add_argument("outdir")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--force", action="store_true", help="replace model files the folder already holds")
    return parser
