"""Scale schedules of the official ``infinity_elegant_clip20frames_v2`` layout (spec §3.4, §2.4, §5.3).

A schedule is the image pyramid (t = 1) followed by one pyramid with t = 20 latent frames per
video clip (fewer in a video under 5 s). Every scale is predicted several times ("repetitions");
one AR *step* is one (scale, repetition) pair. Video scales attend to the last scale of the previous clip.
Everything here is derived from the rules; tests compare it with the golden manifests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

VAE_STRIDE = 16  # pixels per latent cell
FRAMES_PER_CLIP = 20  # latent frames in one video clip
PIXEL_FRAMES_PER_CLIP = 4 * FRAMES_PER_CLIP  # 80 pixel frames (temporal compression 4)
PIXEL_FRAMES_PER_SECOND = 16  # the official table's step: one second
SEMANTIC_DIM = 16
DETAIL_DIM = 64
BASE_SIDES = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32, 40, 60)
# h/w of the eight base aspect templates; all but 1.0 are also used transposed -> 15 templates
BASE_RATIOS = (1.0, 100 / 116, 3 / 4, 2 / 3, 9 / 16, 1 / 2, 2 / 5, 1 / 3)
PN_SCALES = {"0.06M": 11, "0.25M": 13, "0.40M": 14, "0.90M": 15}
PN_ALIASES = {"720p": "0.90M", "480p": "0.40M"}
# Detail (64-bit) scales start with the third-to-last scale of a clip; the released scripts
# (and the golden tiny cases) pair that with these token thresholds of the tokenizer side. No script runs 0.25M:
# its value is one that names the same scales for every aspect (h*w 136-152 semantic, 250-260 detail).
DETAIL_MIN_TOKENS = {"0.06M": 80, "0.25M": 200, "0.40M": 350, "0.90M": 750}
# Video repetitions end in a short tail; the 480p model (0.40M) uses the 720p list without its
# final scale, i.e. [3]*12 + [2, 1]; the others end in [2, 1, 1].
VIDEO_REPETITION_TAIL = {"0.06M": (2, 1, 1), "0.25M": (2, 1, 1), "0.40M": (2, 1), "0.90M": (2, 1, 1)}
IMAGE_REPETITION = 3
ASPECT_NAMES = {"1:1": 1.0, "16:9": 9 / 16, "9:16": 16 / 9, "4:3": 3 / 4, "3:4": 4 / 3, "3:2": 2 / 3,
                "2:3": 3 / 2, "2:1": 1 / 2, "1:2": 2.0, "5:2": 2 / 5, "2:5": 5 / 2, "3:1": 1 / 3, "1:3": 3.0}


@dataclass(frozen=True)
class ScaleStep:
    """One AR step: repetition ``rep`` of scale ``si`` (global scale index over all clips)."""

    index: int  # step counter, 0-based, text step not counted
    si: int  # scale index over the whole schedule
    rep: int  # repetition index within the scale
    real_sid: int  # global step counter incl. repetitions; RoPE scale position = 512 + real_sid
    clip: int  # 0 = image clip, 1.. = video clips of 20 latent frames
    t: int
    h: int
    w: int
    d: int  # bits per token: 16 (semantic head) or 64 (detail head)
    is_last_rep: bool  # the KV cache of a scale is stored only at its last repetition
    frame_ss: int  # latent frames [frame_ss, frame_ee) of the clip (RoPE frame axis)
    frame_ee: int
    ref_sids: tuple[int, ...]  # scales whose cached K/V this step attends to (besides text)

    @property
    def is_semantic(self) -> bool:
        return self.d == SEMANTIC_DIM

    @property
    def num_tokens(self) -> int:
        return self.t * self.h * self.w


@dataclass(frozen=True)
class Schedule:
    """The whole AR schedule of one generation."""

    scales: tuple[tuple[int, int, int], ...]  # (t, h, w) of every scale, all clips
    steps: tuple[ScaleStep, ...]
    pn: str
    h_div_w: float  # the aspect template (key of the official template table)
    height: int  # output pixels
    width: int
    frames: int  # output pixel frames (1 for an image)
    latent_frames: int
    scales_per_clip: int
    semantic_scales: int  # scales of a clip with index < this use the 16-bit semantic head
    detail_scale_min_tokens: int
    num_clips: int  # including the image clip 0
    image_repetition: tuple[int, ...] = ()
    video_repetition: tuple[int, ...] = ()

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def image_steps(self) -> tuple[ScaleStep, ...]:
        return tuple(s for s in self.steps if s.clip == 0)

    @property
    def num_image_steps(self) -> int:
        return len(self.image_steps)

    def clip_size(self, clip: int) -> tuple[int, int, int]:
        """(t, H, W) of a clip's accumulator: its last (full-size) scale."""
        return self.scales[(clip + 1) * self.scales_per_clip - 1]

    def clip_steps(self, clip: int) -> tuple[ScaleStep, ...]:
        return tuple(s for s in self.steps if s.clip == clip)

    def steps_before_clip(self, clip: int) -> int:
        """Number of steps in clips 0 .. clip-1."""
        return sum(1 for s in self.steps if s.clip < clip)

    def ref_last_use(self) -> dict[int, int]:
        """Referenced scale -> index of the last step that attends to it."""
        last: dict[int, int] = {}
        for s in self.steps:
            for r in s.ref_sids:
                last[r] = s.index
        return last


def supported_pn() -> list[str]:
    return list(PN_SCALES) + list(PN_ALIASES)


def supported_aspects() -> list[str]:
    return list(ASPECT_NAMES)


def supported_frames(max_clips: int = 3) -> list[int]:
    """1 (image) or 1 + 80k pixel frames (k 20-latent-frame clips), the official scripts' lengths; the list shows
    the first few. :func:`build_schedule` also takes 1 to 4 s (17, 33, 49, 65 frames)."""
    return [1] + [1 + PIXEL_FRAMES_PER_CLIP * k for k in range(1, max_clips + 1)]


def _pyramid(h_div_w: float) -> list[tuple[int, int]]:
    out = []
    for s in BASE_SIDES:
        pw_float = math.sqrt(s * s / h_div_w)
        ph, pw = int(np.round(pw_float * h_div_w)), int(np.round(pw_float))
        out.append((ph, pw))
    return out


def aspect_templates() -> dict[float, list[tuple[int, int]]]:
    """The 15 official aspect templates: h/w key (truncated to 3 decimals) -> 15 (h, w) scales.

    Insertion order matters: ties in the nearest-template search pick the first key.
    """
    out: dict[float, list[tuple[int, int]]] = {}
    for ratio in BASE_RATIOS:
        hws = _pyramid(ratio)
        real = hws[-1][0] / hws[-1][1]
        out[int(real * 1000) / 1000] = hws
        if ratio != 1.0:
            out[int(1 / real * 1000) / 1000] = [(w, h) for h, w in hws]
    return out


def nearest_template(h_div_w: float) -> float:
    keys = np.array(list(aspect_templates()))
    return float(keys[np.argmin(np.abs(h_div_w - keys))])


def _parse_pn(pn: str) -> str:
    key = PN_ALIASES.get(str(pn), str(pn))
    if key not in PN_SCALES:
        raise ValueError(f"unsupported resolution {pn!r}; supported: {', '.join(supported_pn())}")
    return key


def parse_aspect(aspect: str | float) -> float:
    """'W:H', a name from ASPECT_NAMES, or an h/w number -> h/w (before snapping to a template)."""
    if isinstance(aspect, (int, float)):
        value = float(aspect)
    elif aspect in ASPECT_NAMES:
        value = ASPECT_NAMES[aspect]
    elif isinstance(aspect, str) and ":" in aspect:
        try:
            w, h = (float(p) for p in aspect.split(":"))
            value = h / w
        except (ValueError, ZeroDivisionError):
            value = float("nan")
    else:
        try:
            value = float(aspect)
        except (TypeError, ValueError):
            value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"unsupported aspect {aspect!r}; use 'W:H' (e.g. {', '.join(supported_aspects())}) "
                         f"or a positive h/w ratio (snapped to the nearest of {sorted(aspect_templates())})")
    return value


def num_video_clips(frames: int) -> int:
    """Video clips after the image clip in ``frames`` pixel frames: 1 (image), 1 + 80k (whole clips), or a whole
    number of seconds up to 5 (17, 33, 49, 65: one clip, cut to the latent frames there are), as the official table
    offers them (``pt2scale_schedule``, one entry per second); else ValueError. A partial clip after a whole one is
    in the table too, but the official sampler fails on it (its reference to the previous clip keeps 20 frames)."""
    after = int(frames) - 1 if isinstance(frames, (int, np.integer)) else -1  # frames after the first
    if after < 0 or (after % PIXEL_FRAMES_PER_CLIP and (after > PIXEL_FRAMES_PER_CLIP or after % PIXEL_FRAMES_PER_SECOND)):
        raise ValueError(f"unsupported frame count {frames!r}; supported: 1 (image), 1 + 80k (whole 5 s clips, e.g. "
                         f"{supported_frames()[1:]}: 5 s, 10 s, 15 s at 16 fps) or 1 to 4 s (17, 33, 49, 65)")
    return -(-after // PIXEL_FRAMES_PER_CLIP)


def latent_frames(frames: int) -> int:
    """Latent frames of ``frames`` pixel frames (see :func:`num_video_clips`): the first alone, then 4 pixel frames
    each."""
    num_video_clips(frames)
    return 1 + (int(frames) - 1) // 4


def default_repetitions(pn: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(image, video) repetitions per scale of a clip for a pn."""
    pn = _parse_pn(pn)
    n = PN_SCALES[pn]
    tail = VIDEO_REPETITION_TAIL[pn]
    return (IMAGE_REPETITION,) * n, (IMAGE_REPETITION,) * (n - len(tail)) + tail


def build_schedule(pn: str = "0.90M", aspect: str | float = "16:9", frames: int = 81, *,
                   image_repetition: tuple[int, ...] | None = None,
                   video_repetition: tuple[int, ...] | None = None, num_scales: int | None = None) -> Schedule:
    """Build the AR schedule for a resolution class, aspect ('W:H' or h/w) and pixel frame count.

    ``num_scales`` truncates each clip's pyramid (cheap previews and tests; the released models
    were trained on the full pyramids).
    """
    pn = _parse_pn(pn)
    h_div_w = nearest_template(parse_aspect(aspect))
    clips = num_video_clips(frames)
    n = PN_SCALES[pn]
    img_rep, vid_rep = default_repetitions(pn)
    if num_scales is not None:
        if not 1 <= num_scales <= n:
            raise ValueError(f"num_scales must be in 1..{n} for pn {pn}, got {num_scales}")
        n, img_rep, vid_rep = num_scales, img_rep[:num_scales], vid_rep[:num_scales]
    pyramid = aspect_templates()[h_div_w][:n]
    img_rep = tuple(image_repetition or img_rep)
    vid_rep = tuple(video_repetition or vid_rep)
    if len(img_rep) != n or len(vid_rep) != n or min(img_rep + vid_rep) < 1:
        raise ValueError(f"repetitions must list {n} positive counts for pn {pn}")
    scales = [(1, h, w) for h, w in pyramid]
    latents = latent_frames(frames)
    for clip in range(clips):  # the last clip holds what is left (a 3 s video: one clip of 12 latent frames)
        t = min(FRAMES_PER_CLIP, latents - 1 - clip * FRAMES_PER_CLIP)
        scales += [(t, h, w) for h, w in pyramid]
    semantic_scales = max(n - 3, 0)
    steps, real_sid = [], 0
    for si, (t, h, w) in enumerate(scales):
        clip, inner = divmod(si, n)
        if clip == 0:
            frame_ss, frame_ee, refs, reps = 0, 1, (), img_rep[inner]
        else:
            frame_ss = 1 + (clip - 1) * FRAMES_PER_CLIP
            frame_ee, refs, reps = frame_ss + t, (clip * n - 1,), vid_rep[inner]
        d = SEMANTIC_DIM if inner < semantic_scales else DETAIL_DIM
        for rep in range(reps):
            steps.append(ScaleStep(len(steps), si, rep, real_sid + rep, clip, t, h, w, d, rep == reps - 1,
                                   frame_ss, frame_ee, refs))
        real_sid += reps
    uh, uw = pyramid[-1]
    return Schedule(tuple(scales), tuple(steps), pn, h_div_w, uh * VAE_STRIDE, uw * VAE_STRIDE, int(frames),
                    latents, n, semantic_scales, DETAIL_MIN_TOKENS[pn], 1 + clips,
                    img_rep, vid_rep)
