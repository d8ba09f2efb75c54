"""The pack's seam to ComfyUI's memory manager, progress bar and interrupt flag.

The only module of the pack that imports ``comfy.model_management``, ``comfy.model_patcher``, ``comfy.ops`` and
``comfy.utils``. It picks the ``comfy.ops`` family for the weight/compute dtypes, wraps each module (transformer,
T5, tokenizer) in ComfyUI's patcher class (``CoreModelPatcher`` looked up at call time, so upstream's dynamic-VRAM
patcher is used when ``main.py`` installed it), loads through ``load_models_gpu(memory_required=...)``, reports
progress per AR step with interrupt checks and previews, and cleans up in ``finally``.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import sys
import threading
import weakref
from collections.abc import Iterator

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.utils
import torch
from comfy.cli_args import LatentPreviewMethod, PerformanceFeature, args

logger = logging.getLogger(__name__)

WEIGHT_DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                 "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
                 "auto": None}  # appended: saved workflows name their choice, old and new lists agree on each
AUTO_WEIGHTS = "auto"  # the weight_dtype that picks by the GPU's size (:func:`auto_weight_dtype`)
COMPUTE_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MAX_NODE_MESSAGES = 6  # the latest warnings shown on a node (each one also goes to the server log)
PREVIEW_EVERY = 4  # AR steps between previews; a preview costs a 64x64 eigendecomposition (without a tokenizer)


# ---------------------------------------------------------------------------------------------- devices, ops

def devices(kind: str) -> tuple[torch.device, torch.device]:
    """(load device, offload device) ComfyUI assigns to a 'transformer', 'text_encoder' or 'vae'."""
    if kind == "text_encoder":
        return mm.text_encoder_device(), mm.text_encoder_offload_device()
    if kind == "vae":
        return mm.vae_device(), mm.vae_offload_device()
    return mm.get_torch_device(), mm.unet_offload_device()


# ComfyUI's start flags for a model's precision, which an "auto" dtype follows as core's own loaders do: (args
# attribute, flag, our choice; None: a dtype the pack does not offer for it). --force-fp16 sets fp16_unet.
PRECISION_FLAGS = {
    "transformer": (("fp32_unet", "--fp32-unet", "fp32"), ("bf16_unet", "--bf16-unet", "bf16"),
                    ("fp16_unet", "--fp16-unet", "fp16"), ("fp8_e4m3fn_unet", "--fp8_e4m3fn-unet", "fp8_e4m3fn"),
                    ("fp8_e5m2_unet", "--fp8_e5m2-unet", "fp8_e5m2"), ("fp64_unet", "--fp64-unet", None),
                    ("fp8_e8m0fnu_unet", "--fp8_e8m0fnu-unet", None)),
    "text encoder": (("fp32_text_enc", "--fp32-text-enc", "fp32"), ("bf16_text_enc", "--bf16-text-enc", "bf16"),
                     ("fp16_text_enc", "--fp16-text-enc", "fp16"),
                     ("fp8_e4m3fn_text_enc", "--fp8_e4m3fn-text-enc", None),
                     ("fp8_e5m2_text_enc", "--fp8_e5m2-text-enc", None)),
    "video tokenizer": (("fp32_vae", "--fp32-vae", "fp32"), ("bf16_vae", "--bf16-vae", "bf16"),
                        ("fp16_vae", "--fp16-vae", "fp16")),
}


def start_flag(kind: str) -> tuple[str, str | None] | None:
    """The precision flag ComfyUI was started with for ``kind`` ('transformer', 'text encoder', 'video
    tokenizer') and the pack's dtype choice it names (--bf16-unet -> 'bf16'; None for a dtype the pack does not
    offer: fp8 flan-t5, fp64), or None without such a flag."""
    for attr, flag, choice in PRECISION_FLAGS[kind]:
        if getattr(args, attr, False):
            return flag, choice
    return None


def say_flag(kind: str, found: tuple[str, str | None] | None, applied: str | None,
             why_none: str = "chosen on its loader") -> None:
    """Log what a start flag did to ``kind``'s auto dtypes: ``applied`` names the ones it set ('auto dtype',
    'auto weight and compute dtypes'); None: it set none, for the reason ``why_none``."""
    if found is None:
        return
    flag, choice = found
    if applied and choice is None:
        logger.warning("InfinityStar: ComfyUI's %s is not offered for the %s; its %s %s as without the flag", flag,
                       kind, applied, "pick" if applied.endswith("dtypes") else "picks")
    elif applied:
        logger.info("InfinityStar: ComfyUI was started with %s, so the %s's %s %s %s", flag, kind, applied,
                    "are" if applied.endswith("dtypes") else "is", choice)
    else:
        logger.info("InfinityStar: ComfyUI was started with %s; it changes none of the %s's dtypes (%s)", flag, kind,
                    why_none)


def flagged_dtype(kind: str) -> str | None:
    """The dtype choice of ``kind``'s start flag, for a loader whose one dtype is on auto (logged), or None."""
    found = start_flag(kind)
    say_flag(kind, found, "auto dtype")
    return found[1] if found else None


def computes_in(choice: str, device: torch.device) -> bool:
    """Whether a start flag's dtype can also be the compute dtype on ``device``: bf16 only on a CPU or a GPU that
    has it (core then casts per layer to what the GPU has, as auto does here)."""
    return choice != "bf16" or mm.is_device_cpu(device) or bool(mm.should_use_bf16(device))


def resolve_compute_dtype(choice: str, device: torch.device, fp16_fallback: bool = True) -> torch.dtype:
    """'auto' -> bf16 where the device supports it (the official numerics), else fp16 on GPUs, else fp32.

    ``fp16_fallback=False`` (the tokenizer) skips fp16 unless chosen: a video VAE's activations can overflow fp16's
    range (black or NaN frames)."""
    if COMPUTE_DTYPES.get(choice) is not None:
        return COMPUTE_DTYPES[choice]
    if mm.is_device_cpu(device):
        return torch.float32
    if mm.should_use_bf16(device):
        return torch.bfloat16
    return torch.float16 if fp16_fallback and mm.should_use_fp16(device) else torch.float32


def check_weight_dtype(weight_dtype: torch.dtype | None, load_device: torch.device) -> None:
    """Refuse storage dtypes the device cannot hold, before minutes of loading: Apple's MPS has no fp8."""
    if torch.device(load_device).type == "mps" and weight_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError("fp8 weights are not supported on Apple MPS devices; set weight_dtype to auto, default or fp16 "
                         "(ComfyUI streams the blocks from system memory when they do not fit).")


def auto_weight_dtype(info, load_device: torch.device, compute: torch.dtype, attention: str) -> torch.dtype | None:
    """weight_dtype "auto": on a CUDA GPU the official fp32 files' blocks in bf16 (fp16 where compute is fp16 on a
    GPU without bf16) when they and the weights' largest run (720p 5 s, 480p 10 s with the reference K/V in host
    memory) fit the GPU's total memory, else fp8 e4m3fn (scaled), as the CLI picks; logged. A file stored in bf16 or
    fp16 (``convert``'s) is kept as stored where it fits, else stored in fp8 the same way. Elsewhere, and for files
    stored in fp8 or GGUF, what "default" gives."""
    from ..infinitystar.attention import takes_gqa
    from ..infinitystar.checkpoint import default_block_dtype
    from ..infinitystar.memory import fit_block_dtype, largest_runs, weight_bytes
    from ..infinitystar.sampler import AUTO_HEADROOM

    default = default_block_dtype(info.dtype, load_device, compute)
    half = default or (info.dtype if info.dtype in (torch.bfloat16, torch.float16) else None)
    if half is None or torch.device(load_device).type != "cuda":
        return default
    total = mm.get_total_memory(load_device)
    runs = largest_runs(info.variant)
    gqa = takes_gqa(load_device, half, info.config.head_dim, attention)
    dtype = fit_block_dtype(info.config, [s for _, s in runs], total - mm.minimum_inference_memory() - AUTO_HEADROOM,
                            half, native_gqa=gqa)
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(half, str(half))
    run = " / ".join(n for n, _ in runs)
    if dtype == half:
        if default is None:  # stored in that half already: kept as stored
            return None
        logger.info("InfinityStar weight_dtype auto: %s blocks (%.1f GB); they and a %s run fit the %.1f GB of %s",
                    name, weight_bytes(info.config, half) / 1e9, run, total / 1e9, load_device)
    else:
        logger.warning("InfinityStar weight_dtype auto: %s blocks (%.1f GB) and a %s run do not fit the %.1f GB of "
                       "%s, so the blocks are stored in fp8 e4m3fn (%.1f GB, scaled; a small quality cost). "
                       "weight_dtype %s forces %s (ComfyUI then streams the blocks that do not fit, slower).",
                       name, weight_bytes(info.config, half) / 1e9, run, total / 1e9, load_device,
                       weight_bytes(info.config, dtype) / 1e9, name, name)
    return dtype


@functools.cache
def _castable_norm(cls: type) -> type:
    """One of the library's norm layers with ComfyUI's cast: ``comfy_cast_weights`` lets a partial load leave it on
    the offload device, and its weight then comes through ``cast_bias_weight`` (moved, cast, patched) while the
    arithmetic stays the library's. One class per norm class (cached)."""
    class Norm(cls, comfy.ops.CastWeightBiasOp):
        def weight_as(self, x, dtype):
            if self.comfy_cast_weights or len(self.weight_function) > 0:
                return comfy.ops.cast_bias_weight(self, x, dtype=dtype)[0]
            return super().weight_as(x, dtype)

    Norm.__name__ = Norm.__qualname__ = cls.__name__
    return Norm


def with_norms(family: type) -> type:
    """``family`` (a ``comfy.ops`` namespace) with the library's ``norm_layer`` hook (``infinitystar.ops``).

    Kept on the family itself: ComfyUI makes a new scaled-fp8 family per load, and a cache keyed by family would
    hold each one forever (the subclass refers to its base); this way each dies with its family."""
    made = family.__dict__.get("_infinitystar_with_norms")
    if made is None:
        made = type(family.__name__, (family,), {"norm_layer": staticmethod(_castable_norm)})
        type.__setattr__(family, "_infinitystar_with_norms", made)
    return made


def pick_ops(weight_dtype: torch.dtype | None, compute_dtype: torch.dtype, load_device: torch.device):
    """``comfy.ops`` family for storing in ``weight_dtype`` and computing in ``compute_dtype``.

    ``None`` (files kept as stored: fp32 on the CPU, or already bf16 / fp16 / fp8) gets ``manual_cast``, which
    casts per layer only when the dtypes differ. fp8_e4m3fn gets scaled-fp8 ops: the loader stores each block weight
    divided by its own scale (``infinitystar.ops.quantize_scaled``); ComfyUI's own family before 0.4 (with
    ``--fast fp8_matrix_mult`` it uses fp8 matmuls), the pack's (:func:`scaled_fp8_ops`) where ComfyUI has none.
    Every family carries ``comfy_cast_weights``, which is what lets a partial load leave layers on the offload
    device and stream them in.
    """
    if weight_dtype is None:
        return with_norms(comfy.ops.manual_cast)
    if weight_dtype == torch.float8_e4m3fn:  # per-tensor scaled, as ComfyUI's fp8_scaled checkpoints (see ops.py)
        fast = PerformanceFeature.Fp8MatrixMultiplication in (args.fast or ())
        if "scaled_fp8" not in inspect.signature(comfy.ops.pick_operations).parameters:  # ComfyUI 0.4 and newer
            return with_norms(scaled_fp8_ops(fast and mm.supports_fp8_compute(load_device)))
        return with_norms(comfy.ops.pick_operations(weight_dtype, compute_dtype, load_device, fp8_optimizations=fast,
                                                    scaled_fp8=torch.float8_e4m3fn))
    return with_norms(comfy.ops.pick_operations(weight_dtype, compute_dtype, load_device))


@functools.cache
def scaled_fp8_ops(fp8_matmul: bool = False) -> type:
    """A ``manual_cast`` family whose Linear holds a per-tensor ``scale_weight``, applied after ComfyUI's cast (so
    offloading keeps working; weight patches, which the pack's nodes never add, see the stored values), for ComfyUI
    0.4 and newer: they dropped the scaled-fp8 family (their fp8
    now comes as quantized tensors from per-layer checkpoint keys, which the pack's streaming loader does not
    write). The same arithmetic as the family older versions had; ``fp8_matmul`` (``--fast fp8_matrix_mult`` on a
    GPU with fp8 units) multiplies in fp8 as the library's ``Fp8MatmulLinear`` does."""
    from ..infinitystar.ops import fp8_linear

    class Linear(comfy.ops.manual_cast.Linear):
        def reset_parameters(self):
            if not hasattr(self, "scale_weight"):
                self.scale_weight = torch.nn.Parameter(torch.ones((), device=self.weight.device, dtype=torch.float32),
                                                       requires_grad=False)

        def _scale(self, like: torch.Tensor) -> torch.Tensor:
            return self.scale_weight.to(device=like.device, dtype=like.dtype)

        def forward_comfy_cast_weights(self, input):
            if fp8_matmul and self.weight.dtype == torch.float8_e4m3fn and input.is_floating_point():
                weight, bias = comfy.ops.cast_bias_weight(self, input, dtype=self.weight.dtype,
                                                          bias_dtype=input.dtype)[:2]  # moved, kept in fp8
                return fp8_linear(input, weight, self.scale_weight.to(device=weight.device, dtype=torch.float32), bias)
            weight, bias = comfy.ops.cast_bias_weight(self, input)[:2]
            if weight.numel() < input.numel():  # scale the smaller operand
                return torch.nn.functional.linear(input, weight * self._scale(weight), bias)
            return torch.nn.functional.linear(input * self._scale(weight), weight, bias)

        def convert_weight(self, weight, inplace=False, **kwargs):  # what weight patches see: the real values
            return weight.mul_(self._scale(weight)) if inplace else weight * self._scale(weight)

        def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
            weight = (weight / self._scale(weight)).to(self.weight.dtype)
            if return_weight:
                return weight
            if inplace_update:
                self.weight.data.copy_(weight)
            else:
                self.weight = torch.nn.Parameter(weight, requires_grad=False)

    return type("scaled_fp8_ops", (comfy.ops.manual_cast,), {"Linear": Linear})


def gguf_ops():
    """ops for a GGUF transformer: the library's dequantizing Linear, with the attributes ComfyUI's patcher looks
    for. ``comfy_cast_weights`` lets a partial load leave a layer's (quantized) weight in system RAM; the layer
    moves and dequantizes it at every call either way, so it needs no cast from ComfyUI."""
    from ..infinitystar.gguf import GGUFLinear

    class Linear(GGUFLinear, comfy.ops.CastWeightBiasOp):
        def reset_parameters(self):
            return None

    class gguf_ops:  # noqa: N801
        norm_layer = staticmethod(_castable_norm)

    gguf_ops.Linear = Linear
    return gguf_ops


def text_encoder_dtype(choice: str) -> torch.dtype:
    """'auto' -> ComfyUI's --fp16/bf16/fp32-text-enc where it was started with one; else fp16 on GPUs (the official
    flan-t5 dtype), fp32 on the CPU where fp16 matmuls are slow."""
    if choice == "auto":
        choice = flagged_dtype("text encoder") or choice
    if COMPUTE_DTYPES.get(choice) is not None:
        return COMPUTE_DTYPES[choice]
    device, _ = devices("text_encoder")
    return torch.float32 if mm.is_device_cpu(device) else torch.float16


def intermediate_device() -> torch.device:
    return mm.intermediate_device()


# ---------------------------------------------------------------------------------------------- patchers

class InfinityStarTextEncoder(torch.nn.Module):
    """Holds the flan-t5 encoder for its patcher: the class name is what ComfyUI's log says it loads."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner


def _module(patcher):
    """The module a patcher manages, unwrapped from its holder."""
    module = patcher.model
    return module.inner if isinstance(module, InfinityStarTextEncoder) else module


def _place_small_tensors(patcher, device_to, lowvram_model_memory, force_patch_weights, full_load) -> None:
    """ON_LOAD callback of the transformer's patcher.

    The patcher moves leaf modules only, and the whole model only when its budget exceeds the model's size. So in
    a partial load, and in a load whose budget covers every leaf but not the root's own parameters (a window of a
    few MB), ``cfg_uncond``/``sos_token`` (parameters of the root) would stay on the offload device, and the small
    fp32 embeddings/heads may be left there too while the sampler takes its device from ``word_embed``. They are a
    few MB for the 8B model, so they always go to the load device.
    """
    model = patcher.model
    if device_to is None:
        return
    unpin = getattr(patcher, "unpin_weight", None)  # ComfyUI 0.3.68+: offloaded weights may sit in pinned memory
    for name in getattr(model, "fp32_modules", ()):
        obj = getattr(model, name, None)
        if isinstance(obj, torch.nn.Module | torch.nn.Parameter) and unpin is not None:
            keys = [name] if isinstance(obj, torch.nn.Parameter) else [f"{name}.{n}" for n, _ in obj.named_parameters()]
            for key in keys:  # unregistered before the move frees the pinned copy, or ComfyUI's records keep it
                if key in getattr(patcher, "pinned", ()):
                    unpin(key)
        if isinstance(obj, torch.nn.Parameter):
            obj.data = obj.data.to(device_to)
        elif isinstance(obj, torch.nn.Module):
            obj.to(device_to)


def _small_tensors_home(patcher) -> None:
    """Put the transformer's small fp32 modules back on the load device where a load left them elsewhere: ComfyUI
    0.3.76+ may partly unload an already loaded model to fit a run (smallest modules first), without the ON_LOAD
    callback, and the sampler runs where ``word_embed`` is."""
    model, device = patcher.model, torch.device(patcher.load_device)
    for name in getattr(model, "fp32_modules", ()):
        obj = getattr(model, name, None)
        tensors = [obj] if isinstance(obj, torch.nn.Parameter) else list(getattr(obj, "parameters", list)())
        if any(t.device != device for t in tensors):
            _place_small_tensors(patcher, device, 0, False, False)
            return


def make_patcher(module: torch.nn.Module, kind: str):
    """Wrap ``module`` in ComfyUI's patcher for a 'transformer', 'text_encoder' or 'vae'."""
    load_device, offload_device = devices(kind)
    patcher_cls = getattr(comfy.model_patcher, "CoreModelPatcher", None) or comfy.model_patcher.ModelPatcher
    if kind == "text_encoder":
        module = InfinityStarTextEncoder(module)
    patcher = patcher_cls(module, load_device=load_device, offload_device=offload_device)
    if kind == "transformer":
        patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_LOAD, _place_small_tensors)
    return patcher


def sampling_plan(patcher, config, schedule, compute_dtype: torch.dtype, extra_tokens: int = 0,
                  batch: int = 2, attention: str = "sdpa") -> tuple[int, int]:
    """(bytes to ask ComfyUI for, layers whose reference K/V is kept in host memory) for one generation
    (``batch`` 2 with guidance, 1 without). ``extra_tokens``: prefix-condition tokens every step reads (interact),
    counted like text.

    Reference K/V goes to host memory only when weights + activations + K/V would not fit the device even
    with every other model evicted, and then only for the fewest layers that make it fit: one copy of a
    layer's clip-1 reference per clip-2 step costs less than streaming the blocks through partial loading
    on every step. What is left over still goes to ComfyUI's partial loading.
    """
    from ..infinitystar.attention import takes_gqa
    from ..infinitystar.memory import TEXT_TOKENS, choose_kv_offload, estimate_sampling_memory

    text_tokens = TEXT_TOKENS + int(extra_tokens)
    device = torch.device(patcher.load_device)
    weights = _block_dtype(patcher)
    # where the kernel cannot read GQA K/V as it is, each call holds a copy per query head: count it
    gqa = takes_gqa(device, compute_dtype, config.head_dim, attention)
    layers = 0
    if device.type not in ("cpu", "mps"):  # host memory is the device's memory there
        room = mm.get_total_memory(device) - mm.minimum_inference_memory() - patcher.model_size()
        layers = choose_kv_offload(config, schedule, room, batch=batch, dtype=compute_dtype, weight_dtype=weights,
                                   text_tokens=text_tokens, native_gqa=gqa)
        if layers:
            logger.info("InfinityStar: the reference K/V of %d of %d layers is kept in host memory to fit this "
                        "%d-clip run on %s", layers, config.depth, schedule.num_clips, device)
    need = estimate_sampling_memory(config, schedule, batch=batch, dtype=compute_dtype, offload_kv=layers,
                                    weight_dtype=weights, text_tokens=text_tokens, native_gqa=gqa)
    return int(need), layers


def _block_dtype(patcher) -> torch.dtype | None:
    """How the transformer's blocks are stored (fp8 storage costs an upcast weight copy per call)."""
    fn = getattr(_module(patcher), "block_dtype", None)
    return fn() if callable(fn) else None


def free_memory_for(patcher) -> int:
    """Free bytes on the patcher's load device after loading (sizes decode chunks)."""
    return int(mm.get_free_memory(patcher.load_device))


def free_ram() -> int:
    """Free system memory in bytes, as ComfyUI counts it."""
    return int(mm.get_free_memory(torch.device("cpu")))


def total_ram() -> int:
    """The machine's system memory in bytes, as ComfyUI counts it."""
    return int(mm.get_total_memory(torch.device("cpu")))


def release(patcher) -> None:
    """Take ``patcher`` off ComfyUI's loaded-model list and back to its offload device."""
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        loaded = mm.current_loaded_models[i]
        if loaded.model is patcher:
            loaded.model_unload()
            mm.current_loaded_models.pop(i)
    mm.soft_empty_cache()


def empty_cache() -> None:
    mm.soft_empty_cache()


def is_loaded(patcher) -> bool:
    return any(loaded.model is patcher for loaded in mm.current_loaded_models)


@contextlib.contextmanager
def loaded(patcher, memory_required: int = 0, *, force_full_load: bool = False) -> Iterator[torch.nn.Module]:
    """Load through ComfyUI's manager (evicting/partially loading as it sees fit) and yield the module.

    On any exception (interrupt included) the model is unloaded, so nothing stays pinned on the device;
    on success it stays resident for the next prompt, until ComfyUI needs the room for another model.
    """
    mm.load_models_gpu([patcher], memory_required=int(memory_required), force_full_load=force_full_load)
    ok = False
    try:
        _small_tensors_home(patcher)
        yield _module(patcher)
        ok = True
    finally:
        if not ok:
            try:
                release(patcher)
            except Exception:  # e.g. after a CUDA fault: the error that stopped the node is the one to show
                logger.exception("InfinityStar: unloading %s after an error failed too", type(_module(patcher)).__name__)
        else:
            mm.soft_empty_cache()


# ---------------------------------------------------------------------------------------------- progress

INTERRUPTED = mm.InterruptProcessingException  # what check_interrupt raises


def check_interrupt() -> None:
    mm.throw_exception_if_processing_interrupted()


def previews_enabled() -> bool:
    return args.preview_method != LatentPreviewMethod.NoPreviews


def accumulator_preview(accumulator: torch.Tensor, max_size: int | None = None, projection=None):
    """PIL image of the last latent frame of a (1, 64, T, H, W) code accumulator, scaled up to about
    ``max_size``: colours from ``projection`` (see :func:`preview_projection`), else layout only
    (:func:`infinitystar.preview.preview_rgb`)."""
    from PIL import Image

    from ..infinitystar.preview import preview_rgb

    rgb = preview_rgb(accumulator, projection)
    h, w, _ = rgb.shape
    img = Image.fromarray(rgb.numpy())
    scale = max(1, min(16, (max_size or args.preview_size) // max(h, w)))
    return img.resize((w * scale, h * scale), Image.NEAREST)


_PROJECTIONS = weakref.WeakKeyDictionary()  # tokenizer patcher -> its fitted preview colours


def preview_projection(vae):
    """The code -> colour map of the tokenizer in ``vae`` (a ``LoadedVAE``) for previews, fitted once per loaded
    tokenizer (one small decode through ComfyUI's manager). None when previews are off or no tokenizer is
    connected; also when the fit fails (previews then show layout only, sampling goes on)."""
    if vae is None or not previews_enabled():
        return None
    projection = _PROJECTIONS.get(vae.patcher)
    if projection is None:
        from ..infinitystar.preview import fit_rgb_projection

        try:
            with loaded(vae.patcher, force_full_load=True) as tokenizer:
                projection = fit_rgb_projection(tokenizer)
        except (RuntimeError, ValueError) as e:  # out of memory included; an interrupt still propagates
            logger.warning("InfinityStar: colour previews unavailable (%s); previews show layout only", e)
            return None
        _PROJECTIONS[vae.patcher] = projection
    return projection


class StepProgress:
    """``sampler`` callback: ComfyUI progress per AR step, interrupt check, preview every few steps."""

    def __init__(self, total_steps: int, preview_every: int = PREVIEW_EVERY, node_id: str | None = None,
                 projection=None):
        self.bar = comfy.utils.ProgressBar(total_steps, node_id=node_id)
        self.preview_every = max(1, int(preview_every))
        self.previews = previews_enabled()
        self.projection = projection  # preview colours (preview_projection); None = layout only
        self.last_preview = None

    def __call__(self, step_index: int, total_steps: int, accumulators) -> None:
        check_interrupt()
        preview = None
        done = step_index + 1
        if self.previews and accumulators and (done % self.preview_every == 0 or done == total_steps):
            self.last_preview = accumulator_preview(accumulators[-1], projection=self.projection)
            preview = ("JPEG", self.last_preview, args.preview_size)
        self.bar.update_absolute(done, total_steps, preview)


class ChunkProgress:
    """``callback(done, total)`` for tokenizer encode/decode chunks, with an interrupt check."""

    def __init__(self, node_id: str | None = None):
        self.bar = comfy.utils.ProgressBar(1, node_id=node_id)

    def __call__(self, done: int, total: int) -> None:
        check_interrupt()
        self.bar.update_absolute(done, total)


# ---------------------------------------------------------------------------------------------- node messages

_PACKAGE_LOGGER = __package__.rpartition(".")[0] or "infinitystar"  # the pack's root: nodes and library below it


def send_node_text(text: str, node_id) -> None:
    """ComfyUI's text under a node (the frontend shows it on the node); nothing without a running server (ComfyUI's
    ``main.py`` imports its ``server`` module; importing it here would start what a headless import does not need)."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is not None and node_id is not None:
        instance.send_progress_text(text, str(node_id))


class _NodeMessages(logging.Handler):
    """Collects the pack's warnings raised while one node runs (on this thread) and shows them on that node."""

    def __init__(self, node_id):
        super().__init__(logging.WARNING)
        self.node_id, self.thread, self.lines = node_id, threading.get_ident(), []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread:
            return
        try:
            self.lines.append(record.getMessage())
            send_node_text("\n".join(self.lines[-MAX_NODE_MESSAGES:]), self.node_id)
        except Exception:  # noqa: BLE001 — a message must never break a run; the server log has it anyway
            pass


@contextlib.contextmanager
def node_messages(node_id) -> Iterator[list[str]]:
    """While the block runs, the pack's warnings (crop, truncated prompt, untrained size...) also appear on node
    ``node_id`` in the UI: users rarely read the server log. Yields the list of messages shown."""
    handler = _NodeMessages(node_id)
    log = logging.getLogger(_PACKAGE_LOGGER)
    log.addHandler(handler)
    try:
        yield handler.lines
    finally:
        log.removeHandler(handler)


def shows_warnings(execute):
    """Decorator for a V3 node's ``execute`` (below ``@classmethod``): run it inside ``node_messages`` for the node's
    ``unique_id`` (declare ``hidden=[io.Hidden.unique_id]``)."""
    @functools.wraps(execute)
    def run(cls, *args, **kwargs):
        with node_messages(getattr(cls.hidden, "unique_id", None)):
            return execute(cls, *args, **kwargs)
    run.shows_warnings = True  # what the tests look for on every node
    return run


# ---------------------------------------------------------------------------------------------- video inputs

def video_file(video):
    """The file (path or BytesIO) a core VIDEO decodes its frames from, when decoding picked frames from it gives
    what its ``get_components`` would: a plain Load Video (``VideoFromFile``) without a trim or crop window. None
    for any other VIDEO (built from tensors, trimmed, a subclass), whose frames must come from ``get_components``."""
    from comfy_api.latest import InputImpl

    if type(video) is not InputImpl.VideoFromFile:
        return None
    window = getattr(video, "get_active_trim_window", None)  # newer ComfyUI trims and crops without decoding
    if window is not None and tuple(window()) != (0.0, 0.0):
        return None
    if getattr(video, "_VideoFromFile__crop", None) is not None:
        return None
    return video.get_stream_source()
