"""Save / load InfinityStar tokens (.safetensors with the schedule in the metadata), so a long sampling run
never has to be repeated because a decode failed, and generations can be extended later."""
from __future__ import annotations

from comfy_api.latest import io, ui

from . import host, paths
from . import types as T

EXTENSION = ".safetensors"


class InfinityStarSaveTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InfinityStarSaveTokens", display_name="InfinityStar Save Tokens", category="InfinityStar/io",
            description="Saves tokens (bits of every step + summed codes, a few MB) to ComfyUI's output folder. "
                        "InfinityStar Load Tokens lists them as 'name [output]' (press R to refresh its list).",
            inputs=[
                T.Tokens.Input("tokens", tooltip="Tokens to save."),
                io.String.Input("filename_prefix", default="infinitystar/tokens",
                                tooltip="Path under the output folder; a counter and .safetensors are added."),
            ],
            outputs=[],
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    @host.shows_warnings
    def execute(cls, tokens, filename_prefix: str) -> io.NodeOutput:
        path, subfolder = paths.next_output_file(filename_prefix, EXTENSION)
        tokens.save(path)
        return io.NodeOutput(ui=ui.PreviewText(f"saved {subfolder + '/' if subfolder else ''}{path.name}"))


class InfinityStarLoadTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InfinityStarLoadTokens", display_name="InfinityStar Load Tokens", category="InfinityStar/io",
            description="Loads tokens saved by InfinityStar Save Tokens (or the CLI) from ComfyUI's input or "
                        "output folder and checks them against their schedule.",
            inputs=[
                io.Combo.Input("tokens_file", options=cls.choices(),
                               tooltip="A tokens .safetensors in the input folder (subfolders included), or one "
                                       "Save Tokens wrote to the output folder ('[output]')."),
            ],
            outputs=[T.Tokens.Output(display_name="tokens", tooltip="The saved tokens, as the node that made them "
                                                                    "returned them.")],
            hidden=[io.Hidden.unique_id],
        )

    @staticmethod
    def choices() -> list[str]:
        from ..infinitystar.pipeline import Tokens

        return paths.input_files(EXTENSION) + paths.output_files(EXTENSION, keep=Tokens.is_file_of_tokens)

    @classmethod
    def validate_inputs(cls, tokens_file: str | None = None) -> bool | str:
        if tokens_file is None:  # left out of an API prompt: ComfyUI has said "Required input is missing"
            return True
        try:
            paths.resolve_input(tokens_file)
        except FileNotFoundError as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, tokens_file: str):
        path = paths.resolve_input(tokens_file)
        return f"{path}:{path.stat().st_mtime_ns}"

    @classmethod
    @host.shows_warnings
    def execute(cls, tokens_file: str) -> io.NodeOutput:
        from ..infinitystar.pipeline import Tokens

        return io.NodeOutput(Tokens.load(paths.resolve_input(tokens_file)))
