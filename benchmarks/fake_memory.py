"""Peak GPU memory of a full-size generation, measured without a GPU: the sampler runs on fake tensors.

Under ``FakeTensorMode`` every tensor has a device, dtype and shape but no data, so the 8.77B model at
720p costs no memory and runs in minutes on a CPU. A dispatch mode counts the bytes of every live
storage on the "device" (a storage counts from the op that creates it until its last tensor dies), so
the peak is what ``torch.cuda.max_memory_allocated`` would report for the same op sequence, without the
caching allocator's rounding and fragmentation.

A CPU-only torch cannot make fake CUDA tensors (views of them fail), so the fake device is the CPU and
the CUDA code path is switched on by hand: bf16 blocks, GQA-native attention and the fused RMSNorm;
offloaded K/V goes to the meta device (host memory, not counted). Copies between host and device, and
the random draw of the bits, become allocations of the same size (fake tensors hold no data).

    python benchmarks/fake_memory.py                       # 720p 5 s, 480p 5 s, 480p 10 s; plan on/off
    python benchmarks/fake_memory.py --cases 480p10 --offload-kv on
    python benchmarks/fake_memory.py --cases 480p10 --offload-kv auto --cap-gb 16   # the layers "auto" picks
    python benchmarks/fake_memory.py --cases interact480 --offload-kv off             # one InfinityStar-Interact clip
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
import weakref
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infinitystar import attention, gguf, interact, kv_cache, sampler, transformer  # noqa: E402
from infinitystar.config import TRANSFORMER_PRESETS, TransformerConfig  # noqa: E402
from infinitystar.memory import choose_kv_offload, estimate_sampling_memory, weight_bytes  # noqa: E402
from infinitystar.ops import scaled_cast  # noqa: E402
from infinitystar.schedule import build_schedule  # noqa: E402
from infinitystar.transformer import InfinityStarTransformer  # noqa: E402

CASES = {"720p5": ("720p", 81), "480p5": ("480p", 81), "480p10": ("480p", 161), "mid5": ("0.06M", 81),
         "interact480": ("480p", None), "interact_mid": ("0.06M", None)}  # None: one interact clip
WEIGHTS = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16, "gguf_q8_0": torch.uint8, "gguf_q4_k": torch.uint8}
GGUF = {"gguf_q8_0": "Q8_0", "gguf_q4_k": "Q4_K"}  # block weights as GGUF bytes, dequantized per call
TEXT_TOKENS = 512  # the estimate's upper bound of the prompt length


class LiveDeviceBytes(TorchDispatchMode):
    """Running and peak bytes of the storages alive on ``device_type`` created by ops inside the mode."""

    def __init__(self, device_type: str = "cpu", existing=()):
        """``existing``: tensors made before (the weights); views of them (a GGUF weight's reshaped bytes) are not
        new allocations."""
        super().__init__()
        self.device_type = device_type
        self.live: dict[int, object] = {}
        self.existing = {t.untyped_storage()._cdata for t in existing}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = storage._cdata
        if key in self.live or key in self.existing:
            return
        n = storage.nbytes()
        self.live[key] = weakref.ref(storage, lambda _, k=key, n=n: self._free(k, n))
        self.current += n
        self.peak = max(self.peak, self.current)

    def _free(self, key: int, n: int) -> None:
        if self.live.pop(key, None) is not None:
            self.current -= n


@contextlib.contextmanager
def no_value_checks():
    """Fake tensors hold no values: the sampler's one check of them (finite logits, after the loop) is skipped."""
    saved = sampler._check_finite
    sampler._check_finite = lambda finite, dtype: None
    try:
        yield
    finally:
        sampler._check_finite = saved


@contextlib.contextmanager
def cuda_code_path():
    """The CUDA branches on a fake CPU device; host copies to "meta"; the bit draw as an allocation."""
    half = (torch.float16, torch.bfloat16)

    def to_device(t, device):
        return t if t.device == device else torch.empty(t.shape, dtype=t.dtype, device=device)

    def to_host(t):
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    def concat_to(parts, device, dim=2):
        return torch.cat([to_device(p, device) for p in parts], dim=dim)

    def draw_bits(guided, shape, generator, finite=None):  # the probabilities as the real draw makes them; no random
        probs = guided.reshape(1, -1, 2).softmax(dim=-1).view(-1, 2)  # numbers
        if finite is not None:
            probs = torch.where(torch.isfinite(probs).all(), probs, 0.5)
        return torch.zeros(shape, dtype=torch.uint8, device=probs.device)

    patches = [(sampler, "_to_device", to_device), (sampler, "_to_cpu", lambda ts: ts),
               (sampler, "draw_bits", draw_bits), (kv_cache, "_to_host", to_host),
               (kv_cache, "_empty_host_cache", lambda: None), (transformer, "concat_to", concat_to),
               (attention, "native_gqa", lambda q, backend="sdpa": q.dtype in half),
               (transformer.RMSNorm, "forward", lambda self, x: transformer.fused_rms_norm(x, self.weight, self.eps))]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    for mod, name, fn in patches:
        setattr(mod, name, fn)
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def fake_tensors(model: torch.nn.Module, mode: FakeTensorMode, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Replace every parameter and buffer of a meta-device ``model`` by a fake CPU tensor of the same shape, in
    its own dtype or, for floating-point ones, ``dtype`` when given."""
    def like(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(t.shape, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype,
                           device="cpu")

    with mode:
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[name] = torch.nn.Parameter(like(p), requires_grad=False)
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = like(b)
    return model


def fake_model(config: TransformerConfig, mode: FakeTensorMode, weights: torch.dtype,
               gguf_type: str | None = None) -> InfinityStarTransformer:
    """The model in the official precision layout (blocks in ``weights``; e4m3fn with the loaders' scaled
    layers; ``gguf_type``: the blocks' matmul weights as that GGUF type's bytes), every parameter a fake tensor."""
    ops = gguf.ops if gguf_type else scaled_cast if weights == torch.float8_e4m3fn else torch.nn
    model = InfinityStarTransformer(config, device="meta", ops=ops).eval().requires_grad_(False)
    model.apply_precision_layout(torch.bfloat16)
    if gguf_type:
        for module in model.block_stack.modules():
            if isinstance(module, gguf.GGUFLinear):
                name = gguf.written_type(gguf_type, module.in_features)
                module.gguf_type = gguf.QUANT_IDS[name]
                nbytes = gguf.stored_bytes(tuple(module.weight.shape), module.gguf_type)
                module.weight = torch.nn.Parameter(torch.empty(module.out_features, nbytes // module.out_features,
                                                               dtype=torch.uint8, device="meta"), requires_grad=False)
        return fake_tensors(model, mode)
    model.block_stack.to(weights)
    for module in model.modules():  # the scales stay fp32 scalars
        if "scale_weight" in module._parameters:
            module.scale_weight.data = module.scale_weight.data.float()
    return fake_tensors(model, mode)


def case_schedule(case: str):
    """(schedule, prefix-condition tokens) of a case: a whole generation, or one interact clip."""
    pn, frames = CASES[case]
    if frames is None:
        schedule = interact.clip_schedule(pn, "16:9")
        return schedule, interact.condition_tokens(schedule)
    return build_schedule(pn, "16:9", frames), 0


def measure(config: TransformerConfig, schedule, weights: torch.dtype = torch.float8_e4m3fn,
            text_tokens: int = TEXT_TOKENS, gguf_type: str | None = None, interact_clip: bool = False,
            **sample_kwargs) -> tuple[int, int]:
    """(peak bytes of device tensors created by the run, bytes of the weights) for one fake generation;
    ``interact_clip``: one clip of the interact model, with its two prefix conditions."""
    mode = FakeTensorMode()
    model = fake_model(config, mode, weights, gguf_type)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kwargs = dict(seed=0, compute_dtype=torch.bfloat16, generator_device="cpu", offload_kv=False)
    kwargs.update(sample_kwargs)
    with mode, cuda_code_path(), no_value_checks():
        text = sampler.TextCondition(torch.empty(text_tokens, config.text_channels))
        if interact_clip:
            _, H, W = schedule.scales[-1]
            kwargs["conditions"] = interact.conditions(torch.empty(1, 64, interact.CONTEXT_LATENTS, H, W),
                                                       torch.empty(1, 64, 1, H, W), schedule)
        with LiveDeviceBytes("cpu", existing=[*model.parameters(), *model.buffers()]) as tracker:
            sampler.sample(model, text, schedule, **kwargs)
    return tracker.peak, weight_bytes


def auto_offload_layers(config: TransformerConfig, schedule, weights: torch.dtype, device_bytes: float,
                        chunk_tokens="auto") -> int:
    """The layers ``sample(offload_kv="auto")`` would offload on a GPU with ``device_bytes`` for this run
    (weights included), as the sampler decides it: the estimate against what is left less its headroom."""
    room = int(device_bytes) - weight_bytes(config, weights) - sampler.AUTO_HEADROOM
    return choose_kv_offload(config, schedule, room, chunk_tokens=chunk_tokens, weight_dtype=weights)


DECODE_GRIDS = {"720p5": (45, 80, 21), "480p5": (30, 53, 21), "480p10": (30, 53, 41),  # latent h, w, T at 16:9
                "720p20": (45, 80, 81)}  # a 720p 5 s video extended three times


def measure_decode(latent_shape, dtype: torch.dtype = torch.bfloat16, **decode_kwargs) -> int:
    """Peak bytes of a full-size tokenizer decode of summed codes ``latent_shape`` (B, 64, T, h, w), weights aside."""
    from infinitystar.vae import VaeConfig, VideoTokenizer

    mode = FakeTensorMode()
    tokenizer = fake_tensors(VideoTokenizer(VaeConfig(), device="meta").eval().requires_grad_(False), mode, dtype)
    with mode:
        codes = torch.empty(*latent_shape)
        # oneDNN's fp32 CPU convolutions need real data pointers; the generic kernels have the same outputs
        with torch.backends.mkldnn.flags(enabled=False), LiveDeviceBytes("cpu") as tracker:
            tokenizer.decode(codes, **decode_kwargs)
    return tracker.peak


def decode_table(cases) -> str:
    from infinitystar.vae import VaeConfig, estimate_decode_memory

    rows = ["| case | latent grid | decode | measured GB | estimate GB | est./measured |", "|---|---|---|---|---|---|"]
    for case in cases:
        h, w, t = DECODE_GRIDS[case]
        shape = (1, 64, t, h, w)
        for label, kwargs, est_kwargs in (("official chunks", {}, dict(chunk_latents=None)),
                                          ("official chunks, images to the host", dict(images_to="meta"),
                                           dict(chunk_latents=None, video_on_device=False)),
                                          ("tiled 32, overlap 8", dict(tiled=True), dict(chunk_latents=None, tile=(32, 32))),
                                          ("tiled, images to the host", dict(tiled=True, images_to="meta"),
                                           dict(chunk_latents=None, tile=(32, 32), video_on_device=False))):
            peak = measure_decode(shape, **kwargs)
            est = estimate_decode_memory(VaeConfig(), shape, dtype=torch.bfloat16, **est_kwargs)
            rows.append(f"| {case} | {t}x{h}x{w} | {label} | {peak / 1e9:.2f} | {est / 1e9:.2f} | {est / peak:.2f} |")
    return "\n".join(rows) + ("\n\nvideo tokenizer at the released widths, bf16, fake tensors (decoded video included, except where its images "
                              "go to the host chunk by chunk, as the nodes and the CLI decode)")


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="full", choices=["full", "tiny"])
    p.add_argument("--cases", default="720p5,480p5,480p10")
    p.add_argument("--weights", default="fp8", choices=sorted(WEIGHTS))
    p.add_argument("--plans", default="on,off", help="comma list of: on (token blocks 'auto'), off (no chunking)")
    p.add_argument("--offload-kv", default="both", choices=["on", "off", "both", "auto"],
                   help="auto: the layers sampler's offload_kv='auto' would offload on a GPU of --cap-gb")
    p.add_argument("--cap-gb", type=float, default=16.0, help="device memory for --offload-kv auto (GB)")
    p.add_argument("--decode", action="store_true", help="measure the tokenizer decode instead of sampling")
    args = p.parse_args(argv)
    if args.decode:
        text = decode_table(args.cases.split(","))
        print(text)
        return text
    config = TRANSFORMER_PRESETS["8b" if args.config == "full" else "tiny"]
    offloads = {"on": [True], "off": [False], "both": [False, True], "auto": ["auto"]}[args.offload_kv]
    rows = ["| case | token blocks | K/V offload | measured GB | estimate GB | est./measured | + weights GB | s |",
            "|---|---|---|---|---|---|---|---|"]
    for case in args.cases.split(","):
        schedule, extra = case_schedule(case)
        for plan in args.plans.split(","):
            chunk = "auto" if plan == "on" else None
            for offload in offloads:
                if offload == "auto":
                    offload = auto_offload_layers(config, schedule, WEIGHTS[args.weights], args.cap_gb * 1e9, chunk)
                start = time.perf_counter()
                peak, weights = measure(config, schedule, WEIGHTS[args.weights], chunk_tokens=chunk, offload_kv=offload,
                                        gguf_type=GGUF.get(args.weights), interact_clip=bool(extra))
                est = estimate_sampling_memory(config, schedule, dtype=torch.bfloat16, chunk_tokens=chunk,
                                               offload_kv=offload, native_gqa=True, weight_dtype=WEIGHTS[args.weights],
                                               text_tokens=TEXT_TOKENS + extra)
                layers = kv_cache.offloaded_layers(offload, config.depth)
                rows.append(f"| {case} | {plan} | {layers}/{config.depth} layers | {peak / 1e9:.2f} | {est / 1e9:.2f} | "
                            f"{est / peak:.2f} | {(peak + weights) / 1e9:.2f} | {time.perf_counter() - start:.0f} |")
                print(rows[-1], file=sys.stderr, flush=True)
    text = "\n".join(rows) + (f"\n\nconfig {args.config}, {args.weights} blocks, bf16 compute, CFG batch 2, "
                              f"{TEXT_TOKENS} text tokens; fake tensors, CUDA code path (no GPU); torch {torch.__version__}")
    print(text)
    return text


if __name__ == "__main__":
    main()
