"""InfinityStar core: a pure-PyTorch reimplementation of the official inference (no ComfyUI import).

The public API is re-exported lazily, so ``import infinitystar`` stays cheap (no torch/transformers import).
"""
from importlib import import_module

_EXPORTS = {
    "TextEncoder": "text", "decorate_prompt": "text",
    "load_transformer": "checkpoint", "load_tokenizer": "checkpoint", "identify_file": "checkpoint",
    "download_models": "download", "find_models": "download",
    "write_tiny_models": "tiny",
    "Tokens": "pipeline", "resolve_schedule": "pipeline", "generate": "pipeline", "extend": "pipeline",
    "encode_image": "pipeline", "encode_video": "pipeline", "decode": "pipeline",
    "GuidanceConfig": "guidance", "TextCondition": "sampler", "build_schedule": "schedule",
    "write_mp4": "video_io", "read_video": "video_io", "write_png": "video_io", "read_image": "video_io",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'infinitystar' has no attribute {name!r}")
