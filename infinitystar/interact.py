"""InfinityStar-Interact: a long video made 5 s at a time, each clip with its own prompt (spec §6.3).

The interact checkpoint (official ``ar_infer_infinity_star_interact``, ``tools/infer_interact_480p.py``) continues
a video clip by clip. A new clip is ONE pyramid of 20 latent frames (no image pyramid first) whose scale positions
restart at 0 and whose frames sit at 0..19. It does not read the previous clip's last scale (the released T2V
models' spacetime-sparse attention); every step reads the text and two *prefix conditions* built once per clip from
the last 21 latent frames (the *context*):

- semantic: the context's last 20 frames, area-resized to the clip's scale 7, at scale position 800, frames 1..20;
- detail: the story's first latent frame and the context's last two, full size, at scale position 801, frames
  0, 19, 20.

Those condition steps attend only to themselves, like the text step. The official script's settings: 480p
(0.40M), plain CFG 3, tau 0.5 for every scale, repetitions [3]*12 + [2, 1], one seed re-used for every clip, and
the first context is the tokenizer's raw (unquantized) latent of the last 81 frames of a reference video. A clip
is decoded after the last 20 latent frames of its context (40 latent frames) and its last 80 frames are kept.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .guidance import GuidanceConfig
from .sampler import PrefixCondition, SampleResult, TextCondition
from .schedule import (
    DETAIL_DIM,
    FRAMES_PER_CLIP,
    PIXEL_FRAMES_PER_CLIP,
    SEMANTIC_DIM,
    ScaleStep,
    Schedule,
    _parse_pn,
    build_schedule,
)

SEMANTIC_KEY = "semantic_condition"
DETAIL_KEY = "detail_condition"
SEMANTIC_SCALE = 7  # the semantic condition is resized to this scale of the clip pyramid
DETAIL_FRAMES = (18, 19)  # frames of the context's last 20 that the detail condition keeps (its last two)
SEMANTIC_POS, DETAIL_POS = 800, 801  # RoPE scale positions of the conditions
CONTEXT_LATENTS = 1 + FRAMES_PER_CLIP  # 21 latent frames = the 81-frame window a clip continues
START_FRAMES = 1 + PIXEL_FRAMES_PER_CLIP  # the reference frames a story starts from (its last 81)
PN = "0.40M"  # the interact checkpoint's resolution class (480p)
GUIDANCE = GuidanceConfig(scale=3.0, use_apg=False)  # official: use_cfg=1, cfg=3
TAU = 0.5
KIND = "interact"  # ``Tokens.kind`` of a story: the latent chain, decoded window by window
T2V_VARIANTS = ("720p", "480p")  # released weights not trained with the prefix conditions
STORY_PNS = (PN, "0.25M", "0.06M")  # 480p, where the interact weights were trained, and the draft sizes below it


def prompt_lines(text: str) -> list[str]:
    """A story's prompts: one per non-empty line, stripped. (The official script's prompt.txt also starts with a
    line that captions its reference video, which it does not generate: ``prompt_file_clips`` drops it.)"""
    return [line.strip() for line in text.splitlines() if line.strip()]


def prompt_file_clips(text: str) -> tuple[str, list[str]]:
    """(caption, clip prompts) of a prompt file in the official prompt.txt layout: line 1 captions the reference
    video, which the official script encodes but does not generate (blank or not); each later non-empty line is a
    new clip."""
    lines = text.splitlines()
    if not lines:
        return "", []
    return lines[0].strip(), prompt_lines("\n".join(lines[1:]))  # line 1 is the caption even when blank


def clip_schedule(pn: str = PN, aspect: str | float = 9 / 16) -> Schedule:
    """The schedule of one interact clip: the video pyramid of ``pn`` (t = 20 for every scale), repetitions of the
    pn's video clips, scale positions from 0, frames [0, 20), no reference scales (the conditions replace them)."""
    full = build_schedule(pn, aspect, 1 + PIXEL_FRAMES_PER_CLIP)
    n = full.scales_per_clip
    if n <= SEMANTIC_SCALE:
        raise ValueError(f"the interact model needs at least {SEMANTIC_SCALE + 1} scales per clip; {pn} has {n}")
    scales = full.scales[n:]
    steps, real_sid = [], 0
    for si, (t, h, w) in enumerate(scales):
        reps = full.video_repetition[si]
        d = SEMANTIC_DIM if si < full.semantic_scales else DETAIL_DIM
        for rep in range(reps):
            steps.append(ScaleStep(len(steps), si, rep, real_sid + rep, 0, t, h, w, d, rep == reps - 1, 0, t, ()))
        real_sid += reps
    return Schedule(tuple(scales), tuple(steps), full.pn, full.h_div_w, full.height, full.width,
                    PIXEL_FRAMES_PER_CLIP, FRAMES_PER_CLIP, n, full.semantic_scales, full.detail_scale_min_tokens, 1,
                    full.video_repetition, full.video_repetition)


def conditions(context: torch.Tensor, first_frame: torch.Tensor, schedule: Schedule) -> list[PrefixCondition]:
    """The semantic and detail conditions of a clip from the context (1, 64, 21, H, W) and the story's first
    latent frame (1, 64, 1, H, W), both fp32 summed codes (or raw latents)."""
    from .bsq import downsample_accumulator

    _, H, W = schedule.scales[-1]
    if context.dim() != 5 or context.shape[2] != CONTEXT_LATENTS or tuple(context.shape[-2:]) != (H, W):
        raise ValueError(f"interact context must be (1, 64, {CONTEXT_LATENTS}, {H}, {W}) latent frames, got "
                         f"{tuple(context.shape)}")
    if first_frame.dim() != 5 or first_frame.shape[2] != 1 or tuple(first_frame.shape[-2:]) != (H, W):
        raise ValueError(f"interact first frame must be (1, 64, 1, {H}, {W}), got {tuple(first_frame.shape)}")
    last = context[:, :, 1:].float()
    _, h, w = schedule.scales[SEMANTIC_SCALE]
    semantic = downsample_accumulator(last, (FRAMES_PER_CLIP, h, w))
    detail = torch.cat([first_frame.float().to(last.device), last[:, :, list(DETAIL_FRAMES)]], dim=2)
    return [PrefixCondition(SEMANTIC_KEY, semantic, SEMANTIC_POS, tuple(range(1, 1 + FRAMES_PER_CLIP))),
            PrefixCondition(DETAIL_KEY, detail, DETAIL_POS, (0, *(f + 1 for f in DETAIL_FRAMES)))]


def condition_tokens(schedule: Schedule) -> int:
    """Tokens of the two prefix conditions (every step reads their K/V, like the text's)."""
    _, h, w = schedule.scales[SEMANTIC_SCALE]
    _, H, W = schedule.scales[-1]
    return FRAMES_PER_CLIP * h * w + (1 + len(DETAIL_FRAMES)) * H * W


def sample_clip(model, text: TextCondition, context: torch.Tensor, first_frame: torch.Tensor, schedule: Schedule,
                *, seed: int, guidance: GuidanceConfig = GUIDANCE, tau: float = TAU, **sample_kwargs) -> SampleResult:
    """Sample one clip (its accumulator is ``result.summed_codes``, (1, 64, 20, H, W)); ``sample_kwargs`` go to
    :func:`infinitystar.sampler.sample` (generator_device, compute_dtype, attention, callback, ...)."""
    from .sampler import sample

    return sample(model, text, schedule, seed=seed, guidance=guidance, tau_image=tau, tau_video=tau,
                  conditions=conditions(context, first_frame, schedule), **sample_kwargs)


# ---------------------------------------------------------------------------------------------- stories

def check_story(tokens) -> None:
    """Raise ValueError unless ``tokens`` can be continued: a video of 1 + 20k latent frames (k >= 1)."""
    latents = tokens.summed_codes.shape[2] if tokens.summed_codes.dim() == 5 else 0
    if not tokens.is_video or latents < CONTEXT_LATENTS or (latents - 1) % FRAMES_PER_CLIP:
        raise ValueError(f"interact continues a video of at least 81 frames (5 s); these tokens hold {tokens.frames} "
                         f"frame(s) ({latents} latent frames). Start from InfinityStar Interact Start (a reference "
                         "video) or from a generated or encoded video")
    if _parse_pn(tokens.pn) not in STORY_PNS:  # a saved file may name its size by an alias (480p)
        size = tokens.schedule()
        raise ValueError(f"these tokens are at {tokens.pn} ({size.width}x{size.height}); the interact weights were "
                         f"trained at 480p ({PN}), and stories run at {', '.join(STORY_PNS)} only. Start the story "
                         "from the video at 480p (Interact Start, or Encode with resolution 480p), or continue these "
                         "tokens with Extend and the T2V weights")
    if tokens.kind != KIND and len(tokens.bits) != tokens.schedule().num_steps:
        raise ValueError("these tokens are a partial generation; only complete videos can be continued")


def start_schedule(frames, pn: str = PN, aspect: str | float | None = None) -> Schedule:
    """The clip schedule a story started from ``frames`` (T, H, W, 3) uses; refuses a reference shorter than 5 s."""
    if len(frames) < START_FRAMES:
        raise ValueError(f"interact needs a reference video of at least {START_FRAMES} frames (5 s at 16 fps); got "
                         f"{len(frames)}")
    return clip_schedule(pn, frames.shape[1] / frames.shape[2] if aspect is None else aspect)


def start_fit(pn: str = PN, aspect: str | float | None = None):
    """A ``vae.FrameFit`` for a reference's frames: each is fitted, as it is read, to the size :func:`start` gives it
    (the aspect template nearest the frames' own unless given); pass ``aspect or fit.aspect`` to :func:`start`."""
    from .vae import FrameFit

    def size_of(height: int, width: int) -> tuple[int, int]:
        schedule = clip_schedule(pn, height / width if aspect is None else aspect)
        return schedule.height, schedule.width
    return FrameFit(size_of)


def start(tokenizer, frames, *, pn: str = PN, aspect: str | float | None = None, seed: int = 0,
          callback: Callable[[int, int], None] | None = None):
    """A story from a reference video: the tokenizer's raw latent of its last 81 frames (16 fps, uint8 (T, H, W, 3)
    RGB). The aspect template is the nearest to the frames' own unless given. Returns ``Tokens`` of kind
    ``"interact"`` (no bits; ``summed_codes`` is the latent chain)."""
    from .pipeline import Tokens
    from .vae import fit_video

    schedule = start_schedule(frames, pn, aspect)
    frames = frames[len(frames) - START_FRAMES:]
    pixels = fit_video(frames, schedule.height, schedule.width)  # uint8: [-1, 1] chunk by chunk
    generator = torch.Generator("cpu").manual_seed(int(seed))
    latent = tokenizer.encode_latent(pixels, generator=generator, callback=callback)  # chunks go to its device
    return Tokens([], latent.float().cpu(), schedule.pn, schedule.h_div_w, START_FRAMES, seed, kind=KIND)


def continue_story(transformer, text: TextCondition, tokens, *, seed: int, guidance: GuidanceConfig = GUIDANCE,
                   tau: float = TAU, generator: str = "auto", **sample_kwargs):
    """Append one clip (80 frames) to a story (or to any complete video's tokens) under the prompt ``text``."""
    from .pipeline import Tokens, resolve_generator_device

    check_story(tokens)
    schedule = clip_schedule(tokens.pn, tokens.h_div_w)
    chain = tokens.summed_codes.float()
    if tuple(chain.shape[-2:]) != tuple(schedule.scales[-1][1:]):
        raise ValueError(f"tokens are {tuple(chain.shape[-2:])} latent cells, the {tokens.pn} schedule expects "
                         f"{schedule.scales[-1][1:]}")
    result = sample_clip(transformer, text, chain[:, :, -CONTEXT_LATENTS:], chain[:, :, :1], schedule, seed=seed,
                         guidance=guidance, tau=tau,
                         generator_device=resolve_generator_device(generator, transformer), **sample_kwargs)
    new = result.summed_codes.float().cpu()
    return Tokens([], torch.cat([chain.cpu(), new], dim=2), tokens.pn, tokens.h_div_w,
                  tokens.frames + PIXEL_FRAMES_PER_CLIP, seed, kind=KIND, kept_frames=tokens.frames)


def decode_windows(latents: int) -> list[tuple[int, int]]:
    """Latent windows [start, end) a story is decoded in: the first 21 frames, then each clip after the last 20
    frames of its context (the official script decodes the context without its first frame, then the clip)."""
    out = [(0, CONTEXT_LATENTS)]
    for start_ in range(1, latents - CONTEXT_LATENTS + 1, FRAMES_PER_CLIP):
        out.append((start_, start_ + 2 * FRAMES_PER_CLIP))
    return out


def decode(tokenizer, tokens, *, memory_budget: int | None = None, tiled: bool = False,
           callback: Callable[[int, int], None] | None = None, last_clip: bool = False, first_frame: int = 0,
           max_chunk_latents: int | None = None) -> torch.Tensor:
    """Story -> float frames (T, H, W, 3) in [0, 1] on CPU: the first window whole, then of each later window
    (a clip decoded after 20 frames of its context, as the official script) its last 80 frames. The windows are
    independent, so ``last_clip`` decodes only the last one: the newest clip's frames, the tail of a full decode;
    ``first_frame`` (a clip boundary) skips the windows of the frames before it."""
    from .pipeline import _tokenizer_device
    from .vae import first_frame_rule

    device = _tokenizer_device(tokenizer)
    windows = list(enumerate(decode_windows(tokens.summed_codes.shape[2])))
    if last_clip:
        windows = windows[-1:]
    # window 0 gives frames [0, 81), window i > 0 the 80 frames after 1 + 80 i
    windows = [(i, w) for i, w in windows if 1 + PIXEL_FRAMES_PER_CLIP * (i + 1) > first_frame]
    # the story's frames, filled window by window: never each window whole (a kept slice would hold its window)
    # nor the parts and their concatenation at once
    sizes = [1 + PIXEL_FRAMES_PER_CLIP - first_frame if i == 0 else PIXEL_FRAMES_PER_CLIP for i, _ in windows]
    out, at = None, 0
    for done, ((i, (a, b)), size) in enumerate(zip(windows, sizes), start=1):
        # of a later window, only its clip is kept (the context before it is decoded, not held)
        codes = tokens.summed_codes[:, :, a:b].to(device)
        skip = first_frame if i == 0 else tokenizer.config.pixel_frames(codes.shape[2]) - PIXEL_FRAMES_PER_CLIP
        images = tokenizer.decode(codes, memory_budget=memory_budget, tiled=tiled, max_chunk_latents=max_chunk_latents,
                                  images_to="cpu", first_frame=skip)
        del codes
        if not skip:
            first_frame_rule(images)
        if out is None:
            out = images.new_empty((sum(sizes), *images.shape[1:]))
        out[at:at + size] = images
        at += size
        del images
        if callback is not None:
            callback(done, len(windows))
    return out
