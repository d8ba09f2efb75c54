"""The sampler node: text (and optionally a start image or start tokens) -> InfinityStar tokens, one AR step
at a time."""
from __future__ import annotations

import logging

import numpy as np
import torch
from comfy_api.latest import io

from . import host
from . import types as T
from .choices import check_choices

RESOLUTIONS = ("auto", "720p", "480p", "0.25M", "0.06M")
logger = logging.getLogger(__name__)

DURATIONS = {"image": 0, "5 s": 5, "10 s": 10}
FROM_START = "from start image"  # the Sampler's aspect choice that follows start_image / start_tokens
START_FRAMES = ("first", "last")
SMALL_MODEL_RESOLUTION = "0.06M"  # auto for weights that are neither released variant (e.g. the tiny test set)


def guidance_inputs(prefix_tooltip: str = "") -> list:
    """Guidance/temperature inputs shared by the sampler and the extend node."""
    return [
        io.Float.Input("guidance_scale", default=34.0, min=0.0, max=100.0, step=0.5,
                       tooltip=prefix_tooltip + "Guidance strength on the bit logits. 34 is the official value "
                               "for both released models (with APG); lower = looser prompt following. 1 = no "
                               "guidance: only the conditional branch runs (about half the time and memory), as "
                               "in the official code."),
        io.Float.Input("apg_threshold", default=0.05, min=0.0, max=10.0, step=0.005,
                       tooltip="APG clip of the per-element RMS of (cond - uncond); 0.05 is official. Only "
                               "used with APG."),
        io.Boolean.Input("use_plain_cfg", default=False,
                         tooltip="Plain CFG instead of APG. At scale 34 this destroys the output; lower the "
                                 "scale (about 3-7) if you enable it."),
        io.Float.Input("tau_video", default=0.4, min=0.01, max=5.0, step=0.01,
                       tooltip="Sampling temperature of the video clips; 0.4 is official. Higher = more "
                               "varied but noisier motion."),
    ]


GENERATORS = ("auto", "cpu")


def generator_input() -> io.Combo.Input:
    """Where the bits are drawn; optional and last, so saved workflows' widget values keep their places."""
    return io.Combo.Input("generator", options=list(GENERATORS), default="auto", optional=True,
                          tooltip="auto = draw the bits on the GPU like the official code (fast; the same bits "
                                  "as the official code on the same GPU). cpu = device-independent draws: the "
                                  "same seed and logits give the same bits on any device.")


def guidance_schedule_input() -> io.String.Input:
    """Optional per-scale guidance; optional and after ``generator``, so saved workflows keep their widget places."""
    return io.String.Input("guidance_schedule", default="", optional=True,
                           tooltip="Optional guidance scale per scale of the pyramid, coarse to fine, separated by "
                                   "commas; the last value repeats (e.g. '34, 34, 34, 20, 10' eases guidance on "
                                   "the fine scales). Every clip's pyramid follows it. Empty = guidance_scale at "
                                   "every scale (official).")


def check_guidance_schedule(schedule: str | None) -> bool | str:
    """True, or what is wrong with a typed guidance schedule: said when the prompt is queued, not after the models
    have loaded. ``None`` (fed by a link, or left out) passes; ``guidance_config`` checks it again when it runs."""
    from ..infinitystar.guidance import parse_scale_list

    try:
        parse_scale_list(schedule or "")
    except ValueError as exc:
        return str(exc)
    return True


def guidance_config(guidance_scale: float, apg_threshold: float, use_plain_cfg: bool, schedule: str = ""):
    from ..infinitystar.guidance import GuidanceConfig, parse_scale_list

    return GuidanceConfig(scale=float(guidance_scale), threshold=float(apg_threshold), use_apg=not use_plain_cfg,
                          per_scale=parse_scale_list(schedule))


def image_to_uint8(image: torch.Tensor) -> np.ndarray:
    """ComfyUI IMAGE (B, H, W, C) float [0, 1] -> uint8 (B, H, W, 3) RGB (alpha dropped, grey repeated).

    Callers pass only the frames they use: the conversion copies what it is given."""
    if image.ndim != 4 or image.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"expected a ComfyUI IMAGE batch (frames, height, width, channels), got shape "
                         f"{tuple(image.shape)}; connect the IMAGE output of Load Image / Get Video Components")
    rgb = image[..., :3] if image.shape[-1] >= 3 else image[..., :1].expand(*image.shape[:3], 3)  # grey (+ alpha)
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def warn_crop(node: str, size: tuple[int, int], schedule, keep_more: str) -> None:
    """Say when fitting frames of ``size`` (height, width) to the output size cuts much of them (resize to cover,
    center crop)."""
    from ..infinitystar.vae import CROP_WARN_SHARE, cropped_share

    height, width = size
    share = cropped_share(height, width, schedule.height, schedule.width)
    if share > CROP_WARN_SHARE:
        logger.warning("InfinityStar %s: the %dx%d input is resized to cover %dx%d and center-cropped, cutting %.0f%% "
                       "of it; %s to keep more of it.", node, width, height, schedule.width, schedule.height,
                       100 * share, keep_more)


def pick_resolution(resolution: str, info) -> str:
    if resolution != "auto":
        return resolution
    from ..infinitystar.config import is_released_size
    from ..infinitystar.pipeline import VARIANT_RESOLUTION

    if is_released_size(info.config):
        return VARIANT_RESOLUTION.get(info.variant, "720p")
    return SMALL_MODEL_RESOLUTION


def run_transformer(model: T.LoadedTransformer, schedule, fn, node_id=None, vae: T.LoadedVAE | None = None,
                    extra_tokens: int = 0, guidance=None):
    """Load the transformer for ``schedule`` through ComfyUI and call ``fn(module, run_kwargs)``, where
    ``run_kwargs`` are the sampler arguments the loader and the memory plan decide (progress callback, compute
    dtype, attention, compile, K/V offload); previews show colours when the tokenizer ``vae`` is given.
    ``extra_tokens``: prefix-condition tokens (interact) the memory plan counts like text; ``guidance`` sizes the
    plan's batch (guidance 1 at every scale runs one branch)."""
    projection = host.preview_projection(vae)
    batch = guidance.branches(schedule.scales_per_clip) if guidance is not None else 2
    memory, offload_kv = host.sampling_plan(model.patcher, model.info.config, schedule, model.compute_dtype,
                                            extra_tokens, batch, model.attention)
    progress = host.StepProgress(schedule.num_steps, node_id=node_id, projection=projection)
    run_kwargs = dict(callback=progress, compute_dtype=model.compute_dtype, attn_backend=model.attention,
                      compile=model.compile, offload_kv=offload_kv)
    with host.loaded(model.patcher, memory) as module:
        return fn(module, run_kwargs)


class InfinityStarSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InfinityStarSampler", display_name="InfinityStar Sampler", category="InfinityStar/sampling",
            description="Generates a video (or an image) as InfinityStar tokens: a text step, then every scale "
                        "of the image pyramid and of each 20-latent-frame clip, each repeated a few times, each "
                        "step drawing all its bits at once. Give a start image + the tokenizer for "
                        "image-to-video. Decode the tokens with InfinityStar Decode.",
            inputs=[
                T.Model.Input("model", tooltip="From InfinityStar Model Loader."),
                T.Conditioning.Input("positive", tooltip="From InfinityStar Text Encode (holds the negative "
                                                         "prompt too)."),
                io.Combo.Input("resolution", options=list(RESOLUTIONS), default="auto",
                               tooltip="auto = what the weights were trained at (720p: 1280x720-class, 480p: "
                                       "848x480). 0.25M / 0.06M are small pyramids for quick drafts; "
                                       "quality drops away from the trained size."),
                io.Combo.Input("aspect_ratio", options=[*_aspects(), FROM_START], default="16:9",
                               tooltip="W:H of the output. The model's size for it comes from the nearest of the 15 "
                                       "official h/w templates. 'from start image' = the template nearest to "
                                       "start_image's own shape (image-to-video without cropping much of it); "
                                       "16:9 without a start."),
                io.Combo.Input("duration", options=list(DURATIONS), default="5 s",
                               tooltip="image = one frame. 5 s = 81 frames at 16 fps. 10 s = 161 frames, only "
                                       "for the 480p weights (longer: InfinityStar Extend). Cost grows with "
                                       "every clip."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds the one generator all steps draw from (where it draws: 'generator')."),
                *guidance_inputs(),
                io.Float.Input("tau_image", default=1.0, min=0.01, max=5.0, step=0.01,
                               tooltip="Sampling temperature of the first (image) clip; 1.0 is official."),
                io.Image.Input("start_image", optional=True,
                               tooltip="Optional first frame for image-to-video: it is encoded and its tokens "
                                       "are teacher-forced (resized to cover, center-cropped). Needs 'vae'."),
                T.VAE.Input("vae", optional=True, tooltip="Video tokenizer: needed with start_image; when connected, "
                                                          "the live previews show colours (else layout only)."),
                generator_input(),
                guidance_schedule_input(),
                T.Tokens.Input("start_tokens", optional=True,
                               tooltip="Optional tokens of a start image or video (InfinityStar Encode): "
                                       "teacher-forced while every step still draws, as the official image-to-video "
                                       "and video continuation (480p weights, duration 10 s: the video's first 5 s "
                                       "start it). Resolution and aspect ratio then come from the tokens. Extend "
                                       "continues too, but draws nothing for the earlier clips, so its seeds "
                                       "differ."),
                io.Combo.Input("start_frame", options=list(START_FRAMES), default="first", optional=True,
                               tooltip="Which frame of a start_image batch starts the video: first, or last to "
                                       "continue a clip from where it ends (connect its frames, e.g. Decode's "
                                       "images or Get Video Components)."),
            ],
            outputs=[T.Tokens.Output(display_name="tokens", tooltip="The generated tokens (every step's bits and the "
                                                                    "summed codes, a few MB): Decode them, Save them, "
                                                                    "or Extend them.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, resolution: str | None = None, duration: str | None = None,
                        aspect_ratio: str | None = None, generator: str | None = None,
                        start_frame: str | None = None, guidance_schedule: str | None = None) -> bool | str:
        checked = check_choices(cls, resolution=resolution, duration=duration, aspect_ratio=aspect_ratio,
                                generator=generator, start_frame=start_frame)
        if checked is True:
            checked = check_guidance_schedule(guidance_schedule)
        if checked is not True:
            return checked
        if resolution == "720p" and DURATIONS.get(duration, 0) > 5:
            return ("720p generates 5 s clips only (the released 720p model was trained for 5 s). Use 480p for "
                    "10 s (or auto with start_tokens), or generate 5 s and continue with InfinityStar Extend.")
        return True

    @classmethod
    @host.shows_warnings
    def execute(cls, model: T.LoadedTransformer, positive: T.Conditioned, resolution: str, aspect_ratio: str,
                duration: str, seed: int, guidance_scale: float, apg_threshold: float, use_plain_cfg: bool,
                tau_video: float, tau_image: float, start_image: torch.Tensor | None = None,
                vae: T.LoadedVAE | None = None, generator: str = "auto", guidance_schedule: str = "",
                start_tokens=None, start_frame: str = "first") -> io.NodeOutput:
        from ..infinitystar import pipeline

        guidance = guidance_config(guidance_scale, apg_threshold, use_plain_cfg, guidance_schedule)  # checked first
        seconds = DURATIONS[duration]
        from_start, aspect_ratio = aspect_ratio == FROM_START, start_aspect(aspect_ratio, start_image, start_tokens)
        if start_tokens is not None:
            start_tokens = start_tokens_for(start_tokens, start_image, seconds)
            resolution, aspect_ratio = start_tokens_schedule(start_tokens, resolution, aspect_ratio)
            if resolution == "0.90M" and seconds > 5:  # the widgets' rule (validate_inputs), for the tokens' size
                raise ValueError("start_tokens are 720p tokens, and 720p makes 5 s videos only. For the 480p "
                                 "weights' 10 s continuation, encode the video at 480p (Encode's resolution); or "
                                 "continue clip by clip with InfinityStar Extend.")
        # raises before anything loads when the weights were not trained for this duration
        schedule = pipeline.resolve_schedule(pick_resolution(resolution, model.info), aspect_ratio, seconds,
                                             model_info=model.info)
        text = positive.select(seconds)  # before anything loads
        condition = start_tokens
        if condition is not None:
            pipeline.check_condition(condition, schedule)
        if start_image is not None:
            if vae is None:
                raise ValueError("start_image needs the video tokenizer: connect an InfinityStar Video Tokenizer "
                                 "Loader to 'vae'.")
            if seconds == 0:
                raise ValueError("start_image with duration 'image' would only reproduce the image; pick 5 s.")
            warn_crop("Sampler", tuple(start_image.shape[1:3]), schedule, f"set aspect_ratio to '{FROM_START}'" if not from_start else
                      f"the nearest of the model's aspect templates is h/w {schedule.h_div_w:.3f}: crop the image "
                      "nearer to it")
            image = image_to_uint8(start_frame_of(start_image, start_frame))[0]
            need = pipeline.encode_memory(vae.module, 1, schedule.height, schedule.width)
            with host.loaded(vae.patcher, need, force_full_load=True) as tokenizer:
                condition = pipeline.encode_image(tokenizer, image, schedule, seed=seed)

        def sample(module, run_kwargs):
            return pipeline.generate(module, text, schedule, seed=seed, guidance=guidance, tau_image=tau_image,
                                     tau_video=tau_video, condition=condition, generator=generator, **run_kwargs)

        return io.NodeOutput(run_transformer(model, schedule, sample, getattr(cls.hidden, "unique_id", None), vae,
                                             guidance=guidance))


def start_aspect(aspect_ratio: str, start_image, start_tokens) -> str | float:
    """The Sampler's aspect: 'from start image' is the start image's h/w (the nearest template is taken later),
    the tokens' own with start_tokens (start_tokens_schedule), else 16:9."""
    if aspect_ratio != FROM_START or start_tokens is not None:
        return aspect_ratio
    if start_image is None:
        logger.warning("InfinityStar Sampler: aspect_ratio '%s' without a start_image: 16:9", FROM_START)
        return "16:9"
    return start_image.shape[1] / start_image.shape[2]


def start_frame_of(start_image: torch.Tensor, start_frame: str) -> torch.Tensor:
    """The one frame of a start_image batch that starts the video (as a batch of one)."""
    if start_frame == "last":
        return start_image[-1:]
    if len(start_image) > 1:
        logger.warning("InfinityStar Sampler: start_image is a batch of %d frames; its first frame starts the video "
                       "(set start_frame to 'last' to continue the clip from its end)", len(start_image))
    return start_image[:1]


def start_tokens_for(tokens, start_image, seconds: int):
    """The part of the Sampler's start_tokens a ``seconds`` generation starts from, refused before anything loads
    when they cannot start it. Of a video, the leading 5 s clips, as many as leave one to generate: the official
    continuation continues the first 5 s of its video, and Encode keeps every whole 5 s clip (or the last ones)."""
    if start_image is not None:
        raise ValueError("start_image and start_tokens are both connected: give the Sampler one start (an image, or "
                         "the tokens of an encoded image or video).")
    if tokens.kind != "generation":
        raise ValueError("start_tokens is an interact story; continue it with InfinityStar Interact.")
    if len(tokens.bits) != tokens.schedule().num_steps:
        raise ValueError(f"start_tokens hold {len(tokens.bits)} of {tokens.schedule().num_steps} steps; connect "
                         "complete tokens (InfinityStar Encode, a finished generation or Load Tokens).")
    from ..infinitystar.pipeline import PIXEL_FRAMES_PER_CLIP, frames_for_duration

    clips = (frames_for_duration(seconds) - 1) // PIXEL_FRAMES_PER_CLIP  # video clips of the output
    if not tokens.is_video:
        if clips == 0:
            raise ValueError("start_tokens hold an image; an image generation would add nothing. Pick 5 s for "
                             "image-to-video.")
        return tokens
    if clips == 0:
        raise ValueError("start_tokens hold a video; an image cannot continue it. Pick 10 s (the 480p weights "
                         "continue a video's first 5 s to 10 s).")
    used = min(tokens.clips, clips - 1)
    if used < 1:
        raise ValueError(f"start_tokens hold {tokens.clips * 5} s of video; a {seconds} s generation leaves nothing "
                         "to add after its first 5 s. Pick 10 s (the 480p weights continue a 5 s video to 10 s), or "
                         "continue clip by clip with InfinityStar Extend.")
    if used < tokens.clips:
        logger.warning("InfinityStar Sampler: start_tokens hold %d s of video; only the first %d s start the %d s "
                       "output (the rest is not kept). To continue the video from its end, set Encode's keep to "
                       "'last %d s'; InfinityStar Extend continues a whole video.",
                       tokens.clips * 5, used * 5, seconds, used * 5)
    return tokens.leading_clips(used)


def start_tokens_schedule(tokens, resolution: str, aspect_ratio: str) -> tuple[str, float]:
    """(resolution, aspect) of a generation that starts from ``tokens``: theirs; the widgets' choice is logged
    when it differs."""
    from ..infinitystar.schedule import build_schedule

    if resolution != "auto" and build_schedule(resolution, tokens.h_div_w, 1).pn != tokens.pn:
        logger.warning("InfinityStar Sampler: resolution %s ignored; start_tokens are %s", resolution, tokens.pn)
    if aspect_ratio != FROM_START and abs(build_schedule(tokens.pn, aspect_ratio, 1).h_div_w - tokens.h_div_w) > 1e-9:
        logger.warning("InfinityStar Sampler: aspect_ratio %s ignored; start_tokens are h/w %.4f", aspect_ratio,
                    tokens.h_div_w)
    return tokens.pn, tokens.h_div_w


def _aspects() -> list[str]:
    from ..infinitystar.schedule import supported_aspects

    return supported_aspects()
