"""ComfyUI-InfinityStar: ComfyUI loads this file; the core in ``infinitystar/`` never imports ComfyUI."""
try:
    import comfy.utils  # noqa: F401  (present only inside ComfyUI)
    _HAS_COMFY = True
except ImportError:
    _HAS_COMFY = False

if _HAS_COMFY:
    from .nodes import comfy_entrypoint  # noqa: F401

    WEB_DIRECTORY = "./web"  # one frontend fix: older saved workflows' Encode / Interact Start seed values
    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
