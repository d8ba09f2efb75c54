"""Text encoding node: prompt + negative prompt through flan-t5, decorated as the official scripts do."""
from __future__ import annotations

from comfy_api.latest import io

from . import host
from . import types as T
from .choices import check_choices

DURATION_TAGS = {"auto": (0, 5, 10), "5s": (5,), "10s": (10,), "off": (0,), "interact": (5,)}
NO_CLOSING_PHRASE = ("interact",)  # the interact script tags its prompts but adds no closing phrase


class InfinityStarTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InfinityStarTextEncode", display_name="InfinityStar Text Encode",
            category="InfinityStar/conditioning",
            description="Encodes a prompt (and optional negative prompt) with flan-t5-xl. The prompt gets the "
                        "official decoration: a <<<t=5s>>> duration tag for videos and the closing phrase "
                        "', Close-up on big objects, emphasize scale and detail'. The encoder stays "
                        "loaded like ComfyUI's own text encoders until the transformer needs the room.",
            inputs=[
                T.TextEncoder.Input("text_encoder", tooltip="From InfinityStar Text Encoder Loader."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="What to generate. Long, concrete descriptions work best (the model "
                                        "was trained on detailed captions); up to 512 T5 tokens."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="Empty (default) uses the model's learned null text, as the official "
                                        "scripts do. A negative prompt must be shorter than the decorated "
                                        "prompt in tokens."),
                io.Combo.Input("duration_tag", options=list(DURATION_TAGS), default="auto",
                               tooltip="auto encodes the prompt for image, 5 s and 10 s and lets the sampler "
                                       "take the one matching its duration (3 short T5 passes). Without the "
                                       "tag videos degrade badly (upstream issue #29); 'off' is for "
                                       "experiments (closing phrase only). interact = the interact script's "
                                       "prompts: 5 s tag, no closing phrase (for InfinityStar Interact); "
                                       "there each line of the prompt is one clip's prompt (the official "
                                       "prompt.txt's first line captions the reference video: leave it out)."),
            ],
            outputs=[T.Conditioning.Output(display_name="conditioning", tooltip="The encoded prompt and negative "
                                                                                "prompt (with the duration tag) for "
                                                                                "Sampler, Extend or Interact.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, duration_tag: str | None = None) -> bool | str:
        return check_choices(cls, duration_tag=duration_tag)

    @classmethod
    @host.shows_warnings
    def execute(cls, text_encoder: T.LoadedTextEncoder, prompt: str, negative_prompt: str,
                duration_tag: str) -> io.NodeOutput:
        from ..infinitystar.interact import prompt_lines

        patcher = text_encoder.patcher
        lines = prompt_lines(prompt)
        clips = lines if duration_tag == "interact" and len(lines) > 1 else []  # a story: one clip per line
        encoded = []
        for text in clips or [prompt]:  # refused before the encoder loads (the tokenizer alone counts)
            for seconds in DURATION_TAGS[duration_tag]:
                text_encoder.encoder.check_negative(text, negative_prompt, seconds or None,
                                                    closing=duration_tag not in NO_CLOSING_PHRASE)
        with host.loaded(patcher):  # resident afterwards, as core text encoders: ComfyUI evicts it when needed
            for text in clips or [prompt]:
                texts = {}
                for seconds in DURATION_TAGS[duration_tag]:
                    host.check_interrupt()
                    texts[seconds] = text_encoder.encoder.encode(text, negative_prompt, duration_s=seconds or None,
                                                                 device=patcher.load_device,
                                                                 closing=duration_tag not in NO_CLOSING_PHRASE)
                encoded.append(texts)
        return io.NodeOutput(T.Conditioned(encoded[0], prompt, negative_prompt, duration_tag,
                                           tuple(texts[5] for texts in encoded) if clips else ()))
