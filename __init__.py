"""ComfyUI-InfinityStar: ComfyUI loads this file; the core in ``infinitystar/`` never imports ComfyUI."""
import importlib.util
import logging

# the nodes load only inside ComfyUI with its V3 API; elsewhere (pytest collecting this folder, the CLI) nothing does
if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401

    WEB_DIRECTORY = "./web"  # one frontend fix: older saved workflows' Encode / Interact Start seed values
    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
elif importlib.util.find_spec("comfy") is not None:  # a ComfyUI older than the V3 node API: say why no nodes show
    logging.getLogger(__name__).error("ComfyUI-InfinityStar needs ComfyUI 0.3.64 or newer (the comfy_api V3 node API); "
                                      "update ComfyUI to use its nodes")
