"""Per-layer K/V cache of the text prefix and of reference scales (spec §2.4).

The official model caches the post-RoPE K and V (KV heads, before GQA expansion) of every scale
at its last repetition; a visual step attends to [reference scales] + [text 't0'] + itself. Here
only entries that a later step will read are stored, and each is released after its last reader.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

TEXT_KEY = "t0"


class ScaleKVCache:
    """K/V tensors (B, Nkv, L, D) keyed by step key ('t0' or a scale index), one dict per layer."""

    def __init__(self, num_layers: int):
        self._k: list[dict[Hashable, torch.Tensor]] = [{} for _ in range(num_layers)]
        self._v: list[dict[Hashable, torch.Tensor]] = [{} for _ in range(num_layers)]
        self.peak_nbytes = 0  # largest nbytes() seen after a store
        self._nbytes = 0

    def store(self, key: Hashable, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if key in self._k[layer]:
            self._nbytes -= _size(self._k[layer][key]) + _size(self._v[layer][key])
        self._k[layer][key] = k
        self._v[layer][key] = v
        self._nbytes += _size(k) + _size(v)
        self.peak_nbytes = max(self.peak_nbytes, self._nbytes)

    def gather(self, layer: int, keys: Sequence[Hashable]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Cached K and V of ``keys`` (in that order) for one layer."""
        missing = [key for key in keys if key not in self._k[layer]]
        if missing:
            raise KeyError(f"KV cache has no entry for {missing} at layer {layer}; stored: {self.keys()}")
        return [self._k[layer][key] for key in keys], [self._v[layer][key] for key in keys]

    def release(self, key: Hashable) -> None:
        for d in (*self._k, *self._v):
            t = d.pop(key, None)
            if t is not None:
                self._nbytes -= _size(t)

    def keys(self) -> list[Hashable]:
        return list(self._k[0]) if self._k else []

    def clear(self) -> None:
        for d in (*self._k, *self._v):
            d.clear()
        self._nbytes = 0

    def nbytes(self) -> int:
        return self._nbytes

    def __contains__(self, key: Hashable) -> bool:
        return bool(self._k) and key in self._k[0]


def _size(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
