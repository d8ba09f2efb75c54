"""T2V, T2I, I2V, V2V and clip extension built from the core pieces; the one API the CLI and the nodes share.

- ``resolve_schedule`` turns a resolution, aspect and duration into a :class:`Schedule` and checks the duration
  against what the loaded weights were trained for (spec §5.4: 720p 5 s only, 480p 5 or 10 s).
- ``encode_image`` / ``encode_video`` run the tokenizer and the multi-scale BSQ encode (spec §6.1, §6.2) and give
  the :class:`Tokens` that ``generate`` teacher-forces (the official ``gt_leak``).
- ``extend`` appends 20-latent-frame clips to existing tokens: earlier clips are not re-sampled, only the last
  step of each is replayed to rebuild the reference K/V chain (each clip attends only to the previous clip's
  last scale, spec §6.3).
- ``decode`` turns tokens into float frames with the official post-processing.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .guidance import GuidanceConfig
from .schedule import (
    FRAMES_PER_CLIP,
    PIXEL_FRAMES_PER_CLIP,
    Schedule,
    build_schedule,
    latent_frames,
    num_video_clips,
)

logger = logging.getLogger(__name__)

FPS = 16
TOKENS_FORMAT = "infinitystar-tokens"
TOKENS_VERSION = "1"
TRAINED_DURATIONS = {"720p": (0, 5), "480p": (0, 5, 10)}  # seconds the released models were trained for
TRAINED_SECONDS = max(max(d) for d in TRAINED_DURATIONS.values())  # the longest: 10 s (longer keeps the 10 s tag)
VARIANT_RESOLUTION = {"720p": "720p", "480p": "480p", "interact": "480p"}  # what each set of weights was trained at
RESOLUTIONS = {"720p": "0.90M", "480p": "0.40M"}
GENERATOR_CHOICES = ("auto", "cpu", "cuda")
TOKEN_KINDS = ("generation", "interact")
OFFLOAD_KV_CHOICES = {"auto": "auto", "on": True, "off": False}  # option word -> sampler's offload_kv


@functools.lru_cache(maxsize=1 << 16)  # one entry per version of a file: an output folder's thousands stay cached
def _is_tokens_header(path: str, mtime_ns: int, size: int) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format") == TOKENS_FORMAT
    except Exception:  # not safetensors, unreadable, truncated: not something to offer
        return False


@dataclass
class Tokens:
    """Bits of every step of a (possibly partial) generation plus the summed codes the tokenizer decodes.

    bits: per step, uint8 (1, t, h, w, d) on CPU, in schedule order. summed_codes: (1, 64, T, H, W) fp32.
    ``pn``/``h_div_w``/``frames`` rebuild the schedule these bits belong to.
    """

    bits: list[torch.Tensor]
    summed_codes: torch.Tensor
    pn: str
    h_div_w: float
    frames: int  # pixel frames (1 for an image)
    seed: int | None = None
    kind: str = "generation"  # or "interact": a story's latent chain, no bits (infinitystar.interact)
    kept_frames: int = 0  # leading frames carried over from the tokens this generation continued (0: all new)

    def schedule(self) -> Schedule:
        return build_schedule(self.pn, self.h_div_w, self.frames)

    @property
    def is_video(self) -> bool:
        return self.frames > 1

    @property
    def clips(self) -> int:
        """Video clips of 80 frames after the image clip (the last one partial in a length between whole clips)."""
        return num_video_clips(self.frames)

    @property
    def ends_in_partial_clip(self) -> bool:
        """A 1 to 4 s video: its one clip is shorter than 5 s, so nothing continues it."""
        return (self.frames - 1) % PIXEL_FRAMES_PER_CLIP != 0

    def leading_clips(self, clips: int) -> Tokens:
        """The image clip and the first ``clips`` video clips of complete generation tokens: later clips read
        earlier ones, never the reverse, so their steps' bits and latent frames are a prefix of these."""
        if self.kind != "generation" or not 0 <= clips <= self.clips:
            raise ValueError(f"cannot take {clips} leading clip(s) of {self.kind} tokens with {self.clips}")
        if clips and clips == self.clips and self.ends_in_partial_clip:
            raise ValueError(f"these tokens are {self.frames} frames, which end in a partial clip; only whole 5 s "
                             "clips (81, 161, ... frames) start a longer generation")
        if clips == self.clips:
            return self
        short = build_schedule(self.pn, self.h_div_w, 1 + PIXEL_FRAMES_PER_CLIP * clips)
        latents = 1 + FRAMES_PER_CLIP * clips
        return Tokens(self.bits[:short.num_steps], self.summed_codes[:, :, :latents].clone(), self.pn, self.h_div_w,
                      short.frames, self.seed, kept_frames=self.kept_frames if self.kept_frames < short.frames else 0)

    def save(self, path: str | Path) -> Path:
        """Write a .safetensors file (``bits.NNN`` uint8, ``summed_codes`` fp32, schedule in the metadata)."""
        from safetensors.torch import save_file

        from .video_io import written_whole

        path = Path(path)
        tensors = {f"bits.{i:04d}": b.to(torch.uint8).contiguous().cpu() for i, b in enumerate(self.bits)}
        tensors["summed_codes"] = self.summed_codes.float().contiguous().cpu()
        meta = {"format": TOKENS_FORMAT, "version": TOKENS_VERSION, "pn": self.pn,
                "h_div_w": repr(float(self.h_div_w)), "frames": str(self.frames),
                "seed": json.dumps(self.seed), "kind": self.kind, "kept_frames": str(self.kept_frames)}
        with written_whole(path) as part:
            save_file(tensors, str(part), metadata=meta)
        return path

    @staticmethod
    def is_file_of_tokens(path: str | Path) -> bool:
        """Whether ``path`` is a tokens file (reads its header once per version of the file): to list saved tokens
        among the other files of a folder, every time ComfyUI builds the node list."""
        try:
            stat = os.stat(path)
        except OSError:
            return False
        return _is_tokens_header(str(path), stat.st_mtime_ns, stat.st_size)

    @classmethod
    def load(cls, path: str | Path) -> Tokens:
        """Read tokens written by :meth:`save` and check them against their schedule."""
        from safetensors import safe_open

        from .checkpoint_files import check_readable

        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; give a tokens .safetensors file")
        if not path.is_file():
            raise FileNotFoundError(f"tokens file not found: {path}")
        check_readable(path)
        hint = "save tokens with InfinityStar Save Tokens or `generate --save-tokens`"
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != TOKENS_FORMAT:
                    raise ValueError(f"{path} is not an InfinityStar tokens file (metadata format="
                                     f"{meta.get('format')!r}); {hint}")
                if meta.get("version") != TOKENS_VERSION:
                    raise ValueError(f"{path}: tokens format version {meta.get('version')!r}; this version of the "
                                     f"pack reads version {TOKENS_VERSION}")
                missing = [k for k in ("pn", "h_div_w", "frames", "seed") if k not in meta]
                if "summed_codes" not in f.keys() or missing:
                    raise ValueError(f"{path}: an incomplete tokens file (missing "
                                     f"{', '.join(missing or ['summed_codes'])}); {hint}")
                keys = sorted(k for k in f.keys() if k.startswith("bits."))
                # copies (a few MB): safetensors' tensors map the file, and Windows then refuses to replace, move or
                # delete it while they live (the Load Tokens cache; extend --save-tokens over its --tokens)
                bits = [f.get_tensor(k).clone() for k in keys]
                summed = f.get_tensor("summed_codes").clone()
        except ValueError:
            raise
        except Exception as e:  # safetensors' own error for a file that is no safetensors file at all
            raise ValueError(f"{path} is not a readable .safetensors tokens file ({e}); {hint}") from e
        try:
            frames = int(meta["frames"])
            latents = latent_frames(frames)
        except ValueError:
            raise ValueError(f"{path}: frames {meta['frames']!r} is no image or video length (1, 17 to 65 by 16, "
                             f"or 1 + 80k); {hint}") from None
        # checked before the schedule is built: a file's frame count cannot size it beyond what the file holds
        if summed.ndim != 5 or summed.shape[2] != latents:
            raise ValueError(f"{path}: summed_codes of shape {tuple(summed.shape)} do not hold the {latents} latent "
                             f"frames of {frames} frames; the file is damaged; {hint}")
        kept = meta.get("kept_frames", "0")  # absent in files of earlier versions: all new
        if not (kept.isdigit() and is_clip_boundary(int(kept), frames)):
            raise ValueError(f"{path}: kept_frames {kept!r} is not a clip boundary before frame {frames}; the file "
                             f"is damaged; {hint}")
        tokens = cls(bits, summed, meta["pn"], float(meta["h_div_w"]), frames, json.loads(meta["seed"]),
                     meta.get("kind", "generation"), int(kept))
        if tokens.kind not in TOKEN_KINDS:
            raise ValueError(f"{path}: unknown tokens kind {tokens.kind!r} (this version reads {TOKEN_KINDS})")
        schedule = tokens.schedule()
        check_bits(tokens.bits, schedule, f"{path}")
        cells = tuple(schedule.scales[-1][1:])
        if summed.ndim != 5 or summed.shape[:2] != (1, 64) or tuple(summed.shape[-2:]) != cells:
            raise ValueError(f"{path}: summed_codes of shape {tuple(summed.shape)} do not fit the {tokens.pn} "
                             f"schedule's (1, 64, T, {cells[0]}, {cells[1]})")
        return tokens


def is_clip_boundary(kept: int, frames: int) -> bool:
    """Whether the first ``kept`` of ``frames`` frames end at a clip (none, the image clip, or 1 + 80k) and leave
    something after them."""
    return kept == 0 or (kept < frames and (kept - 1) % PIXEL_FRAMES_PER_CLIP == 0)


def check_bits(bits: list[torch.Tensor], schedule: Schedule, what: str = "tokens") -> None:
    """Raise ValueError unless ``bits`` are the leading steps of ``schedule`` with matching shapes."""
    if len(bits) > schedule.num_steps:
        raise ValueError(f"{what}: {len(bits)} steps of bits but the schedule has only {schedule.num_steps}")
    for step, b in zip(schedule.steps, bits):
        want = (1, step.t, step.h, step.w, step.d)
        if tuple(b.shape) != want and tuple(b.shape) != want[1:]:
            raise ValueError(f"{what}: step {step.index} bits have shape {tuple(b.shape)}, the schedule "
                             f"({schedule.pn}, h/w {schedule.h_div_w}, {schedule.frames} frames) expects {want}")


# ---------------------------------------------------------------------------------------------- schedule

def frames_for_duration(duration_s: int) -> int:
    """0 -> 1 (image), 5 -> 81, 10 -> 161, ... (16 fps, whole 5 s clips)."""
    duration_s = int(duration_s)
    if duration_s < 0 or duration_s % 5:
        raise ValueError(f"duration must be 0 (image) or a multiple of 5 seconds, got {duration_s}")
    return 1 + duration_s * FPS


def allowed_durations(model_info=None) -> tuple[int, ...] | None:
    """Durations the loaded released weights were trained for; None when anything goes (tiny/unknown)."""
    if model_info is None:
        return None
    from .config import is_released_size

    if not is_released_size(model_info.config):
        return None
    return TRAINED_DURATIONS.get(model_info.variant)


def resolve_schedule(resolution: str, aspect: str | float = "16:9", duration_s: int | None = None, *,
                     frames: int | None = None, model_info=None) -> Schedule:
    """Schedule for a resolution ('720p', '480p', '0.06M' … '0.90M'), aspect ('W:H' or h/w) and a duration
    (0 = image, 5 = 81 frames, 10 = 161 frames) or an explicit pixel-frame count.

    With ``model_info`` (``checkpoint.CheckpointInfo`` of released weights) the duration is checked against what
    that model was trained for; longer videos are made with :func:`extend`.
    """
    if frames is None:
        frames = frames_for_duration(5 if duration_s is None else duration_s)
    _warn_interact_weights(model_info, "generating a new video or image (Sampler, `generate`)")
    allowed = allowed_durations(model_info)
    if allowed is not None:
        seconds = (frames - 1) // FPS
        if seconds not in allowed:
            longer = " Longer videos: generate 5 s, then extend by clips." if seconds > max(allowed) else ""
            raise ValueError(f"the {model_info.variant} model was trained for durations {list(allowed)} s only, "
                             f"not {seconds} s.{longer} The 480p model also does 10 s.")
        warn_untrained_resolution(model_info, resolution)
    return build_schedule(resolution, aspect, frames)


def _warn_interact_weights(model_info, what: str) -> None:
    if model_info is not None and model_info.variant == "interact":
        logger.warning("the interact weights were trained to continue a video clip by clip (InfinityStar Interact, "
                       "infinitystar.interact); %s with them is not what they were made for", what)


def warn_untrained_resolution(model_info, resolution: str) -> None:
    """Say so when released T2V weights run at a resolution they were not trained at (it runs, but looks worse):
    e.g. tokens encoded at the Encode node's default 720p, extended with the 480p weights."""
    from .config import is_released_size

    if model_info is None or not is_released_size(model_info.config):  # tiny / test weights are trained at nothing
        return
    if model_info.variant in RESOLUTIONS and RESOLUTIONS.get(resolution, resolution) != RESOLUTIONS[model_info.variant]:
        logger.warning("the %s model is used at resolution %s; it was trained at %s (for its own resolution, encode "
                       "or generate at %s)", model_info.variant, resolution, RESOLUTIONS[model_info.variant],
                       model_info.variant)


def _image_schedule(schedule: Schedule) -> Schedule:
    return build_schedule(schedule.pn, schedule.h_div_w, 1)


# ---------------------------------------------------------------------------------------------- encode

def _tokenizer_device(tokenizer) -> torch.device:
    return tokenizer.decoder.conv_in.conv.weight.device


def encode_host_memory(frames: int, height: int, width: int, latent_channels: int = 64) -> int:
    """System-memory bytes an encode of ``frames`` frames of height x width holds at least: the frames as 8-bit
    pixels (``vae.fit_video``) and four fp32 latent-sized tensors (posterior mean and log-variance, noise, latent).
    What a node checks before reading a long video's frames."""
    from .schedule import VAE_STRIDE

    cells = latent_frames(int(frames)) * (int(height) // VAE_STRIDE) * (int(width) // VAE_STRIDE)
    return int(frames) * int(height) * int(width) * 3 + 4 * cells * latent_channels * 4


def encode_memory(tokenizer, frames: int, height: int, width: int) -> int:
    """Bytes the tokenizer needs beyond its weights to encode ``frames`` frames of height x width (what the nodes
    ask ComfyUI to free, as ComfyUI's own VAE encode does)."""
    from .vae import estimate_encode_memory
    from .vae.model import ENCODE_DTYPE

    return estimate_encode_memory(tokenizer.config, (1, 3, int(frames), int(height), int(width)), ENCODE_DTYPE)


def _encode(tokenizer, pixels: torch.Tensor, schedule: Schedule, seed: int, callback=None) -> Tokens:
    from .vae import encode_bits

    generator = torch.Generator("cpu").manual_seed(int(seed))
    latent = tokenizer.encode_latent(pixels, generator=generator, callback=callback)  # chunks go to its device
    bits, summed = encode_bits(latent, schedule.steps)
    return Tokens([b.cpu() for b in bits], summed.cpu(), schedule.pn, schedule.h_div_w, schedule.frames, seed)


def encode_image(tokenizer, image, schedule: Schedule, *, seed: int = 0) -> Tokens:
    """Encode a conditioning image (PIL, uint8 (H, W, 3) RGB or a path) for I2V.

    The image is resized to cover and center-cropped to the schedule's size (official ``transform``); the
    posterior sample uses a CPU generator seeded with ``seed``. Returns the tokens of the image steps only.
    """
    from .vae import prepare_image

    if isinstance(image, (str, Path)):
        from .video_io import read_image

        image = read_image(image)
    target = _image_schedule(schedule)
    return _encode(tokenizer, prepare_image(image, target.height, target.width), target, seed)


def encode_size(schedule: Schedule) -> tuple[int, int]:
    """(height, width) :func:`encode_video` fits frames to for ``schedule``: its resolution and aspect template's
    full pyramid, also for a schedule cut short (``num_scales``); what to fit frames to as they are read."""
    full = build_schedule(schedule.pn, schedule.h_div_w, 1)
    return full.height, full.width


def encode_video(tokenizer, frames, schedule: Schedule, *, seed: int = 0, clips: int | None = None,
                 callback=None) -> Tokens:
    """Encode uint8 (T, H, W, 3) RGB frames (16 fps) as the first ``clips`` video clips for V2V continuation.

    ``clips`` defaults to as many whole clips (80 frames after the first) as the frames hold, at most one less
    than the schedule has. Returns the tokens of the image clip plus those clips.
    """
    from .vae import fit_video

    available = (len(frames) - 1) // PIXEL_FRAMES_PER_CLIP
    if clips is None and schedule.num_clips < 3 and available >= 1:
        raise ValueError(f"the {schedule.frames}-frame schedule leaves no clip to generate after the input's clips: "
                         "choose a duration at least 5 s longer than the input (e.g. 10 s from a 5 s video)")
    clips = min(available, schedule.num_clips - 2) if clips is None else int(clips)
    if clips < 1 or clips > available:
        raise ValueError(f"need {1 + PIXEL_FRAMES_PER_CLIP * max(clips, 1)} frames (≥ 5 s at 16 fps) to encode "
                         f"{max(clips, 1)} clip(s), got {len(frames)} frames; the schedule has "
                         f"{schedule.num_clips - 1} video clip(s)")
    target = build_schedule(schedule.pn, schedule.h_div_w, 1 + PIXEL_FRAMES_PER_CLIP * clips)
    pixels = fit_video(frames[: target.frames], target.height, target.width)  # uint8: [-1, 1] chunk by chunk
    return _encode(tokenizer, pixels, target, seed, callback)


# ---------------------------------------------------------------------------------------------- generate

def resolve_generator_device(choice: str, transformer) -> str:
    """Device type of the generator the bits are drawn from.

    "auto" follows the transformer: a CUDA generator on a CUDA model, as the official sampler does (no
    device->host copy per step, same bits as the official code on the same GPU), else "cpu". "cpu" gives the same
    bits for the same logits on any device.
    """
    choice = str(choice).lower()
    if choice not in GENERATOR_CHOICES:
        raise ValueError(f"generator must be one of {list(GENERATOR_CHOICES)}, got {choice!r}")
    if choice == "auto":
        from .sampler import model_device

        return "cuda" if model_device(transformer).type == "cuda" else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("generator 'cuda' was asked for but CUDA is not available; use 'auto' or 'cpu'")
    return choice


def check_condition(condition: Tokens, schedule: Schedule) -> None:
    """Refuse I2V/V2V tokens that cannot start ``schedule`` (callers check before loading the transformer)."""
    if condition.kind != "generation":
        raise ValueError(f"conditioning tokens are an {condition.kind} story; I2V/V2V need the tokens of an encoded "
                         "image or video (InfinityStar Encode)")
    if condition.pn != schedule.pn or abs(condition.h_div_w - schedule.h_div_w) > 1e-9:
        raise ValueError(f"conditioning tokens are for {condition.pn} h/w {condition.h_div_w}, the generation is "
                         f"{schedule.pn} h/w {schedule.h_div_w}; encode the condition with the same schedule")
    if condition.frames >= schedule.frames and schedule.frames > 1:
        raise ValueError(f"conditioning tokens already cover {condition.frames} frames; nothing left to generate "
                         f"in a {schedule.frames}-frame schedule")
    check_bits(condition.bits, schedule, "conditioning tokens")


def generate(transformer, text, schedule: Schedule, *, seed: int, guidance: GuidanceConfig = GuidanceConfig(),
             tau_image: float = 1.0, tau_video: float = 0.4, condition: Tokens | None = None,
             callback: Callable | None = None, compute_dtype: torch.dtype | None = None, generator: str = "auto",
             **sample_kwargs) -> Tokens:
    """Sample every step of ``schedule`` (T2V, T2I; I2V/V2V when ``condition`` holds the leading steps' bits,
    which are teacher-forced while every step still draws, as the official sampler does).

    ``generator``: "auto", "cpu" or "cuda", see :func:`resolve_generator_device`.
    """
    from .sampler import sample

    teacher = None
    if condition is not None:
        check_condition(condition, schedule)
        teacher = condition.bits
    result = sample(transformer, text, schedule, seed=seed, guidance=guidance, tau_image=tau_image,
                    tau_video=tau_video, teacher_bits=teacher, callback=callback, compute_dtype=compute_dtype,
                    generator_device=resolve_generator_device(generator, transformer), **sample_kwargs)
    return Tokens(result.bits, result.summed_codes.float().cpu(), schedule.pn, schedule.h_div_w, schedule.frames,
                  seed, kept_frames=condition.frames if condition is not None else 0)


def extension_schedule(tokens: Tokens, clips: int, model_info=None) -> Schedule:
    """The schedule of ``tokens`` extended by ``clips`` clips; refuses tokens Extend cannot continue (callers check
    this before loading the transformer). With ``model_info`` a resolution the weights were not trained at is
    reported."""
    if clips < 1:
        raise ValueError(f"clips must be ≥ 1, got {clips}")
    if tokens.kind != "generation":
        raise ValueError(f"these tokens are an {tokens.kind} story (interact model); continue them with InfinityStar "
                         "Interact (node) or `python -m infinitystar interact --tokens FILE`, not Extend")
    if tokens.ends_in_partial_clip:
        raise ValueError(f"these tokens are {tokens.frames} frames, which end in a partial clip; Extend continues "
                         "videos of whole 5 s clips (81, 161, ... frames)")
    old = tokens.schedule()
    if len(tokens.bits) != old.num_steps:
        raise ValueError(f"tokens hold {len(tokens.bits)} of {old.num_steps} steps; only complete generations "
                         "can be extended")
    warn_untrained_resolution(model_info, tokens.pn)
    _warn_interact_weights(model_info, "extending a generation")
    return build_schedule(tokens.pn, tokens.h_div_w, tokens.frames + PIXEL_FRAMES_PER_CLIP * int(clips))


SEED_STEP = 0x9E3779B97F4A7C15  # 2**64 / the golden ratio: the seeds of consecutive clips lie far apart


def clip_seed(seed: int, clips_before: int) -> int:
    """The seed an Extend draws from: ``seed`` moved by the number of whole clips the video holds already. Extend
    draws nothing for the earlier clips, so from ``seed`` itself each link of a chain Extend -> Extend with one
    seed would redraw the same random numbers at the same places (consecutive clips' bits 93-97% alike with
    random weights, against about half for two seeds); a chain still gives the same video for the same seeds."""
    return (int(seed) + int(clips_before) * SEED_STEP) % 2**64


def extend(transformer, text, tokens: Tokens, clips: int = 1, *, seed: int,
           guidance: GuidanceConfig = GuidanceConfig(), tau_image: float = 1.0, tau_video: float = 0.4,
           callback: Callable | None = None, compute_dtype: torch.dtype | None = None, generator: str = "auto",
           **sample_kwargs) -> Tokens:
    """Append ``clips`` video clips (80 frames each) to complete ``tokens`` (a video or an image).

    Earlier clips are kept bit for bit; only their last steps are replayed to rebuild the reference chain, so
    the cost is one forward per previous clip plus the new clips' steps. The models were trained up to 10 s.
    ``generator``: "auto", "cpu" or "cuda", see :func:`resolve_generator_device`. The draws come from
    :func:`clip_seed`; the tokens record ``seed``.
    """
    from .sampler import sample

    schedule = extension_schedule(tokens, clips)
    before = (tokens.frames - 1) // PIXEL_FRAMES_PER_CLIP  # 0 for image tokens
    result = sample(transformer, text, schedule, seed=clip_seed(seed, before), guidance=guidance, tau_image=tau_image,
                    tau_video=tau_video, prefix_bits=tokens.bits, callback=callback, compute_dtype=compute_dtype,
                    generator_device=resolve_generator_device(generator, transformer), **sample_kwargs)
    return Tokens(result.bits, result.summed_codes.float().cpu(), schedule.pn, schedule.h_div_w, schedule.frames,
                  seed, kept_frames=tokens.frames)


# ---------------------------------------------------------------------------------------------- decode

def decode_shape(tokens: Tokens) -> tuple[int, ...]:
    """Shape of the largest latent block one decode call sees (a story decodes window by window)."""
    shape = tuple(tokens.summed_codes.shape)
    if tokens.kind == "interact":
        from .interact import decode_windows

        longest = max(b - a for a, b in decode_windows(shape[2]))
        return (*shape[:2], longest, *shape[3:])
    return shape


def decode(tokenizer, tokens: Tokens, *, memory_budget: int | None = None, tiled: bool = False,
           callback: Callable | None = None, last_clip: bool = False, new_clips: bool = False,
           max_chunk_latents: int | None = None) -> torch.Tensor:
    """Tokens -> float frames (T, H, W, 3) in [0, 1] on CPU, with the official frame-0 := frame-1 for videos.

    ``frames * 255`` truncated to uint8 equals the official output pixels of an fp32 decode. After a bf16 decode
    the post-processing still runs in fp32, where the official code rounds it to bf16 (one level lower or higher
    in about a tenth of the pixels there); ours keeps the more exact values. ``last_clip``: only the last clip's
    frames (80; a 5 s video or an image whole): a story decodes just its last window, other tokens decode whole.
    ``new_clips``: only the frames after ``tokens.kept_frames`` (what the last Extend / Interact / V2V added).
    ``max_chunk_latents`` caps the chunks ``memory_budget`` allows (see ``VideoTokenizer.decode``).
    """
    from .vae import first_frame_rule

    if tokens.kind == "interact":
        from .interact import decode as decode_story

        return decode_story(tokenizer, tokens, memory_budget=memory_budget, tiled=tiled, callback=callback,
                            last_clip=last_clip, first_frame=tokens.kept_frames if new_clips else 0,
                            max_chunk_latents=max_chunk_latents)
    first = tokens.kept_frames if new_clips else 0
    if last_clip and tokens.frames > 1 + PIXEL_FRAMES_PER_CLIP:
        first = max(first, tokens.frames - PIXEL_FRAMES_PER_CLIP)
    codes = tokens.summed_codes.to(_tokenizer_device(tokenizer))
    # the frames before ``first`` are decoded (the causal decoder reads every earlier latent), not kept
    frames = tokenizer.decode(codes, memory_budget=memory_budget, tiled=tiled, callback=callback,
                              max_chunk_latents=max_chunk_latents, images_to="cpu", first_frame=first)
    return first_frame_rule(frames) if tokens.is_video and not first else frames
