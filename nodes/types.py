"""Socket types of the pack and the small frozen records that travel along them.

Each record holds a ComfyUI ModelPatcher (so ComfyUI's memory manager owns placement) plus what the
next node needs to know about the weights; tokens travel as ``infinitystar.pipeline.Tokens``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from comfy_api.latest import io

logger = logging.getLogger(__name__)

Model = io.Custom("INFINITYSTAR_MODEL")
TextEncoder = io.Custom("INFINITYSTAR_TEXT_ENCODER")
VAE = io.Custom("INFINITYSTAR_VAE")
Conditioning = io.Custom("INFINITYSTAR_CONDITIONING")
Tokens = io.Custom("INFINITYSTAR_TOKENS")


@dataclass(frozen=True)
class LoadedTransformer:
    """The AR transformer inside a patcher; ``info`` is ``checkpoint.CheckpointInfo`` (variant, config)."""

    patcher: Any
    info: Any
    compute_dtype: torch.dtype | None  # None: bf16 on CUDA, fp32 elsewhere (sampler default)
    attention: str  # one of infinitystar.attention.BACKENDS except "auto" (the loader resolves it)
    compile: bool = False  # torch.compile the blocks' parts around attention

    @property
    def module(self):
        return self.patcher.model


@dataclass(frozen=True)
class LoadedTextEncoder:
    """flan-t5 encoder (``infinitystar.text.TextEncoder``) whose module sits in a patcher."""

    patcher: Any
    encoder: Any
    path: Path


@dataclass(frozen=True)
class LoadedVAE:
    """The video tokenizer (``infinitystar.vae.VideoTokenizer``) inside a patcher."""

    patcher: Any
    path: Path

    @property
    def module(self):
        return self.patcher.model


@dataclass(frozen=True)
class Conditioned:
    """Encoded prompt(s): duration tag in seconds (0 = image / no tag) -> ``sampler.TextCondition``.

    With the "auto" tag the prompt is encoded once per tag (image, 5 s, 10 s) so the sampler can take the one
    matching its duration; a fixed tag holds a single entry used for every duration.
    """

    texts: dict[int, Any]
    prompt: str
    negative_prompt: str
    duration_tag: str = "auto"  # the Text Encode choice; "interact" = the interact script's decoration
    clip_texts: tuple = ()  # interact prompt of several lines: one condition per line (clip), in order

    def select(self, duration_s: int):
        """The condition for a generation of ``duration_s`` seconds (0 = image)."""
        if len(self.clip_texts) > 1:
            raise ValueError(f"this prompt holds {len(self.clip_texts)} clip prompts (one per line, duration_tag "
                             "interact): that is for InfinityStar Interact. Here write the prompt on one line, or "
                             "encode it with another duration_tag.")
        if len(self.texts) == 1:
            ((tagged, condition),) = self.texts.items()
            wanted = max(0, int(duration_s))
            if tagged and tagged != wanted:  # a fixed tag ("off" is 0: deliberately untagged)
                logger.warning(
                    "InfinityStar: the prompt was encoded with duration_tag=%s for %s; the models were trained with "
                    "the tag of the output's length (duration_tag auto picks it)", self.duration_tag,
                    "an image" if wanted == 0 else f"a {wanted} s video")
            return condition
        key = 0 if duration_s <= 0 else min(duration_s, max(self.texts))
        return self.texts.get(key) or self.texts[max(self.texts)]

    def clip_conditions(self) -> tuple:
        """One condition per interact clip: the prompt's lines (a clip each), or the 5 s condition once."""
        return self.clip_texts or (self.select(5),)
