"""CUDA graphs of whole AR steps: one launch for a small step's ~1,150 kernels (issue 7, opt-in).

Why: a 720p 5 s video has 57 steps of fewer than 1,000 tokens. Each runs 36 blocks of about 32 kernels, and
launching them (Python, dispatcher, driver) takes longer than running them: on an H200 those steps took 1.8 s
for about 0.6 s of kernel time. A CUDA graph replays the recorded kernels without the host.

What a graph needs: every tensor it reads sits at the address it had at capture. So each graph owns static
input buffers (the step's tokens and RoPE tables), filled before each replay, and the K/V cache stores the
entries the graphs read (text prefix, reference scales) into *home* tensors kept here: one address per
(layer, key), rewritten in place by later steps and generations (:meth:`StepGraphs.place`).

When: a step shape is captured the second time it is seen and replayed from then on. The first, eager run is
the warm-up (kernel choice, cuDNN plans, torch.compile's compilation must not happen inside a capture). A
shape comes three times per generation (the scale repetitions), and graphs kept on the model
(:func:`step_graphs`) serve later generations with the same size, prompt length and weights: a second video
(another seed or prompt of the same length) replays every small step. A new prompt length, size, precision or
weights location drops them.

Exact: the same kernels on the same inputs. Which steps: those without chunking, that store no K/V and read no
K/V from host memory, up to ``max_tokens`` tokens (the rest are few and kernel-bound).
Memory held between generations: the graphs' pool (the largest graphed step's working set and each graph's
output) and the homes (about 1 GB of reference K/V at 720p), until :func:`release_step_graphs`.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# Steps up to this many tokens are graphed: 77 of the 85 steps at 720p 5 s (in bf16 token blocks start above 5,120
# tokens, and those are not graphed); above it the kernels take far longer than their launch.
GRAPH_MAX_TOKENS = 6144


class CudaGraphBackend:
    """torch.cuda.CUDAGraph: capture on a side stream into one memory pool shared by all graphs of a StepGraphs
    (steps run one after another, so one step's temporaries can reuse another's)."""

    device_type = "cuda"

    def __init__(self):
        self.pool = None
        self.stream: torch.cuda.Stream | None = None

    def capture(self, fn: Callable[[], torch.Tensor], device: torch.device):
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(device)
        self.stream.wait_stream(current)
        # not torch.cuda.graph(): it synchronizes, collects garbage and empties the allocator's cache at each capture
        with torch.cuda.stream(self.stream):
            # thread_local: CUDA calls of the host's other threads (ComfyUI's server) cannot invalidate the capture
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                out = fn()
            finally:
                graph.capture_end()
        current.wait_stream(self.stream)
        return graph, out

    @staticmethod
    def replay(graph) -> None:
        graph.replay()


@dataclass
class _Graph:
    graph: object
    x: torch.Tensor  # (batch, L, C) static tokens
    cos: torch.Tensor  # (L, D/2) static RoPE tables
    sin: torch.Tensor
    out: torch.Tensor  # (batch, L, C) hidden states, rewritten by each replay
    homes: tuple  # the K/V tensors the graph reads: each replay checks that the cache holds exactly these


class StepGraphs:
    """Captured steps of one model, keyed by step shape; also the K/V cache's homes (see the module doc)."""

    def __init__(self, max_tokens: int = GRAPH_MAX_TOKENS, backend=None):
        self.max_tokens = max_tokens
        self.backend = backend if backend is not None else CudaGraphBackend()
        self.graphs: dict[Hashable, _Graph] = {}
        self.seen: set[Hashable] = set()
        self.homes: dict[tuple[int, Hashable], tuple[torch.Tensor, torch.Tensor]] = {}
        self.signature: tuple | None = None
        self.failed: dict[Hashable, str] = {}  # step shapes whose capture failed -> why (they run eagerly)
        self.off: str | None = None  # why this generation runs without graphs, or None
        self.counts = {"eager": 0, "captured": 0, "replayed": 0}

    # ---- lifetime ----
    def begin(self, model, dtype: torch.dtype) -> None:
        """At the start of a generation: keep the graphs only if the weights and the precision are unchanged
        (a model moved off the device and back has its weights at other addresses)."""
        params = list(model.block_stack.parameters())
        signature = (dtype, *(p.data_ptr() for p in params),
                     *(getattr(m, "fused", None) for m in model.blocks[0].modules()))
        if signature != self.signature:
            self.release()
            self.signature = signature
        self.counts = dict.fromkeys(self.counts, 0)
        elsewhere = sum(p.device.type != self.backend.device_type for p in params)
        # weights streamed from the host (ComfyUI's partial loading) would be host copies inside the graph
        self.off = f"{elsewhere} block weights are not on the device" if elsewhere else None
        if self.off:
            logger.info("CUDA graphs off for this generation: %s", self.off)

    def release(self) -> None:
        """Drop every graph and home (their memory goes back to the allocator)."""
        self._drop_graphs()
        self.failed.clear()
        self.homes.clear()
        self.signature = None

    def _drop_graphs(self) -> None:
        """Drop the graphs (and the pool they share), keeping the homes: shapes are captured afresh."""
        self.graphs.clear()
        self.seen.clear()
        self.backend.pool = None

    def nbytes(self) -> int:
        """Bytes of the homes and of the graphs' static inputs and outputs (the pool's temporaries not counted)."""
        tensors = [t for pair in self.homes.values() for t in pair]
        tensors += [t for g in self.graphs.values() for t in (g.x, g.cos, g.sin, g.out)]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ---- the K/V cache's storage ----
    def place(self, layer: int, key: Hashable, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the cache keeps (layer, key): the home of that entry, rewritten in place with k, v when its shape
        is unchanged; else k, v become the home (and the graphs that read the old one are dropped)."""
        home = self.homes.get((layer, key))
        if home is not None and all(_same_layout(h, t) for h, t in zip(home, (k, v))):
            home[0].copy_(k)
            home[1].copy_(v)
            return home
        if home is not None:
            self._drop_graphs()
        self.homes[(layer, key)] = (k, v)
        return k, v

    # ---- steps ----
    def forward(self, model, handed: list[torch.Tensor], ctx, dtype: torch.dtype) -> torch.Tensor:
        """The blocks over the tokens (batch, L, C) in the one-element list ``handed`` for one step: eager, captured or
        replayed. Eager steps get the list as it is (``forward_blocks`` frees the tokens after the first block).
        A replay's result is the graph's output buffer, valid until that graph runs again."""
        key, homes = self._key(model, handed[0], ctx, dtype)
        if key in self.failed:
            key = None
        if key is not None and key not in self.graphs and key not in self.seen:
            self.seen.add(key)  # first sight: this eager run warms the shape up
            key = None
        graph = None if key is None else self.graphs.get(key)
        if graph is not None and not all(a is b for a, b in zip(graph.homes, homes)):
            graph = None  # the cache's K/V live elsewhere than where this graph reads them: capture it again
        if key is not None and graph is None:
            graph = self._capture(model, handed[0], ctx, dtype, key, homes)
        if graph is None:
            self.counts["eager"] += 1
            return model.forward_blocks(handed, ctx, dtype)
        graph.x.copy_(handed.pop())
        graph.cos.copy_(ctx.rope[0])
        graph.sin.copy_(ctx.rope[1])
        self.backend.replay(graph.graph)
        self.counts["replayed"] += 1
        return graph.out

    def _key(self, model, x: torch.Tensor, ctx, dtype: torch.dtype):
        """(key, homes read) of a step that can be graphed, else (None, None)."""
        L = x.shape[1]
        cache = ctx.cache
        if (self.off or x.device.type != self.backend.device_type or L > self.max_tokens or cache is None
                or ctx.store_key is not None or (ctx.chunk_tokens and L > ctx.chunk_tokens)):
            return None, None
        homes = []
        for layer in range(model.config.depth):
            for ref in ctx.ref_keys:
                home = self.homes.get((layer, ref))
                if home is None or not cache.holds(layer, ref, *home):  # offloaded, or stored without a home
                    return None, None
                homes.append(home)
        shapes = tuple((ref, tuple(self.homes[(0, ref)][0].shape)) for ref in ctx.ref_keys)
        key = (tuple(x.shape), x.dtype, dtype, shapes, ctx.attn_backend, ctx.round_qkv_bf16, ctx.compile)
        return key, tuple(homes)

    def _capture(self, model, x, ctx, dtype, key, homes) -> _Graph | None:
        static_x = x.to(dtype).contiguous().clone()  # own buffer (the step's x may be an expanded view)
        cos, sin = (t.clone() for t in ctx.rope)
        static_ctx = dataclasses.replace(ctx, rope=(cos, sin))
        try:
            graph, out = self.backend.capture(lambda: model.forward_blocks([static_x], static_ctx, dtype), x.device)
        except Exception as e:  # noqa: BLE001 — any capture failure: say why, and run this shape eagerly from now on
            self.failed[key] = why = f"{type(e).__name__}: {e}"
            logger.warning("CUDA graph capture of a %d-token step failed (%s); that step shape runs eagerly",
                           x.shape[1], why)
            return None
        self.graphs[key] = captured = _Graph(graph, static_x, cos, sin, out, homes)
        self.counts["captured"] += 1
        return captured


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def step_graphs(model, max_tokens: int = GRAPH_MAX_TOKENS) -> StepGraphs:
    """The model's own StepGraphs (created on first use), so that later generations replay its graphs."""
    graphs = model.__dict__.get("_step_graphs")
    if graphs is None or graphs.max_tokens != max_tokens:
        graphs = model.__dict__["_step_graphs"] = StepGraphs(max_tokens)
    return graphs


def release_step_graphs(model) -> None:
    """Free the model's graphs and the K/V homes they keep (a no-op when it has none)."""
    graphs = model.__dict__.pop("_step_graphs", None)
    if graphs is not None:
        graphs.release()
