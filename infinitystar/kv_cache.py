"""Per-layer K/V cache of the text prefix and of reference scales (spec §2.4).

The official model caches the post-RoPE K and V (KV heads, before GQA expansion) of every scale
at its last repetition; a visual step attends to [reference scales] + [text 't0'] + itself. Here
only entries that a later step will read are stored, and each is released after its last reader.

Offload (``offload=True``, or a number n of layers): reference-scale entries of all (or the first n)
layers live in host memory (pinned when they come from CUDA) and are copied back into each step's
context, layer by layer. For 10 s videos the last scale of clip 1 is read by every clip-2 step and is
the largest single tensor of a run (≈ 10 GB at 480p); host memory holds it for the price of one
host-to-device copy per layer and step, so offloading only as many layers as the device needs
(:func:`infinitystar.memory.choose_kv_offload`) keeps the rest of those copies away. The prefix entries
(the text, and interact's prefix conditions: ``resident`` keys) are read by every step, so they stay on the
device, as the memory plan counts them. Exact: only copies.

With CUDA graphs (``homes``, a :class:`infinitystar.cuda_graphs.StepGraphs`), device-resident entries are stored
into the homes the graphs read, so that a captured step finds every later generation's K/V at its addresses.
"""
from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence

import torch

logger = logging.getLogger(__name__)

TEXT_KEY = "t0"


class ScaleKVCache:
    """K/V tensors (B, Nkv, L, D) keyed by step key ('t0' or a scale index), one dict per layer."""

    def __init__(self, num_layers: int, offload: bool | int = False, homes=None,
                 resident: Sequence[Hashable] = ()):
        self._k: list[dict[Hashable, torch.Tensor]] = [{} for _ in range(num_layers)]
        self._v: list[dict[Hashable, torch.Tensor]] = [{} for _ in range(num_layers)]
        self.offload_layers = offloaded_layers(offload, num_layers)  # layers [0, n) keep references on the host
        self.peak_nbytes = 0  # largest device-resident nbytes() seen after a store
        self.peak_offloaded_nbytes = 0  # largest host-resident (offloaded) bytes seen after a store
        self._nbytes = 0
        self._offloaded = 0
        self.homes = homes  # StepGraphs whose place() says where device entries live, or None
        self.resident = frozenset((TEXT_KEY, *resident))  # keys never offloaded: the prefix every step reads
        self._pinned = False  # whether any entry went to pinned host memory (freed to the system by clear())

    def store(self, key: Hashable, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if key in self._k[layer]:
            self._forget(layer, key)
        if self._on_host(layer, key):
            k, v = _to_host(k), _to_host(v)
            self._pinned = self._pinned or k.is_pinned()
            self._offloaded += _size(k) + _size(v)
        else:
            if self.homes is not None:
                k, v = self.homes.place(layer, key, k, v)
            self._nbytes += _size(k) + _size(v)
        self._k[layer][key] = k
        self._v[layer][key] = v
        self.peak_nbytes = max(self.peak_nbytes, self._nbytes)
        self.peak_offloaded_nbytes = max(self.peak_offloaded_nbytes, self._offloaded)

    def gather(self, layer: int, keys: Sequence[Hashable]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Cached K and V of ``keys`` (in that order) for one layer, where they are stored (host if offloaded)."""
        missing = [key for key in keys if key not in self._k[layer]]
        if missing:
            raise KeyError(f"KV cache has no entry for {missing} at layer {layer}; stored: {self.keys()}")
        return [self._k[layer][key] for key in keys], [self._v[layer][key] for key in keys]

    def holds(self, layer: int, key: Hashable, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether (layer, key) is stored on the device as exactly these tensors (a graph's homes)."""
        return (self._k[layer].get(key) is k and self._v[layer].get(key) is v
                and not self._on_host(layer, key))

    def release(self, key: Hashable) -> None:
        for layer in range(len(self._k)):
            if key in self._k[layer]:
                self._forget(layer, key)

    def _forget(self, layer: int, key: Hashable) -> None:
        for d in (self._k[layer], self._v[layer]):
            t = d.pop(key)
            if self._on_host(layer, key):
                self._offloaded -= _size(t)
            else:
                self._nbytes -= _size(t)

    def _on_host(self, layer: int, key: Hashable) -> bool:
        return layer < self.offload_layers and key not in self.resident

    @property
    def offload(self) -> bool:
        return self.offload_layers > 0

    def keys(self) -> list[Hashable]:
        return list(self._k[0]) if self._k else []

    def clear(self) -> None:
        """Drop every entry; pinned host buffers go back to the system, not to torch's host cache.

        Entries released after their last reader have left their pinned buffers in torch's host cache too (about
        10 GB after a 480p 10 s run), so the cache is emptied whenever this cache ever pinned, not only when
        pinned entries are still held."""
        for d in (*self._k, *self._v):
            d.clear()
        self._nbytes = self._offloaded = 0
        if self._pinned:
            self._pinned = False
            _empty_host_cache()

    def nbytes(self) -> int:
        """Bytes resident where the model runs (offloaded entries excluded)."""
        return self._nbytes

    def offloaded_nbytes(self) -> int:
        return self._offloaded

    def __contains__(self, key: Hashable) -> bool:
        return bool(self._k) and key in self._k[0]


def offloaded_layers(offload: bool | int, num_layers: int) -> int:
    """How many layers keep their reference K/V on the host: True = all, False = none, or a count."""
    if isinstance(offload, bool):
        return num_layers if offload else 0
    if isinstance(offload, int) and 0 <= offload <= num_layers:
        return offload
    raise ValueError(f"offload_kv must be True, False, 'auto' or a layer count in [0, {num_layers}], got {offload!r}")


_PIN_WARNED = False


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of t; from CUDA into pinned memory without a sync (same-stream ordering keeps it safe).

    When the system refuses to pin more memory, pageable memory and a blocking copy are used instead."""
    if t.device.type == "cuda":
        try:
            host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        except RuntimeError as e:
            global _PIN_WARNED
            if not _PIN_WARNED:
                _PIN_WARNED = True
                logger.warning("cannot pin host memory for offloaded K/V (%s); using pageable memory (slower)", e)
        else:
            return host.copy_(t, non_blocking=True)
    return t.to("cpu", copy=True)


def _empty_host_cache() -> None:
    """Return cached pinned memory (≈10 GB after a 480p 10 s run) to the system; torch ≥ 2.9 / older name."""
    fn = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    fn = fn or getattr(torch._C, "_host_emptyCache", None)
    if fn is not None:
        fn()


def concat_to(parts: Sequence[torch.Tensor], device: torch.device, dim: int = 2) -> torch.Tensor:
    """``torch.cat`` on ``device`` of parts that may live on the host (offloaded K/V): one allocation,
    each part copied into its slice (asynchronously from pinned memory)."""
    if all(p.device == device for p in parts):
        return torch.cat(list(parts), dim=dim)
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    out = torch.empty(shape, dtype=parts[0].dtype, device=device)
    start = 0
    for p in parts:
        n = p.shape[dim]
        out.narrow(dim, start, n).copy_(p, non_blocking=p.is_pinned())
        start += n
    return out


def _size(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
