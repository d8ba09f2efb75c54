"""InfinityStar core: a pure-PyTorch reimplementation of the official inference (no ComfyUI import)."""
