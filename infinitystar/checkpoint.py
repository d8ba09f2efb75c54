"""Loading the official checkpoint files exactly as published (spec §7), with low peak host memory.

Transformer: a sharded fp32 safetensors folder (``model.safetensors.index.json`` + shards), a single
``.safetensors`` file, or a ``.pth`` (plain state dict or ``['trainer']['gpt_fsdp']``), in any float dtype.
Tokenizer: ``infinitystar_videovae.pth`` (``{"vae": state_dict}``) or a ``.safetensors``.

The model is built on the ``meta`` device and each tensor is read, cast to its target dtype and assigned as it
arrives, so the host never holds more than the final model plus one tensor. Safetensors files are read with
plain positioned reads (no mmap), which keeps file pages out of the resident set.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from . import gguf
from .checkpoint_files import (  # noqa: F401  (re-exported: the reader is part of this module's interface)
    DOWNLOAD_HINT,
    INDEX_FILE,
    SHARD_NAME,
    CheckpointReader,
    TensorEntry,
    checkpoint_files,
)
from .config import FP32_MODULES, is_block_key, is_released_size
from .ops import SCALE_KEYS, quantize_scaled, scaled_cast, scaled_fp8_matmul

logger = logging.getLogger(__name__)

CFG_UNCOND_ROWS = 512
LEGACY_BUFFERS = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2)
VARIANTS = ("720p", "480p", "interact")


@dataclass(frozen=True)
class CheckpointInfo:
    variant: str  # "720p", "480p", "interact" or "unknown" (the released models have identical shapes)
    config: object  # TransformerConfig detected from the tensor shapes
    dtype: torch.dtype  # storage dtype of the blocks after loading (uint8: GGUF-quantized)
    path: Path
    quant: str = ""  # GGUF files: the blocks' quantization (e.g. "Q8_0")

    @property
    def storage(self) -> str:
        return f"GGUF {self.quant}" if self.quant else str(self.dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------- what is this file

_FOREIGN = (  # (key substring, description): checked in order, first hit wins
    ("lora_A", "a LoRA (PEFT lora_A/lora_B weights), not a base model"),
    ("lora_down", "a LoRA (lora_down/lora_up weights), not a base model"),
    ("sa.mat_qkv", "an Infinity image model (Infinity-2B/8B, FoundationVision/Infinity), not InfinityStar"),
    ("shared_ada_lin", "an Infinity image model (Infinity-2B/8B, FoundationVision/Infinity), not InfinityStar"),
    ("self_attn.q.weight", "a Wan video model (Wan2.x), not InfinityStar"),
    ("patch_embedding", "a Wan video model (Wan2.x), not InfinityStar"),
    ("double_blocks.", "a Flux/HunyuanVideo-style diffusion model, not InfinityStar"),
    ("joint_blocks.", "a Stable Diffusion 3 model, not InfinityStar"),
    ("input_blocks.", "a Stable Diffusion (UNet) checkpoint, not InfinityStar"),
    ("first_stage_model.", "a Stable Diffusion checkpoint, not InfinityStar"),
    ("transformer_blocks.", "a diffusers-format transformer, not InfinityStar"),
    ("SelfAttention.q.weight", "a T5 text encoder (load it as the text encoder folder instead)"),
)


def is_transformer_keys(keys) -> bool:
    keys = set(keys)
    return "cfg_uncond" in keys and "semantic_head2.weight" in keys and any(
        is_block_key(k) and ".attn.q_proj." in k for k in keys)


def is_tokenizer_keys(keys) -> bool:
    keys = set(keys)
    return "encoder.conv_in.conv.weight" in keys and "scale_learnable_parameters" in keys


def detect_variant(path: str | Path, metadata: Mapping | None = None) -> str:
    """'720p' / '480p' / 'interact' from the file or folder name or index metadata; the released models' shapes
    are identical."""
    meta_variant = str((metadata or {}).get("variant", ""))
    if meta_variant in VARIANTS:
        return meta_variant
    for part in reversed(Path(path).resolve().parts[-3:]):
        found = re.findall(r"(720p|480p|interact)", part.lower())
        if found:
            return found[-1]
    return "unknown"


def describe_keys(shapes: Mapping[str, tuple], path: str | Path = "", metadata: Mapping | None = None) -> str:
    """A short human description of what a state dict (key -> shape) holds."""
    keys = list(shapes)
    if is_transformer_keys(keys):
        from .config import detect_transformer_config

        try:
            config = detect_transformer_config(shapes)
        except ValueError:
            return "an InfinityStar-like transformer with unexpected tensors"
        size = "8B" if is_released_size(config) else f"{config.depth}-block width-{config.width}"
        variant = detect_variant(path, metadata)
        return f"InfinityStar {size} transformer ({variant if variant != 'unknown' else 'unknown variant'})"
    if is_tokenizer_keys(keys):
        return "InfinityStar video tokenizer (VAE)"
    for needle, what in _FOREIGN:
        if any(needle in k for k in keys):
            return what
    return f"an unrecognised checkpoint ({len(keys)} tensors, e.g. {', '.join(keys[:3])})"


def identify_file(path: str | Path) -> str:
    """Describe a checkpoint file or folder without loading its tensors."""
    reader = CheckpointReader(path)
    return describe_keys(reader.shapes, path, reader.metadata())


# ---------------------------------------------------------------------------------------------- loading

MAX_TEXT_CHANNELS = 8192  # T5 widths go to 4096 (t5-xxl); the null text is extended to 512 rows of it on load


def initial_cfg_uncond(rows: int, channels: int) -> torch.Tensor:
    """The official model's initial null text: trunc-normal(std 1.2) from a seed-0 CPU generator / sqrt(C)."""
    out = torch.empty(CFG_UNCOND_ROWS, channels)
    torch.nn.init.trunc_normal_(out, std=1.2, generator=torch.Generator("cpu").manual_seed(0))
    return (out / channels ** 0.5)[:rows]


def adapt_cfg_uncond(tensor: torch.Tensor, rows: int = CFG_UNCOND_ROWS) -> torch.Tensor:
    """Truncate or extend ``cfg_uncond`` to ``rows`` like the official ``load_state_dict`` (extra rows = init)."""
    if tensor.shape[0] >= rows:
        return tensor[:rows]
    extra = initial_cfg_uncond(rows, tensor.shape[1])[tensor.shape[0]:]
    return torch.cat([tensor, extra.to(tensor.dtype)])


def _few(items: list[str]) -> str:
    return ", ".join(items[:5]) + (f" … (+{len(items) - 5} more)" if len(items) > 5 else "")


def check_keys(expected: Mapping[str, tuple], found: Mapping[str, tuple], path: Path, what: str,
               description: str) -> None:
    """Raise ValueError naming the file when keys or shapes differ from the model's."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    bad = [f"{k} {tuple(found[k])} vs {tuple(expected[k])}" for k in expected
           if k in found and tuple(found[k]) != tuple(expected[k])]
    if not (missing or unexpected or bad):
        return
    parts = [f"{len(xs)} {label}: {_few(xs)}" for label, xs in
             (("missing", missing), ("unexpected", unexpected), ("mis-shaped (file vs model)", bad)) if xs]
    raise ValueError(f"{path} does not match the {what}: " + "; ".join(parts)
                     + f". The file looks like {description}.{shard_hint(path)} {DOWNLOAD_HINT}")


def shard_hint(path: str | Path) -> str:
    """' It is shard i of n ...' when ``path`` is one file of a sharded checkpoint (picked on its own), else ''."""
    shard = SHARD_NAME.search(Path(path).name)
    if not shard or int(shard[2]) < 2:
        return ""
    return (f" It is shard {int(shard[1])} of {int(shard[2])} of a sharded checkpoint: choose the folder that holds "
            f"all its shards (and {INDEX_FILE}) instead.")


def _assign(model: torch.nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if name in module._parameters:
        module._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)
    elif name in module._buffers:
        module._buffers[name] = tensor
    else:
        raise KeyError(key)


def _left_on_meta(model: torch.nn.Module) -> list[str]:
    names = [n for n, p in model.named_parameters() if p.is_meta]
    return names + [n for n, b in model.named_buffers() if b.is_meta]


def stored_bytes(entry: TensorEntry) -> int:
    """Bytes one tensor takes in its file (what a load reads for it)."""
    if entry.end >= entry.start >= 0:
        return entry.end - entry.start
    return math.prod(entry.shape) * torch.empty((), dtype=entry.dtype).element_size()


def stream_into(model: torch.nn.Module, reader: CheckpointReader, target, device, rename=None,
                transform=None, callback=None) -> None:
    """Read each tensor as ``target(key, stored)`` dtype on ``device`` and assign it into the meta-built model
    (``transform(key, tensor)`` may turn one file tensor into several (key, tensor) pairs). Keys that ``rename``
    maps to None are not read at all, and of keys renamed alike only the first is.

    ``callback(done_bytes, total_bytes)`` runs after each tensor (file bytes): a host's progress bar, and its
    cancel, which raises out of here; this frame then holds no tensor, so the caller can drop the model whole."""
    wanted, seen = None, set()
    if rename is not None:
        wanted = []
        for key in reader.read_order():
            name = rename(key)
            if name is not None and name not in seen:
                seen.add(name)
                wanted.append(key)
    total = sum(stored_bytes(reader.entries[k]) for k in (reader.read_order() if wanted is None else wanted))
    done = 0
    for key, tensor in reader.tensors(target, device, keys=wanted):
        done += stored_bytes(reader.entries[key])
        key = rename(key) if rename else key
        if key is None:
            continue
        for k, t in transform(key, tensor) if transform else ((key, tensor),):
            _assign(model, k, adapt_cfg_uncond(t) if k == "cfg_uncond" else t)
        tensor = t = None  # (a raising callback leaves this frame in the traceback: hold nothing)
        if callback is not None:
            callback(done, total)
    left = _left_on_meta(model)
    if left:
        raise ValueError(f"{reader.path}: these model tensors were not filled by the file: {_few(left)}")


def drop_tensors(model: torch.nn.Module) -> None:
    """Put every parameter and buffer back on the meta device: a load that stopped part way (an error, a cancel)
    frees what it read even while the exception's traceback still refers to the model."""
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, value in table.items():
                if value is not None and not value.is_meta:
                    table[name] = torch.nn.Parameter(value.to("meta"), requires_grad=False) \
                        if isinstance(value, torch.nn.Parameter) else value.to("meta")


SCALED_FP8 = torch.float8_e4m3fn  # stored with a per-tensor scale (ops.ScaledCastLinear); e5m2 needs none


def _fill_scales(model: torch.nn.Module, device) -> None:
    for module in model.modules():
        for name in SCALE_KEYS:
            p = module._parameters.get(name)
            if p is not None and p.is_meta:
                module._parameters[name] = torch.nn.Parameter(torch.ones((), device=device), requires_grad=False)


def _scaled_fp8_hooks(model: torch.nn.Module, target):
    """(target, transform) for :func:`stream_into` that store e4m3fn block weights scaled, in the layers that have
    a ``scale_weight`` (``ops.ScaledCastLinear``, ComfyUI's scaled-fp8 ops): those weights are read as stored and
    quantized with their own scale (:func:`infinitystar.ops.quantize_scaled`); everything else as ``target`` says."""
    scaled = {name for name, m in model.named_modules()
              if isinstance(getattr(m, "scale_weight", None), torch.nn.Parameter)}

    def quantized(key: str, tensor: torch.Tensor) -> bool:  # matmul weights that plain storage would make fp8
        return key.endswith(".weight") and key.rpartition(".")[0] in scaled and target(key, tensor) == SCALED_FP8

    def read_as(key: str, tensor: torch.Tensor) -> torch.dtype:
        return tensor.dtype if quantized(key, tensor) else target(key, tensor)

    def transform(key: str, tensor: torch.Tensor):
        if not quantized(key, tensor):
            return ((key, tensor),)
        weight, scale = quantize_scaled(tensor, SCALED_FP8)
        return ((key, weight), (key[: -len("weight")] + "scale_weight", scale))

    return read_as, transform


def transformer_storage(dtype: torch.dtype | None, keep_fp32_modules: bool = True,
                        fp32_modules: tuple[str, ...] = FP32_MODULES, fp32_norms: bool = False):
    """``target(key, tensor) -> dtype``: how the transformer's tensors are stored for block dtype ``dtype`` in the
    official layout (None keeps each tensor's own dtype); the loader, the memory estimate and the benchmarks' random
    models all follow it. ``fp32_norms``: the blocks' norm weights stay fp32 (the interact layout, see
    :func:`block_norms_fp32`)."""
    def target(key: str, tensor: torch.Tensor) -> torch.dtype:
        if dtype is None or not tensor.is_floating_point():
            return tensor.dtype
        if key.split(".")[0] in fp32_modules:
            return torch.float32 if keep_fp32_modules else (dtype if dtype.itemsize > 1 else torch.bfloat16)
        if fp32_norms and key.endswith("norm.weight"):
            return torch.float32
        if dtype.itemsize == 1 and tensor.ndim < 2:  # fp8 storage is for matmul weights; norms stay bf16
            return torch.bfloat16
        return dtype
    return target


def block_norms_fp32(variant: str) -> bool:
    """Whether the blocks' RMSNorm weights stay fp32 when the blocks are stored in a smaller dtype.

    The T2V scripts cast their blocks to bf16 (norm weights included) and run them under bf16 autocast. The
    interact script keeps its blocks fp32 under the same autocast: autocast rounds each matmul weight to bf16 at
    the call, as bf16 storage does, and the tokens are bf16 in both, so only the norm weights differ; the norms
    compute in fp32 with them. Keeping just those fp32 (a few hundred KB) follows the interact script."""
    return variant == "interact"


def default_block_dtype(stored: torch.dtype, device: torch.device | str,
                        compute: torch.dtype | None = None) -> torch.dtype | None:
    """Block storage for "default" (None: as stored). The official files are fp32 (35 GB); the official scripts
    load their blocks in bf16 on the GPU (17.6 GB), so that is what default gives there, or fp16 where the compute
    dtype is fp16 (a device without bf16: Turing, MPS before macOS 14, DirectML). The CPU keeps fp32 (the golden
    arithmetic); files stored otherwise (bf16, fp16, fp8, GGUF) stay as they are."""
    from .ops import native_bf16

    device = torch.device(device)
    if stored == torch.float32 and device.type != "cpu":
        return torch.float16 if compute == torch.float16 and not native_bf16(device) else torch.bfloat16
    return None


def inspect_transformer(path: str | Path) -> CheckpointInfo:
    """Variant, config and stored block dtype of a transformer checkpoint, without reading its tensors."""
    from .config import detect_transformer_config

    reader = CheckpointReader(path)
    shapes = {k: v for k, v in reader.shapes.items() if k not in LEGACY_BUFFERS}
    if not is_transformer_keys(shapes):
        raise ValueError(f"{reader.path} is not an InfinityStar transformer: it looks like "
                         f"{describe_keys(shapes, path, reader.metadata())}.{shard_hint(reader.path)} {DOWNLOAD_HINT}")
    block = next(k for k in shapes if is_block_key(k) and k.endswith("q_proj.weight"))
    return CheckpointInfo(detect_variant(path, reader.metadata()), detect_transformer_config(shapes),
                          reader.entries[block].dtype, reader.path, _gguf_quant(reader))


def checked_transformer(reader: CheckpointReader, path: str | Path, ops=torch.nn):
    """The transformer ``reader`` holds, built on the meta device from ``ops`` after its keys and shapes were checked
    (every tensor expected, nothing foreign; a null text of a T5 width): (model, config, description). What a loader
    or a converter checks before reading any tensor."""
    from .config import detect_transformer_config
    from .transformer import InfinityStarTransformer

    shapes = {k: v for k, v in reader.shapes.items() if k not in LEGACY_BUFFERS}
    description = describe_keys(shapes, path, reader.metadata())
    if not is_transformer_keys(shapes):
        raise ValueError(f"{reader.path} is not an InfinityStar transformer: it looks like {description}."
                         f"{shard_hint(reader.path)} {DOWNLOAD_HINT}")
    config = detect_transformer_config(shapes)
    if "cfg_uncond" in shapes and (len(shapes["cfg_uncond"]) != 2 or shapes["cfg_uncond"][0] < 1
                                   or config.text_channels > MAX_TEXT_CHANNELS):
        raise ValueError(f"{reader.path}: cfg_uncond {tuple(shapes['cfg_uncond'])} with {config.text_channels} text "
                         f"channels is no InfinityStar null text (rows x T5 width, at most {MAX_TEXT_CHANNELS}); the "
                         f"file is damaged or foreign. {DOWNLOAD_HINT}")
    with torch.device("meta"):
        model = InfinityStarTransformer(config, ops=ops)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.rpartition(".")[2] not in SCALE_KEYS}
    if "cfg_uncond" in shapes:
        shapes["cfg_uncond"] = (CFG_UNCOND_ROWS, *shapes["cfg_uncond"][1:])
    check_keys(expected, shapes, reader.path, "InfinityStar transformer", description)
    return model, config, description


def load_transformer(path: str | Path, *, dtype: torch.dtype | None = None, ops=torch.nn, device="cpu",
                     keep_fp32_modules: bool = True, fp8_matmul: bool = False, callback=None):
    """Load the InfinityStar transformer from an official file or sharded folder.

    ``dtype`` None keeps the file's dtype everywhere; otherwise the blocks are stored in ``dtype`` (fp8 only for
    matmul weights, norms then bf16; the interact weights' norms fp32, :func:`block_norms_fp32`) and the
    embeddings, heads, final norm and ``cfg_uncond`` stay fp32 as in the official precision layout.
    ``fp8_matmul`` (e4m3fn only, default ops): multiply the blocks in fp8
    (:class:`infinitystar.ops.Fp8MatmulLinear`). ``callback(done_bytes, total_bytes)``: see :func:`stream_into`; an
    exception from it stops the load and frees what was read. Returns ``(model, CheckpointInfo)``.
    """

    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(f"unsupported transformer dtype {dtype}; choose one of {FLOAT_DTYPES}")
    if fp8_matmul and (dtype != SCALED_FP8 or ops is not torch.nn):
        raise ValueError("fp8 matmuls need the blocks stored in fp8 e4m3fn (--dtype fp8) and the default ops")
    if ops is torch.nn and dtype == SCALED_FP8:
        ops = scaled_fp8_matmul if fp8_matmul else scaled_cast
    reader = CheckpointReader(path)
    if reader.is_gguf:
        if dtype is not None or fp8_matmul:
            raise ValueError(f"{reader.path} is a GGUF file, already quantized: load it with its own dtype "
                             "(weight_dtype 'default', no --dtype / --fp8-matmul)")
        ops = gguf.ops if ops is torch.nn else ops
    model, config, description = checked_transformer(reader, path, ops)
    variant = detect_variant(path, reader.metadata())
    if variant == "unknown" and is_released_size(config):  # released weights under a name that does not say which
        logger.warning("%s: the name does not say which released weights these are (720p, 480p or interact): keep "
                       "the hub folder name (infinitystar_8b_720p_weights, infinitystar_8b_480p_weights, "
                       "InfinityStarInteract_24K_iters). Unnamed, the interact weights lose their fp32 block norms and "
                       "the checks of duration and resolution against what each model was trained for are skipped",
                       reader.path)
    target = transformer_storage(dtype, keep_fp32_modules, tuple(model.fp32_modules),
                                 fp32_norms=block_norms_fp32(variant))
    transform = None
    if dtype == SCALED_FP8:
        target, transform = _scaled_fp8_hooks(model, target)
    try:
        _fill_scales(model, device)  # 1.0 wherever the file leaves a scale unset (other dtypes, scale_input)
        if reader.is_gguf:
            _mark_gguf_layers(model, reader)
        stream_into(model, reader, target, device, rename=lambda k: None if k in LEGACY_BUFFERS else k,
                    transform=transform, callback=callback)
    except BaseException:  # an interrupt included: the traceback keeps this frame, and so the model, alive
        drop_tensors(model)
        raise
    model.eval().requires_grad_(False)
    info = CheckpointInfo(variant, config, model.block_dtype(), reader.path, _gguf_quant(reader))
    logger.info("loaded %s from %s (blocks %s)", description, reader.path, info.storage)
    return model, info


def _mark_gguf_layers(model: torch.nn.Module, reader: CheckpointReader) -> None:
    """Mark the layers whose weights a GGUF file holds quantized (``gguf_type``), after checking that only the
    blocks' matmul weights are and that the layers can dequantize."""
    for key, entry in reader.entries.items():
        gguf.check_quantized(key, entry.gguf_type, allowed=gguf.block_weight(key, entry.shape))
        if entry.dtype != torch.uint8:
            continue
        layer = model.get_submodule(key.rpartition(".")[0])
        if not hasattr(type(layer), "gguf_type"):
            raise ValueError(f"{reader.path}: GGUF weights need layers that dequantize them (infinitystar.gguf.ops "
                             f"or the pack's ComfyUI ops); {type(layer).__name__} cannot")
        layer.gguf_type = entry.gguf_type


def _gguf_quant(reader: CheckpointReader) -> str:
    """The GGUF types of the blocks' matmul weights ("Q4_K+Q8_0"); "" for other files."""
    if not reader.is_gguf:
        return ""
    return "+".join(dict.fromkeys(gguf.type_name(e.gguf_type) for k, e in reader.entries.items()
                                  if gguf.block_weight(k, e.shape))) or "none"


def check_tokenizer_file(path: str | Path) -> tuple[CheckpointReader, str]:
    """(reader, description) of a video tokenizer file; refuses another checkpoint or an unreadable file. Cheap (a
    .pth is memory-mapped), so callers check before minutes of sampling, not at the decode after them."""
    reader = CheckpointReader(path)
    description = describe_keys(reader.shapes, path)
    if not is_tokenizer_keys(reader.shapes):
        raise ValueError(f"{reader.path} is not the InfinityStar video tokenizer: it looks like {description}."
                         f"{shard_hint(reader.path)} {DOWNLOAD_HINT}")
    return reader, description


def load_tokenizer(path: str | Path, *, ops=torch.nn, dtype: torch.dtype | None = None, device="cpu"):
    """Load the InfinityStar video tokenizer (``infinitystar_videovae.pth`` or a .safetensors) strictly."""
    from .vae import VideoTokenizer, detect_vae_config

    reader, description = check_tokenizer_file(path)
    shapes = reader.shapes
    config = detect_vae_config({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    with torch.device("meta"):
        model = VideoTokenizer(config, ops=ops)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(expected, shapes, reader.path, "InfinityStar video tokenizer", description)

    def target(key, tensor):
        return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype

    stream_into(model, reader, target, device)
    model.eval().requires_grad_(False)
    logger.info("loaded video tokenizer from %s (block channels %s)", reader.path, config.block_out_channels)
    return model
