"""ComfyUI-InfinityStar: ComfyUI loads this file; the core in ``infinitystar/`` never imports ComfyUI."""
import importlib.util

# the nodes load only inside ComfyUI (its V3 API present); elsewhere, e.g. pytest collecting this folder, nothing does
if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401

    WEB_DIRECTORY = "./web"  # one frontend fix: older saved workflows' Encode / Interact Start seed values
    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
