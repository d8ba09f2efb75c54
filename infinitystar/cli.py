"""Command line: ``python -m infinitystar generate|extend|interact|decode|download|convert|convert-text-encoder|convert-gguf|tiny|demo``.

``demo`` (or ``generate --tiny``) writes the tiny random-weight set to a cache folder and runs the same pipeline
offline, so the whole path can be checked on any machine; its output is noise by design.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import os
import sys
from pathlib import Path

import torch

from . import cli_args as C
from . import pipeline as P
from .attention import backend_unavailable, takes_gqa
from .cli_args import DTYPES, build_parser
from .download import COMPONENTS, TRANSFORMER_DIRS, download_models, find_models
from .ops import native_bf16

logger = logging.getLogger(__name__)



def _tiny_root(seed: int = 0) -> Path:
    # not <tmp>/infinitystar: a folder named like the package shadows it when run from <tmp>
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    base = os.environ.get("INFINITYSTAR_CACHE") or os.path.join(xdg, "infinitystar-models")
    return Path(base) / f"tiny-seed{seed}"


def _ensure_tiny(seed: int = 0) -> Path:
    from .tiny import write_tiny_models

    root = _tiny_root(seed)
    done = root / ".complete"
    if not done.is_file() or not all((root / name).is_dir() for name in TRANSFORMER_DIRS.values()):
        print(f"writing the tiny random-weight model set to {root} …", file=sys.stderr)
        write_tiny_models(root, seed=seed, overwrite=True)  # the cache's own, unfinished set
        done.write_text("ok\n", encoding="utf-8")
    return root


def _guidance(args, use_apg: bool = True):
    from .guidance import GuidanceConfig, parse_scale_list

    return GuidanceConfig(scale=args.cfg, use_apg=use_apg,
                          per_scale=parse_scale_list(args.cfg_schedule, "--cfg-schedule"))


def _variant(args) -> str:
    if args.resolution is None:  # tiny weights: the smallest schedule keeps CPU runs short
        tiny = getattr(args, "tiny", False)
        args.resolution = "0.06M" if tiny else P.VARIANT_RESOLUTION.get(args.variant or "720p", "720p")
    if args.variant:
        return args.variant
    return "480p" if args.resolution in ("480p", "0.40M") else "720p"


class _Progress:
    """tqdm bar fed by a callback ``(index, total, ...)`` (0-based, as the sampler's); with ``total`` None it is
    shown from the first call, which gives the total."""

    def __init__(self, total: int | None, desc: str, unit: str = "step"):
        self.desc, self.unit = desc, unit
        self.bar = None if total is None else self._open(total)

    def _open(self, total: int):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=self.desc, unit=self.unit)

    def __call__(self, index, total, *_):
        if self.bar is None:
            self.bar = self._open(total)
        self.bar.n = index + 1
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _free_cached_memory(device: torch.device) -> None:
    """After dropping a model or a failed attempt: collect what still refers to it, and give the CUDA allocator's
    cache back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def decode_budget(device: torch.device) -> int | None:
    """Bytes the decode may use on a GPU (it picks its chunk size to fit); None on the CPU: the official chunks."""
    if device.type != "cuda":
        return None
    from .sampler import AUTO_HEADROOM, cuda_available_bytes

    return max(0, cuda_available_bytes(device) - AUTO_HEADROOM)


def decode_to_file(tokenizer, tokens: P.Tokens, out: str, *, memory_budget: int | None, tiled: bool = False,
                   new_clips: bool = False, last_clip: bool = False) -> Path:
    """Decode with a progress bar (chunks) and write the mp4 (a video) or PNG (an image). Out of GPU memory, the
    decode runs once more in spatial tiles, as the Decode node does, rather than losing the run."""
    from .video_io import write_mp4, write_png

    device = P._tokenizer_device(tokenizer)
    if native_bf16(device):
        # the official scripts decode under bf16 autocast (and encode outside it, in fp32); native bf16 only
        tokenizer.compute_dtype = torch.bfloat16
    frames = None
    for tiles in (True,) if tiled else (False, True):
        bar = _Progress(None, "decode" + (" (tiled)" if tiles else ""), unit="chunk")

        def progress(done, total, bar=bar):
            bar(done - 1, total)  # the tokenizer reports chunks done, 1-based

        try:
            frames = P.decode(tokenizer, tokens, callback=progress, memory_budget=memory_budget, tiled=tiles,
                              new_clips=new_clips, last_clip=last_clip)
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError
            pass  # handled below, once the failed attempt's tensors are no longer referenced by the error
        finally:
            bar.close()
        if frames is not None:
            break
        _free_cached_memory(device)
        if tiles:
            raise RuntimeError(f"the decode ran out of memory on {device}, in spatial tiles too: close other programs "
                               "that use it, or decode on the CPU (--device cpu; slow)")
        print("note: out of GPU memory in the decode; decoding again in spatial tiles (seams are possible; "
              "--tiled skips the first attempt)", file=sys.stderr)
    return write_mp4(out, frames, fps=P.FPS) if tokens.is_video else write_png(out, frames)


class Session:
    """Loads components lazily from a hub-layout folder and frees the text encoder once used."""

    def __init__(self, args):
        self.args = args
        self.tiny = getattr(args, "tiny", False)
        self.root = _ensure_tiny(args.tiny_seed) if self.tiny else Path(args.models)
        self.variant = _variant(args)
        own = getattr(args, "transformer", None)
        wanted = [c for c in COMPONENTS if not (own and c == "transformer")]
        self.paths = find_models(self.root, self.variant, wanted)
        if own:  # e.g. a GGUF file from convert-gguf; the text encoder and tokenizer still come from --models
            self.paths["transformer"] = Path(own)
        from .checkpoint import check_tokenizer_file

        check_tokenizer_file(self.paths["vae"])  # a wrong file is found now, not at the decode after sampling
        self.device = C.device(args.device)
        if getattr(args, "generator", "auto") == "cuda" and not torch.cuda.is_available():
            raise ValueError("--generator cuda: this PyTorch sees no CUDA GPU; use --generator auto or cpu")
        from .transformer import compile_unavailable

        why = compile_unavailable(self.device) if getattr(args, "compile", False) else None
        if why:
            raise ValueError(f"--compile: {why}; or leave --compile out")
        if getattr(args, "fp8_matmul", False):
            from .ops import fp8_matmul_unavailable

            why = fp8_matmul_unavailable(self.device)
            if why:
                raise ValueError(f"--fp8-matmul: {why}; leave it out (fp8 storage alone still halves the weights)")
        attention = getattr(args, "attention", "auto")
        why = backend_unavailable(attention, self.device)
        if why:
            raise ValueError(f"--attention {attention}: {why} (auto picks among them)")
        if attention in ("cudnn", "sdpa_flash") and self.device.type != "cuda":
            logger.warning("--attention %s is a CUDA kernel; on %s PyTorch's own SDPA pick runs instead", attention,
                           self.device)
        self._transformer = self._tokenizer = None
        self.info = None
        self.guidance()  # a malformed --cfg-schedule fails before anything loads

    def text(self, prompt: str, negative: str, duration_s: int | None):
        return self.texts([prompt], negative, duration_s)[0]

    def texts(self, prompts: list[str], negative: str, duration_s: int | None, closing: bool = True) -> list:
        """Encode prompts with one load of the text encoder, freed before the transformer loads."""
        from transformers.utils import logging as hf_logging

        from .text import TextEncoder

        hf_logging.disable_progress_bar()  # the CLI shows its own bars
        if any(not prompt.strip() for prompt in prompts):
            logger.warning("an empty prompt: the model gets only the duration tag and the closing phrase")

        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        encoder = TextEncoder.from_folder(self.paths["text_encoder"], dtype=dtype, device=self.device)
        try:
            return [encoder.encode(prompt, negative_prompt=negative, duration_s=duration_s,
                                   decorate=not self.args.no_decorate, closing=closing) for prompt in prompts]
        finally:
            del encoder
            self._free_cached_memory()

    def auto_dtype(self, schedule) -> torch.dtype:
        """Block storage when --dtype is not given: fp32 on the CPU; on a GPU bf16 (the official layout) when the
        weights and the run fit its free memory, else fp8 (e4m3fn, scaled), with a note saying so."""
        if self.device.type != "cuda":
            return torch.float32
        half = torch.bfloat16 if native_bf16(self.device) else torch.float16  # fp16: GPUs before Ampere
        if schedule is None:
            return half
        from .memory import estimate_sampling_memory, fit_block_dtype, weight_bytes
        from .sampler import AUTO_HEADROOM, cuda_available_bytes

        config = self.model_info().config
        free = cuda_available_bytes(self.device)
        plan = dict(dtype=half, batch=self.guidance().branches(schedule.scales_per_clip),
                    native_gqa=takes_gqa(self.device, half, config.head_dim, getattr(self.args, "attention", "auto")))
        dtype = fit_block_dtype(config, [schedule], free - AUTO_HEADROOM, half, batch=plan["batch"],
                                native_gqa=plan["native_gqa"])
        if dtype != half:
            name = str(half).removeprefix("torch.").replace("bfloat16", "bf16").replace("float16", "fp16")
            need = weight_bytes(config, half) / 1e9
            print(f"note: {name} weights ({need:.1f} GB) and this run do not fit the {free / 1e9:.1f} GB free on "
                  f"{self.device}; storing the blocks in fp8 (e4m3fn, scaled). --dtype {name} forces {name}.",
                  file=sys.stderr)
            least = estimate_sampling_memory(config, schedule, offload_kv=True, weight_dtype=dtype, **plan)
            if weight_bytes(config, dtype) + least > free - AUTO_HEADROOM:
                print("note: fp8 blocks do not fit either, so this run will likely run out of GPU memory. The CLI "
                      "keeps every block on the GPU: try a smaller --resolution (480p, 0.25M), a GGUF Q4_K "
                      "transformer (convert-gguf, about 5 GB), or the ComfyUI nodes, which stream blocks from "
                      "system memory.", file=sys.stderr)
        return dtype

    def transformer(self, schedule=None):
        from .checkpoint import load_transformer

        if self._transformer is None:
            fp8_matmul = getattr(self.args, "fp8_matmul", False)  # with a conflicting --dtype refused at the start
            gguf_file = Path(self.paths["transformer"]).suffix.lower() == ".gguf"  # quantized already: kept as stored
            dtype = DTYPES[self.args.dtype] if self.args.dtype else (
                None if gguf_file else torch.float8_e4m3fn if fp8_matmul else self.auto_dtype(schedule))
            self._transformer, self.info = load_transformer(self.paths["transformer"], dtype=dtype,
                                                            device=self.device, fp8_matmul=fp8_matmul)
            self._transformer.use_fused_norms(getattr(self.args, "norms", "fused") == "fused")
            print(f"transformer: {self.paths['transformer']} ({self.info.variant}, blocks {self.info.storage})",
                  file=sys.stderr)
        return self._transformer

    def model_info(self):
        if self.info is None:
            from .checkpoint import inspect_transformer

            self.info = inspect_transformer(self.paths["transformer"])
        return self.info

    def tokenizer(self):
        from .checkpoint import load_tokenizer

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.paths["vae"], device=self.device)  # encodes in fp32, as upstream
        return self._tokenizer

    def release_transformer(self) -> None:
        """Free the transformer before decoding: the decode's activations then have the whole device (the nodes get
        the same from ComfyUI's model manager). Callers drop their own references first."""
        self._transformer = None
        self._free_cached_memory()

    def _free_cached_memory(self) -> None:
        _free_cached_memory(self.device)

    def decode_budget(self) -> int | None:
        return decode_budget(self.device)

    def sample_kwargs(self):
        a = self.args
        return dict(guidance=self.guidance(), tau_image=a.tau_image, tau_video=a.tau_video,
                    generator=a.generator, offload_kv=P.OFFLOAD_KV_CHOICES[a.offload_kv], compile=a.compile,
                    attn_backend=a.attention)

    def guidance(self, use_apg: bool = True):
        """--cfg (and --cfg-schedule) as the sampler's guidance; checked before any weights load."""
        return _guidance(self.args, use_apg)

    def write(self, tokens: P.Tokens, out: str) -> Path:
        """Save the tokens (--save-tokens), free the transformer, decode and write the mp4 / PNG."""
        unsaved = None
        if self.args.save_tokens:
            try:
                tokens.save(self.args.save_tokens)
                print(f"tokens: {self.args.save_tokens}", file=sys.stderr)
            except OSError as e:  # a full disk: the run's video is still worth writing
                unsaved = e
                print(f"error: {e}; the tokens are not saved, the video is still decoded", file=sys.stderr)
        self.release_transformer()
        try:
            written = decode_to_file(self.tokenizer(), tokens, out, memory_budget=self.decode_budget(),
                                     new_clips=getattr(self.args, "new_only", False))
        except RuntimeError as e:  # out of memory, even tiled: the sampled tokens need not be lost
            if not self.args.save_tokens or unsaved is not None:
                raise RuntimeError(f"{e}. (With --save-tokens the sampled tokens are kept and a failed decode can be "
                                   "run again with `decode`.)") from e
            where = "--tiny" if self.tiny else f"--models {self.args.models}"
            raise RuntimeError(f"{e}. The sampled tokens are saved: decode them with `python -m infinitystar decode "
                               f"{self.args.save_tokens} {where} --out {out}` (--device cpu: slow, but it fits)") from e
        if unsaved is not None:
            raise OSError(f"{written} is written, but the tokens are not ({unsaved})")
        return written


ASPECT_TOLERANCE = 0.1  # relative h/w difference beyond which a snap to an aspect template is worth saying


def _say_size(schedule, aspect: str, image: str | None) -> None:
    """Print the output's size, and warn when the aspect asked for, or the start image's, is far from it."""
    from .schedule import parse_aspect

    kind = "1 frame" if schedule.frames == 1 else f"{schedule.frames} frames at {P.FPS} fps"
    print(f"output: {schedule.width}x{schedule.height}, {kind} ({schedule.pn}, h/w {schedule.h_div_w:.3f})",
          file=sys.stderr)
    asked = parse_aspect(aspect)
    if abs(asked / schedule.h_div_w - 1) > ASPECT_TOLERANCE:
        logger.warning("--aspect %s (h/w %.3f) is snapped to the nearest of the model's aspect templates, h/w %.3f",
                       aspect, asked, schedule.h_div_w)
    if image:
        from PIL import Image

        try:
            with Image.open(image) as img:
                w, h = img.size
        except (OSError, Image.DecompressionBombError):
            return  # the encode names what is wrong with the file
        from .vae import CROP_WARN_SHARE, cropped_share

        share = cropped_share(h, w, schedule.height, schedule.width)
        if share > CROP_WARN_SHARE:
            logger.warning("--image %s is %dx%d; it is resized to cover %dx%d and center-cropped, cutting %.0f%% of it "
                           "(give --aspect %d:%d to keep more of it)", image, w, h, schedule.width, schedule.height,
                           100 * share, w, h)


def _run_generate(args) -> Path:
    if args.steps_preview:
        return _preview(args)
    s = Session(args)
    schedule = P.resolve_schedule(args.resolution, args.aspect, args.duration, model_info=s.model_info())
    _say_size(schedule, args.aspect, args.image)
    _check_media(args)
    text = s.text(args.prompt, args.negative_prompt, args.duration)
    condition = None
    if args.image:
        condition = P.encode_image(s.tokenizer(), args.image, schedule, seed=args.seed)
    elif args.video:
        condition = _encode_video_file(s, args.video, schedule, args.seed, last=args.last)
    transformer = s.transformer(schedule)
    bar = _Progress(schedule.num_steps, "sampling")
    try:
        tokens = P.generate(transformer, text, schedule, seed=args.seed, condition=condition, callback=bar,
                            **s.sample_kwargs())
    finally:
        bar.close()
    del transformer  # freed before the decode
    return s.write(tokens, args.out)


def _check_media(args) -> None:
    """A start image or video that cannot be read is said before the text encoder loads (minutes with the
    published flan-t5-xl), not after it: the header of a video, the whole of an image (it is small)."""
    from .video_io import read_image, video_frame_count

    if getattr(args, "image", None):
        read_image(args.image)
    if getattr(args, "video", None) and not getattr(args, "tokens", None):
        video_frame_count(args.video)


def _encode_video_file(s: Session, path: str, schedule, seed: int, clips: int | None = None,
                       last: int | None = None) -> P.Tokens:
    """The tokens of a video's whole 5 s clips: ``clips`` of them (None: as many as leave one clip of ``schedule``
    to generate; -1: all) from its start, or with ``last`` (seconds) at most the last ``last / 5``, ending at its
    last frame."""
    from .video_io import read_video_clip, video_frame_count, whole_clips

    length = video_frame_count(path)  # (frames, fps), read once
    total, fps = length
    available = whole_clips(total, fps)
    if available < 1:
        raise ValueError(f"{path}: {total / fps:.2f} s; continuing a video needs at least 5 s of it (80 frames at "
                         "16 fps)")
    if clips is None:  # as many whole 5 s clips as the video holds, leaving one of the schedule to generate
        clips = min(available, schedule.num_clips - 2)
    elif clips < 0:  # every whole 5 s clip of the video
        clips = available
    if last:
        clips = min(clips, last // 5)
    if clips < 1:
        raise ValueError(f"a {(schedule.frames - 1) // P.FPS} s output leaves nothing to generate after the video's "
                         f"{'last' if last else 'first'} 5 s: give --duration 10 (the 480p weights), or continue it "
                         "with `extend`")
    from .vae import FrameFit

    fit = FrameFit(lambda h, w: P.encode_size(schedule))  # a 4K video is held at the output's size
    picked, _ = read_video_clip(path, 1 + P.PIXEL_FRAMES_PER_CLIP * clips, 5 * clips, length=length,
                                fit=fit, from_end=bool(last))  # the official V2V picks (from the end: interact's)
    return P.encode_video(s.tokenizer(), picked, schedule, seed=seed, clips=clips)


def _preview_weights(args):
    """The transformer's CheckpointInfo from its file headers; before a download, the released 8B model's."""
    from .checkpoint import CheckpointInfo, inspect_transformer

    if getattr(args, "tiny", False):
        return Session(args).model_info()
    variant = _variant(args)
    own = getattr(args, "transformer", None)
    try:
        path = Path(own) if own else find_models(Path(args.models), variant, ["transformer"])["transformer"]
    except FileNotFoundError:
        from .config import TRANSFORMER_PRESETS

        print(f"note: no {variant} transformer under {args.models} yet; these are the released 8B {variant} model's "
              "figures (its files are fp32)", file=sys.stderr)
        return CheckpointInfo(variant, TRANSFORMER_PRESETS["8b"], torch.float32, Path(args.models))
    return inspect_transformer(path)


def _preview(args) -> Path | None:
    info = _preview_weights(args)
    schedule = P.resolve_schedule(args.resolution, args.aspect, args.duration, model_info=info)
    print(f"{schedule.pn} h/w {schedule.h_div_w}: {schedule.height}x{schedule.width}, {schedule.frames} frames, "
          f"{schedule.num_clips - 1} video clip(s), {schedule.num_steps} steps + 1 text step")
    from .memory import estimate_sampling_memory

    stored = DTYPES[args.dtype] if getattr(args, "dtype", None) else info.dtype  # fp8 / GGUF: a dequantized copy
    batch = _guidance(args).branches(schedule.scales_per_clip)  # --cfg 1: the conditional branch alone
    extra = estimate_sampling_memory(info.config, schedule, batch=batch, weight_dtype=stored)
    offloaded = estimate_sampling_memory(info.config, schedule, batch=batch, offload_kv=True, weight_dtype=stored)
    print(f"weights: {info.variant}, {info.config.depth} blocks of width {info.config.width} "
          f"({getattr(args, 'dtype', None) or info.storage}); "
          f"sampling needs ≈{extra / 1e9:.2f} GB beyond the weights (bf16, CFG batch {batch}), "
          f"≈{offloaded / 1e9:.2f} GB with --offload-kv on")
    if info.quant == "":  # GGUF weights are as large as their file
        from .memory import weight_bytes

        sizes = {name: weight_bytes(info.config, DTYPES[name]) / 1e9 for name in ("bf16", "fp8")}
        print(f"weights on a GPU: ≈{sizes['bf16']:.1f} GB in bf16 (the default when they fit with the run), "
              f"≈{sizes['fp8']:.1f} GB in fp8")
    for st in schedule.steps:
        print(f"  step {st.index:3d} clip {st.clip} scale {st.si:2d} rep {st.rep} t,h,w={st.t},{st.h},{st.w} "
              f"bits {st.d} tokens {st.num_tokens}")
    return None


def _warn_resolution_ignored(asked: str | None, path: str, tokens: P.Tokens) -> None:
    """Saved tokens carry their resolution; say so when --resolution asked for another."""
    if asked is not None and P.RESOLUTIONS.get(asked, asked) != tokens.pn:
        logger.warning("--resolution %s ignored: %s holds %s tokens", asked, path, tokens.pn)


def _run_extend(args) -> Path:
    tokens = P.Tokens.load(args.tokens) if args.tokens else None
    if tokens is not None:  # the tokens say their resolution, and so which weights continue them
        _warn_resolution_ignored(args.resolution, args.tokens, tokens)
        args.resolution = tokens.pn
    elif not args.video:
        raise ValueError("extend needs --tokens FILE (from generate --save-tokens) or --video MP4")
    s = Session(args)
    if tokens is None:
        base = P.resolve_schedule(args.resolution, args.aspect, frames=1)
        tokens = _encode_video_file(s, args.video, base, args.seed, clips=-1, last=args.last)
    total = P.extension_schedule(tokens, args.clips, model_info=s.model_info())  # refuses stories / partial tokens
    seconds = (total.frames - 1) // P.FPS
    if seconds > P.TRAINED_SECONDS:
        logger.warning("extending to %d s; the released models were trained up to %d s (the prompt keeps that "
                       "tag)", seconds, P.TRAINED_SECONDS)
    text = s.text(args.prompt, args.negative_prompt, min(seconds, P.TRAINED_SECONDS))  # tags the models saw
    transformer = s.transformer(total)
    bar = _Progress(total.num_steps, "extending")
    try:
        longer = P.extend(transformer, text, tokens, args.clips, seed=args.seed, callback=bar, **s.sample_kwargs())
    finally:
        bar.close()
    del transformer
    return s.write(longer, args.out)


def _run_interact(args) -> Path:
    """InfinityStar-Interact: start from a reference video's last 5 s (or saved tokens), one clip per prompt."""
    from . import interact as I

    asked = args.resolution
    if args.resolution is None:
        args.resolution = "0.06M" if args.tiny else "480p"
    args.variant = args.variant or "interact"
    s = Session(args)
    variant = s.model_info().variant
    if variant in I.T2V_VARIANTS:  # checked before anything loads, as the node does
        raise ValueError(f"interact needs the interact weights (--variant interact); the {variant} "
                         "T2V weights were not trained with its conditions. To continue a video with them, use "
                         "`extend`.")
    prompts = args.prompts or [args.prompt]
    if args.prompts_file:
        if args.prompts:
            raise ValueError("give the clips' prompts with --prompts or with --prompts-file, not both")
        text = C.read_text(args.prompts_file, "--prompts-file")
        if args.skip_first_line:
            caption, prompts = I.prompt_file_clips(text)
            logger.info("%s: line 1 captions the reference video (official prompt.txt layout), not generated: %r",
                        args.prompts_file, caption)
        else:
            prompts = I.prompt_lines(text)
        if not prompts:
            more = " after the reference video's caption (line 1)" if args.skip_first_line else ""
            raise ValueError(f"{args.prompts_file} holds no clip prompt{more}: write one prompt per line, a clip each")
    elif args.skip_first_line:
        raise ValueError("--skip-first-line applies to --prompts-file; give the prompt file too")
    _check_media(args)
    texts = s.texts(prompts, args.negative_prompt, 5, closing=False)  # the interact script's decoration
    if args.tokens:
        story = P.Tokens.load(args.tokens)
        _warn_resolution_ignored(asked, args.tokens, story)
    elif args.video:
        from .video_io import read_video_clip

        fit = I.start_fit(args.resolution, args.aspect)  # a 4K reference is held at the output's size
        tail, _ = read_video_clip(args.video, I.START_FRAMES, 5, from_end=True, fit=fit)  # as the interact script
        story = I.start(s.tokenizer(), tail, pn=args.resolution, aspect=args.aspect or fit.aspect, seed=args.seed)
    else:
        raise ValueError("interact needs --video REF.mp4 (its last 5 s start the story) or --tokens FILE")
    I.check_story(story)
    schedule = I.clip_schedule(story.pn, story.h_div_w)
    transformer = s.transformer(schedule)
    guidance = s.guidance(use_apg=args.apg)
    started = story.frames
    for i, text in enumerate(texts):
        bar = _Progress(schedule.num_steps, f"clip {i + 1}/{len(texts)}")
        try:
            story = I.continue_story(transformer, text, story, seed=args.seed, guidance=guidance, tau=args.tau,
                                     generator=args.generator, callback=bar, attn_backend=args.attention,
                                     offload_kv=P.OFFLOAD_KV_CHOICES[args.offload_kv], compile=args.compile)
        finally:
            bar.close()
    del transformer
    return s.write(dataclasses.replace(story, kept_frames=started), args.out)  # every clip of this run is new


def _run_decode(args) -> Path:
    """Tokens file -> mp4 / PNG with the video tokenizer alone (the CLI's Load Tokens -> Decode)."""
    from .checkpoint import check_tokenizer_file, load_tokenizer
    from .download import VAE_FILE

    tokens = P.Tokens.load(args.tokens)
    args.out = C.output_path(args.out or "out", not tokens.is_video, is_default=args.out is None,
                             kind="an image's tokens" if not tokens.is_video else "a video's tokens")
    if args.new_only and not tokens.kept_frames:
        print(f"note: {args.tokens} continues nothing (all its frames are new); --new-only writes them all",
              file=sys.stderr)
    if args.vae:
        path = Path(args.vae)
        if path.is_dir():
            raise ValueError(f"--vae {path} is a folder; give the tokenizer file ({VAE_FILE}), or the models folder "
                             "as --models")
        if not path.exists():
            raise FileNotFoundError(f"--vae {path}: no such file")
    elif args.tiny:
        path = _ensure_tiny(args.tiny_seed) / VAE_FILE
    else:
        path = Path(args.models) / VAE_FILE  # one tokenizer for every variant
        if not path.is_file():
            raise FileNotFoundError(f"no video tokenizer at {path}: give --vae FILE (--tiny for tokens made with "
                                    "--tiny or demo), or download it (0.7 GB) with `python -m infinitystar download "
                                    f"--components vae --dest {args.models}`")
    check_tokenizer_file(path)
    device = C.device(args.device)
    tokenizer = load_tokenizer(path, device=device)
    return decode_to_file(tokenizer, tokens, args.out, memory_budget=decode_budget(device), tiled=args.tiled,
                          new_clips=args.new_only, last_clip=args.last_clip)


def tolerant_output() -> None:
    """Print what the console cannot encode as escapes: a redirected stdout on Windows is cp1252 (strict), which
    has no ≈ (help texts, --steps-preview), and the portable build's Python ignores PYTHONIOENCODING."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    tolerant_output()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        if args.command in ("generate", "demo", "extend", "interact"):
            C.check_sources(args)
            if not getattr(args, "steps_preview", False):  # a preview writes nothing
                is_image = args.command in ("generate", "demo") and args.duration == 0
                name = args.out or ("demo" if args.command == "demo" else "out")
                args.out = C.output_path(name, is_image, is_default=args.out is None)
                args.save_tokens = C.tokens_path(args.save_tokens)
                C.check_outputs(args.out, args.save_tokens)
        if args.command in ("generate", "demo"):
            out = _run_generate(args)
        elif args.command == "extend":
            out = _run_extend(args)
        elif args.command == "interact":
            out = _run_interact(args)
        elif args.command == "decode":
            out = _run_decode(args)
        elif args.command == "download":
            paths = download_models(args.dest, args.variant, args.components, local_source=args.local_source)
            for name, path in paths.items():
                print(f"{name:13s} {path}")
            return 0
        elif args.command in ("convert-gguf", "convert-text-encoder", "convert"):
            from . import convert, gguf

            # a folder that is a file, or read-only: said before anything is read (convert-text-encoder writes a folder)
            C.check_writable(str(Path(args.out) / "config.json") if args.command == "convert-text-encoder" else args.out,
                             "the output")

            write = {"convert-gguf": lambda progress: gguf.convert(args.source, args.out, args.type, args.variant,
                                                                     progress=progress),
                     "convert-text-encoder": lambda progress: convert.convert_text_encoder(
                         args.source, args.out, args.dtype, progress=progress),
                     "convert": lambda progress: convert.convert_safetensors(args.source, args.out, args.dtype,
                                                                             args.variant, progress=progress)}
            bar = _Progress(None, f"writing {getattr(args, 'type', None) or args.dtype}", unit="tensor")  # shown
            try:  # from the first tensor written, after the checks passed
                written = write[args.command](lambda done, total: bar(done - 1, total))
            finally:
                bar.close()
            print(written)
            return 0
        else:
            from .tiny import main as tiny_main

            return tiny_main([args.outdir, "--seed", str(args.seed), *(["--force"] if args.force else [])])
    except (OSError, ValueError, RuntimeError) as exc:  # OSError: FileNotFoundError, PermissionError, ...
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if out is not None:
        print(out)
    return 0
