"""InfinityStar-Interact nodes: a long video 5 s at a time, each clip with its own prompt (the interact weights).

Start turns the last 5 s of a reference video into a story; each Interact node adds one clip under its prompt;
InfinityStar Decode turns the story into frames (window by window, as the official script).
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from comfy_api.latest import io

from . import host
from . import types as T
from .choices import check_choices
from .sampling import (
    check_guidance_schedule,
    generator_input,
    guidance_config,
    guidance_schedule_input,
    run_transformer,
    warn_crop,
)
from .video import FPS, check_fps, frame_source, frames_encode_inputs, video_input

logger = logging.getLogger(__name__)

START_RESOLUTIONS = ("480p", "0.25M", "0.06M")  # the interact weights were trained at 480p; the rest are drafts


class InfinityStarInteractStart(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InfinityStarInteractStart", display_name="InfinityStar Interact Start",
            category="InfinityStar/interact",
            description="Starts an interactive story from a reference video: 81 frames over its last 5 s, picked "
                        "at 16 fps as the official interact script reads them (connect a Load Video's video, or "
                        "images with their fps), are "
                        "encoded by the video tokenizer, unquantized, as that script does. "
                        "Feed the tokens to InfinityStar Interact. A generated or encoded 5 s video's tokens "
                        "can start a story too.",
            inputs=[
                T.VAE.Input("vae", tooltip="From InfinityStar Video Tokenizer Loader."),
                io.Image.Input("images", optional=True,
                               tooltip="The reference video as an IMAGE batch (at least 5 s), or connect video "
                                       "instead; frames over its last 5 s are used, resized to cover and "
                                       "center-cropped."),
                io.Combo.Input("resolution", options=list(START_RESOLUTIONS), default="480p",
                               tooltip="480p is what the interact weights were trained at; smaller ones are "
                                       "for drafts."),
                *frames_encode_inputs(),
                video_input(),
            ],
            outputs=[T.Tokens.Output(display_name="tokens", tooltip="A story: the reference's last 5 s (81 frames "
                                                                    "at 16 fps) as raw latents, ready for "
                                                                    "InfinityStar Interact.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, resolution: str | None = None, aspect_ratio: str | None = None) -> bool | str:
        return check_choices(cls, resolution=resolution, aspect_ratio=aspect_ratio)

    @classmethod
    @host.shows_warnings
    def execute(cls, vae: T.LoadedVAE, resolution: str, aspect_ratio: str, seed: int,
                images: torch.Tensor | None = None, fps: float = FPS, video=None) -> io.NodeOutput:
        from ..infinitystar import interact, pipeline
        from ..infinitystar.video_io import clip_indices

        aspect = None if aspect_ratio == "from input" else aspect_ratio
        count, fps, take = frame_source("Interact Start", images, video, fps)
        check_fps(fps, "Interact Start", from_video=video is not None)

        def last_5s(frames: int):  # the interact script's picks (a file cut short: up to its last decodable frame)
            return clip_indices(frames, fps, interact.START_FRAMES, 5, from_end=True)

        try:
            picks = last_5s(count)
        except ValueError:  # under 5 s
            rate_hint = "" if video is not None else "; set fps to the video's frame rate"
            raise ValueError(f"Interact Start got {count} frame{'s' * (count != 1)} at {fps:g} fps ({count / fps:.2f} "
                             f"s): a story starts from the last 5 s of a video (at least 80 frames at 16 fps"
                             f"{rate_hint}).") from None
        fit = interact.start_fit(resolution, aspect)  # a 4K video's frames are held at the output's size
        frames = take(picks, fit, last_5s)  # only the frames a story starts from
        aspect = aspect or fit.aspect
        schedule = interact.start_schedule(frames, resolution, aspect)  # too few frames: refused before loading
        warn_crop("Interact Start", fit.source, schedule, "set aspect_ratio to 'from input'" if aspect_ratio != "from input"
                  else f"the nearest of the model's aspect templates is h/w {schedule.h_div_w:.3f}: crop the input nearer to it")
        need = pipeline.encode_memory(vae.module, len(frames), schedule.height, schedule.width)
        with host.loaded(vae.patcher, need, force_full_load=True) as tokenizer:
            tokens = interact.start(tokenizer, frames, pn=resolution, aspect=aspect, seed=seed,
                                    callback=host.ChunkProgress())
        return io.NodeOutput(tokens)


class InfinityStarInteract(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InfinityStarInteract", display_name="InfinityStar Interact", category="InfinityStar/interact",
            description="Adds one 5 s clip (80 frames) to a story per prompt line, with the InfinityStar-"
                        "Interact weights. Each clip sees its prompt, the previous 5 s (downsized) and the story's "
                        "first and latest frames. Write one line per clip (the official prompt.txt without its first "
                        "line, which captions the reference video) or chain "
                        "one node per prompt, and decode the last tokens for the whole video. Defaults are the "
                        "official script's: plain CFG 3, tau 0.5.",
            inputs=[
                T.Model.Input("model", tooltip="From InfinityStar Model Loader with the interact weights "
                                               "(InfinityStarInteract_24K_iters)."),
                T.Conditioning.Input("positive", tooltip="Prompt of the new clip, or one line per clip (Text "
                                                         "Encode with duration_tag interact, as the official "
                                                         "interact script)."),
                T.Tokens.Input("tokens", tooltip="From InfinityStar Interact Start, a previous Interact node, or a "
                                                 "generated / encoded video of 5 s or more."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds the clip's draws. The official script uses the same seed for every "
                                     "clip."),
                io.Float.Input("guidance_scale", default=3.0, min=0.0, max=100.0, step=0.5,
                               tooltip="Guidance strength; 3 with plain CFG is the official interact setting."),
                io.Float.Input("apg_threshold", default=0.05, min=0.0, max=10.0, step=0.005,
                               tooltip="APG clip of the per-element RMS of (cond - uncond). Only used with APG."),
                io.Boolean.Input("use_plain_cfg", default=True,
                                 tooltip="Plain CFG (official for the interact weights). Off = APG, which wants a "
                                         "much larger scale (the T2V models use 34)."),
                io.Float.Input("tau", default=0.5, min=0.01, max=5.0, step=0.01,
                               tooltip="Sampling temperature of every scale; 0.5 is official. Higher = more "
                                       "varied, noisier."),
                generator_input(),
                T.VAE.Input("vae", optional=True, tooltip="Video tokenizer, only for colour previews while "
                                                          "sampling (else they show layout only)."),
                guidance_schedule_input(),
            ],
            outputs=[T.Tokens.Output(display_name="tokens", tooltip="The story, one clip (80 frames, 5 s) longer per "
                                                                    "prompt line: Decode it (frames = last clip for "
                                                                    "just the newest clip) or chain another "
                                                                    "Interact.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, generator: str | None = None, guidance_schedule: str | None = None) -> bool | str:
        checked = check_choices(cls, generator=generator)
        return check_guidance_schedule(guidance_schedule) if checked is True else checked

    @classmethod
    @host.shows_warnings
    def execute(cls, model: T.LoadedTransformer, positive: T.Conditioned, tokens, seed: int,
                guidance_scale: float, apg_threshold: float, use_plain_cfg: bool, tau: float,
                generator: str = "auto", vae: T.LoadedVAE | None = None, guidance_schedule: str = "") -> io.NodeOutput:
        from ..infinitystar import interact

        if model.info.variant in interact.T2V_VARIANTS:
            raise ValueError(f"InfinityStar Interact needs the interact weights (InfinityStarInteract_24K_iters); "
                             f"the loaded {model.info.variant} weights were not trained with its conditions. Load "
                             "the interact weights, or continue with InfinityStar Extend instead.")
        interact.check_story(tokens)
        if positive.duration_tag != "interact":
            logger.warning("InfinityStar Interact: the prompt was encoded with duration_tag=%s; the official "
                           "interact script uses the 5 s tag without the closing phrase (duration_tag=interact)",
                           positive.duration_tag)
        schedule = interact.clip_schedule(tokens.pn, tokens.h_div_w)
        guidance = guidance_config(guidance_scale, apg_threshold, use_plain_cfg, guidance_schedule)
        clips = positive.clip_conditions()

        def run(module, run_kwargs):
            progress, story = run_kwargs.pop("callback"), tokens
            for i, text in enumerate(clips):  # one progress bar over every clip's steps
                def callback(step, steps, accumulators, before=i * schedule.num_steps):
                    progress(before + step, len(clips) * steps, accumulators)

                story = interact.continue_story(module, text, story, seed=seed, guidance=guidance, tau=tau,
                                                generator=generator, callback=callback, **run_kwargs)
            return dataclasses.replace(story, kept_frames=tokens.frames)  # every clip of this node is new

        return io.NodeOutput(run_transformer(model, schedule, run, getattr(cls.hidden, "unique_id", None), vae,
                                             extra_tokens=interact.condition_tokens(schedule), guidance=guidance))
