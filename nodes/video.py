"""Token <-> frame nodes: decode tokens to an IMAGE batch, encode frames to tokens, extend tokens by clips."""
from __future__ import annotations

import logging

import numpy as np
import torch
from comfy_api.latest import io

from . import host
from . import types as T
from .choices import check_choices
from .sampling import (
    check_guidance_schedule,
    generator_input,
    guidance_config,
    guidance_inputs,
    guidance_schedule_input,
    image_to_uint8,
    run_transformer,
    warn_crop,
)

logger = logging.getLogger(__name__)

FPS = 16.0
DECODE_BUDGET_SHARE = 0.8  # of the free memory after loading; the rest is slack for the allocator
DECODE_FRAMES = {"all": {}, "last clip": {"last_clip": True}, "new clips": {"new_clips": True}}  # -> pipeline.decode


def frames_encode_inputs() -> list:
    """aspect_ratio and seed of the nodes that encode frames (Encode, Interact Start)."""
    from .sampling import _aspects

    return [
        io.Combo.Input("aspect_ratio", options=["from input", *_aspects()], default="from input",
                       tooltip="from input = the template nearest to the frames' own aspect."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                     tooltip="Seeds the tokenizer's posterior sample (the official encode samples). It stays as "
                             "set (an input named seed would otherwise randomize on every queue and re-encode)."),
        io.Float.Input("fps", default=FPS, min=1.0, max=240.0, step=0.001, optional=True,
                       tooltip="Frame rate of the images: connect Get Video Components' fps. The model runs at 16 "
                               "fps; other rates are resampled to it by picking frames as the official video "
                               "reader does, so motion keeps its speed. Unused with video (its own rate is read)."),
    ]


def video_input() -> io.Video.Input:
    """The optional VIDEO input of Encode and Interact Start, last so saved widget orders keep their meaning."""
    return io.Video.Input("video", optional=True,
                          tooltip="A video from Load Video, instead of images: only the frames used are decoded "
                                  "(Get Video Components decodes every frame to float, GiBs for a long clip), at "
                                  "the file's own frame rate.")


def frame_source(node: str, images: torch.Tensor | None, video, fps: float):
    """(count, fps, take) of the frames an encode node picks from; ``take(picks, fit, repick=None)`` gives those
    frames as uint8, each passed through ``fit`` (``vae.FrameFit``: held at the output's size) as it is decoded or
    converted. ``repick(n)``: for picks from the end, the picks of an ``n``-frame video (``read_frames``: a file cut
    short is read up to its last decodable frame).

    Exactly one of ``images`` and ``video``. A Load Video file's frames are counted without decoding (its packets,
    less those its edit list drops) and only the picks are decoded, turned upright by the file's display rotation;
    another VIDEO (built from tensors, trimmed) gives its components."""
    if images is not None and video is not None:
        raise ValueError(f"{node}: connect either images or video, not both (video reads only the frames used).")
    if images is None and video is None:
        raise ValueError(f"{node}: connect video (from Load Video) or images (an IMAGE batch, with its fps).")
    if video is not None:
        source = host.video_file(video)
        if source is not None:
            from ..infinitystar.video_io import read_frames, video_frame_count

            count, rate = video_frame_count(source)
            return count, rate, lambda picks, fit, repick=None: read_frames(source, picks, count, fit, repick)
        parts = video.get_components()
        images, fps = parts.images, float(parts.frame_rate)

    def take(picks, fit, repick=None):  # one output array, filled frame by frame as read_frames does
        out, last = None, None
        for j, i in enumerate(picks):
            if i != last:  # a pick repeated at a low frame rate is fitted once
                frame, last = fit(image_to_uint8(images[int(i)][None])[0]), i
            if out is None:
                out = np.empty((len(picks), *frame.shape), dtype=np.uint8)
            out[j] = frame
        return out
    return len(images), fps, take


def check_ram(frames: int, seconds: float, schedule, resolution: str, keep: str) -> None:
    """Before any frame is read: refuse an encode whose frames the machine's memory cannot hold at all (a clear
    message rather than ComfyUI killed by the OOM killer), and warn when they exceed what is free now (the free
    figure misses caches some systems can give back, e.g. ZFS's). Every template of a resolution has about the
    same area, so the size for the frames' own aspect is not needed."""
    from ..infinitystar import pipeline
    from ..infinitystar.schedule import PIXEL_FRAMES_PER_CLIP

    need = pipeline.encode_host_memory(frames, schedule.height, schedule.width)
    free, total = host.free_ram(), host.total_ram()
    if need <= free:
        return
    clips = (frames - 1) // PIXEL_FRAMES_PER_CLIP
    what = (f"the {clips} whole 5 s clip{'s' * (clips != 1)} it keeps of this {seconds:.0f} s video (keep = "
            f"{keep}) need about {need / 1e9:.1f} GB of system memory at {resolution}")
    if clips > 1 and keep == "all whole clips":
        fixes = ("set keep to 'last 5 s' (continuing a video needs only its last clip), give it a shorter video or "
                 "choose a lower resolution")
    else:
        fixes = "set keep to 'last 5 s' or choose a lower resolution" if clips > 1 else "choose a lower resolution"
    if need > total:
        raise ValueError(f"Encode: {what}, more than this machine's {total / 1e9:.1f} GB: {fixes}.")
    logger.warning("InfinityStar Encode: %s and %.1f GB is free: the system may swap. If it does, %s, or free "
                   "memory.", what, free / 1e9, fixes)


# Encode's keep: None = every whole clip from the start (the official V2V reader); n = the last n clips, ending at
# the video's last frame
ENCODE_KEEP = {"all whole clips": None, "last 5 s": 1, "last 10 s": 2}
CANCEL_CHUNK_LATENTS = 8  # decode in chunks of at most 8 latents (32 frames): Cancel is seen between chunks
MAX_EXTEND_CLIPS = 8  # 40 s per Extend node; a chain of nodes goes further


def check_fps(fps: float, node: str, from_video: bool = False) -> None:
    """An fps from a link or a file (a video file's declared rate) skips the widget's minimum: refuse what cannot be
    a video's frame rate, before frames are picked at it."""
    from ..infinitystar.video_io import MIN_FPS

    if not fps >= MIN_FPS:
        if from_video:
            raise ValueError(f"{node}: the video file declares {fps:g} fps, not a video's frame rate (below "
                             f"{MIN_FPS:g}); re-encode it with its real rate (ffmpeg -r).")
        raise ValueError(f"{node}: fps {fps:g} is not a video's frame rate (below {MIN_FPS:g}); connect Get Video "
                         "Components' fps or type the video's rate (16 for InfinityStar videos).")


class InfinityStarDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InfinityStarDecode", display_name="InfinityStar Decode", category="InfinityStar/video",
            description="Decodes InfinityStar tokens to frames (IMAGE batch, 16 fps) with the video tokenizer, "
                        "in temporal chunks sized from the free memory. Chain into CreateVideo -> SaveVideo, "
                        "ImageScale, or any image node.",
            inputs=[
                T.VAE.Input("vae", tooltip="From InfinityStar Video Tokenizer Loader."),
                T.Tokens.Input("tokens", tooltip="From the sampler, InfinityStar Extend/Encode/Interact or Load "
                                                 "Tokens. A story (Interact) is decoded clip by clip."),
                io.Boolean.Input("tiled", default=False,
                                 tooltip="Also split each frame into overlapping spatial tiles (blended). Use "
                                         "only if a normal decode runs out of memory: seams are possible."),
                io.Combo.Input("frames", options=list(DECODE_FRAMES), default="all", optional=True,
                               tooltip="all = the whole video. last clip = only the newest 5 s clip (80 frames): "
                                       "for a story (Interact) only its last clip is decoded, so each clip can be "
                                       "saved as it is made; other tokens are decoded whole and cut. new clips = "
                                       "only what the last Extend / Interact / Sampler run added to its start "
                                       "(start_tokens; start_image: its frame is dropped); all of tokens that "
                                       "continue nothing."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="RGB frames in 0..1 as an IMAGE batch (16 fps): "
                                                                    "for Create Video / Save Video, Video Combine, "
                                                                    "upscalers or any image node."),
                     io.Float.Output(display_name="fps", tooltip="Frame rate of the model: 16.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, frames: str | None = None) -> bool | str:
        return check_choices(cls, frames=frames)

    @classmethod
    @host.shows_warnings
    def execute(cls, vae: T.LoadedVAE, tokens, tiled: bool, frames: str = "all") -> io.NodeOutput:
        from ..infinitystar import pipeline
        from ..infinitystar.vae import estimate_decode_memory

        tokenizer = vae.module
        need = estimate_decode_memory(tokenizer.config, pipeline.decode_shape(tokens), None,
                                      tokenizer.compute_dtype or torch.float32, video_on_device=False)
        with host.loaded(vae.patcher, need, force_full_load=True) as tokenizer:
            budget = int(host.free_memory_for(vae.patcher) * DECODE_BUDGET_SHARE)

            def decode(tiled: bool):
                return pipeline.decode(tokenizer, tokens, memory_budget=budget, tiled=tiled,
                                       callback=host.ChunkProgress(), **DECODE_FRAMES[frames],
                                       max_chunk_latents=CANCEL_CHUNK_LATENTS)

            images = None
            try:
                images = decode(tiled)
            except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError (ComfyUI's OOM_EXCEPTION is Exception on CPU builds)
                if tiled:
                    raise
            if images is None:  # retried outside the except block, so the failed attempt's tensors are freed
                host.empty_cache()
                logger.warning("InfinityStar Decode: out of memory; decoding again with tiled = true (spatial "
                               "tiles: seams are possible; set tiled on to skip the first attempt)")
                images = decode(True)
        return io.NodeOutput(images.float().to(host.intermediate_device()), FPS)


class InfinityStarEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from .sampling import RESOLUTIONS

        return io.Schema(
            node_id="InfinityStarEncode", display_name="InfinityStar Encode", category="InfinityStar/video",
            description="Encodes frames (IMAGE batch) into InfinityStar tokens, to continue them with "
                        "InfinityStar Extend or the Sampler's start_tokens. One frame gives image tokens; 5 s or more of video gives its whole 5 s "
                        "clips (keep: all from the start, or only the last 5 s / 10 s): 1 + 80k frames at 16 fps, "
                        "picked as the official video readers pick them. Connect a Load Video's video (only those frames are decoded), or "
                        "images with their fps.",
            inputs=[
                T.VAE.Input("vae", tooltip="From InfinityStar Video Tokenizer Loader."),
                io.Image.Input("images", optional=True,
                               tooltip="Frames to encode (an IMAGE batch), or connect video instead. They are "
                                       "resized to cover and center-cropped."),
                io.Combo.Input("resolution", options=[r for r in RESOLUTIONS if r != "auto"], default="720p",
                               tooltip="Pyramid to encode into; must be the one the extension will use "
                                       "(720p or 480p for the released weights)."),
                *frames_encode_inputs(),
                video_input(),
                io.Combo.Input("keep", options=list(ENCODE_KEEP), default="all whole clips", optional=True,
                               tooltip="Which clips of a video are encoded. all whole clips = every whole 5 s clip "
                                       "from the start, as the official video-to-video reader (up to 5 s at the "
                                       "end are dropped). last 5 s / last 10 s = at most that much of the end of "
                                       "the video, ending at its last frame, at the memory and time of one or two "
                                       "clips whatever its length: to continue a video from where it ends (the "
                                       "Sampler's start_tokens, 10 s: last 5 s; Extend: either). Unused for one "
                                       "frame (an image)."),
            ],
            outputs=[T.Tokens.Output(display_name="tokens", tooltip="The frames as tokens: Extend continues them, "
                                                                    "Interact starts a story from them, Decode gives "
                                                                    "the frames back as the model sees them.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, resolution: str | None = None, aspect_ratio: str | None = None,
                        keep: str | None = None) -> bool | str:
        return check_choices(cls, resolution=resolution, aspect_ratio=aspect_ratio, keep=keep)

    @classmethod
    @host.shows_warnings
    def execute(cls, vae: T.LoadedVAE, resolution: str, aspect_ratio: str, seed: int,
                images: torch.Tensor | None = None, fps: float = FPS, video=None,
                keep: str = "all whole clips") -> io.NodeOutput:
        from ..infinitystar import pipeline
        from ..infinitystar.schedule import PIXEL_FRAMES_PER_CLIP
        from ..infinitystar.vae import FrameFit
        from ..infinitystar.video_io import whole_clip_indices

        count, fps, take = frame_source("Encode", images, video, fps)
        if count > 1:  # one frame is an image: no rate is used
            check_fps(fps, "Encode", from_video=video is not None)
        last = ENCODE_KEEP[keep]

        def picks_of(frames: int):  # also of a file cut short, its last clips ending at its last decodable frame
            return whole_clip_indices(frames, fps, PIXEL_FRAMES_PER_CLIP, last=last)

        picks = picks_of(count)
        if len(picks) == 0:
            rate_hint = "" if video is not None else "; set fps to the video's frame rate"
            raise ValueError(f"Encode got {count} frame{'s' * (count != 1)} at {fps:g} fps ({count / fps:.2f} s): give it one frame "
                             f"(image tokens, e.g. through Image From Batch) or at least 5 s of video (80 frames at "
                             f"16 fps{rate_hint}) to continue "
                             f"with Extend or the Sampler's start_tokens. To continue a shorter clip from its end, "
                             f"connect its frames to the Sampler's start_image with start_frame = last.")
        clips = (len(picks) - 1) // PIXEL_FRAMES_PER_CLIP
        if clips:
            logger.info("InfinityStar Encode: %d frames at %g fps -> %d clip(s) of 5 s, frames %d..%d picked at 16 "
                        "fps", count, fps, clips, picks[0], picks[-1])

        def schedule_for(height: int, width: int):
            aspect = height / width if aspect_ratio == "from input" else aspect_ratio
            if clips:
                return pipeline.resolve_schedule(resolution, aspect, frames=len(picks) + PIXEL_FRAMES_PER_CLIP)
            return pipeline.resolve_schedule(resolution, aspect, 0)

        def size_for(height: int, width: int) -> tuple[int, int]:
            schedule = schedule_for(height, width)
            return schedule.height, schedule.width

        seconds = count / fps if fps > 0 else 0.0  # one frame (an image) comes with any fps, 0 included
        check_ram(len(picks), seconds, schedule_for(9, 16), resolution, keep)  # 16:9 when the aspect is the frames'
        fit = FrameFit(size_for)
        frames = take(picks, fit, None if last is None else picks_of)  # only these are decoded, each fitted to the output's size
        schedule = schedule_for(*fit.source)
        warn_crop("Encode", fit.source, schedule, "set aspect_ratio to 'from input'" if aspect_ratio != "from input"
                  else f"the nearest of the model's aspect templates is h/w {schedule.h_div_w:.3f}: crop the input nearer to it")
        need = pipeline.encode_memory(vae.module, len(frames), schedule.height, schedule.width)
        with host.loaded(vae.patcher, need, force_full_load=True) as tokenizer:
            if clips == 0:
                tokens = pipeline.encode_image(tokenizer, frames[0], schedule, seed=seed)
            else:
                tokens = pipeline.encode_video(tokenizer, frames, schedule, seed=seed, clips=clips,
                                               callback=host.ChunkProgress())
        return io.NodeOutput(tokens)


class InfinityStarExtend(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InfinityStarExtend", display_name="InfinityStar Extend", category="InfinityStar/video",
            description="Continues tokens by N more clips of 20 latent frames (80 frames, 5 s each). Earlier "
                        "clips are kept bit for bit; each new clip sees the previous clip's last scale, as in "
                        "the official model. Use the same prompt or a new one.",
            inputs=[
                T.Model.Input("model", tooltip="From InfinityStar Model Loader (same variant as the tokens)."),
                T.Conditioning.Input("positive", tooltip="Prompt for the new clips."),
                T.Tokens.Input("tokens", tooltip="A complete generation (sampler, Encode, Load Tokens)."),
                io.Int.Input("clips", default=1, min=1, max=MAX_EXTEND_CLIPS,
                             tooltip="Clips to add (5 s each). The released models were trained up to 10 s; "
                                     "quality may drift beyond that."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds the new clips' draws (earlier clips draw nothing)."),
                *guidance_inputs(),
                generator_input(),
                T.VAE.Input("vae", optional=True, tooltip="Video tokenizer, only for colour previews while "
                                                          "sampling (else they show layout only)."),
                guidance_schedule_input(),
            ],
            outputs=[T.Tokens.Output(display_name="tokens", tooltip="The input tokens followed by the new clips: "
                                                                    "Decode them, or Extend again.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, generator: str | None = None, guidance_schedule: str | None = None) -> bool | str:
        checked = check_choices(cls, generator=generator)
        return check_guidance_schedule(guidance_schedule) if checked is True else checked

    @classmethod
    @host.shows_warnings
    def execute(cls, model: T.LoadedTransformer, positive: T.Conditioned, tokens, clips: int, seed: int,
                guidance_scale: float, apg_threshold: float, use_plain_cfg: bool, tau_video: float,
                generator: str = "auto", vae: T.LoadedVAE | None = None, guidance_schedule: str = "") -> io.NodeOutput:
        from ..infinitystar import pipeline

        if not 1 <= int(clips) <= MAX_EXTEND_CLIPS:  # a linked value skips the widget's range
            raise ValueError(f"Extend: clips {clips} is outside 1..{MAX_EXTEND_CLIPS}; chain Extend nodes for longer "
                             "videos.")
        # refuses stories / partial tokens before loading; warns of tokens at a resolution the weights were not trained at
        schedule = pipeline.extension_schedule(tokens, int(clips), model_info=model.info)
        seconds = (schedule.frames - 1) // int(FPS)
        if seconds > pipeline.TRAINED_SECONDS:
            logger.warning("extending to %d s; the released models were trained up to %d s", seconds,
                           pipeline.TRAINED_SECONDS)
        guidance = guidance_config(guidance_scale, apg_threshold, use_plain_cfg, guidance_schedule)
        text = positive.select(min(seconds, pipeline.TRAINED_SECONDS))  # before anything loads

        def extend(module, run_kwargs):
            return pipeline.extend(module, text, tokens, clips, seed=seed, guidance=guidance, tau_video=tau_video,
                                   generator=generator, **run_kwargs)

        return io.NodeOutput(run_transformer(model, schedule, extend, getattr(cls.hidden, "unique_id", None), vae,
                                             guidance=guidance))
