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

    def store(self, key: Hashable, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self._k[layer][key] = k
        self._v[layer][key] = v

    def gather(self, layer: int, keys: Sequence[Hashable]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Cached K and V of ``keys`` (in that order) for one layer."""
        missing = [key for key in keys if key not in self._k[layer]]
        if missing:
            raise KeyError(f"KV cache has no entry for {missing} at layer {layer}; stored: {self.keys()}")
        return [self._k[layer][key] for key in keys], [self._v[layer][key] for key in keys]

    def release(self, key: Hashable) -> None:
        for d in (*self._k, *self._v):
            d.pop(key, None)

    def keys(self) -> list[Hashable]:
        return list(self._k[0]) if self._k else []

    def clear(self) -> None:
        for d in (*self._k, *self._v):
            d.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (*self._k, *self._v) for t in d.values())

    def __contains__(self, key: Hashable) -> bool:
        return bool(self._k) and key in self._k[0]
