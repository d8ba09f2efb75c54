"""Write the official fp32 transformer (35 GB, sharded) as one bf16 or fp16 ``.safetensors`` file, and the
flan-t5-xl folder (11 GB) as an encoder-only folder.

Why: every load reads the whole checkpoint. The official scripts keep the blocks in bf16 anyway, so a bf16 file
is the same model in half the bytes (17.6 GB): half the disk, half the read at every ComfyUI start, and the
loaders take it as it is (weight_dtype default), or make fp8 from it. The official precision layout is kept:
blocks in the chosen dtype; embeddings, heads, final norm, ``cfg_uncond`` and ``sos_token`` fp32; the interact
weights' block norms fp32 (:func:`checkpoint.block_norms_fp32`). The variant goes into the file's metadata, so
the file may be renamed freely.

Streams tensor by tensor (no safetensors ``save_file``, which needs the whole model in memory): peak host memory
is about one tensor.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import (
    LEGACY_BUFFERS,
    CheckpointReader,
    block_norms_fp32,
    checked_transformer,
    detect_variant,
    transformer_storage,
)

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SAFETENSORS_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
ALIGN = 8  # the header is padded so the data starts 8-byte aligned (what safetensors itself writes)


def plan(reader: CheckpointReader, dtype: torch.dtype, variant: str) -> dict[str, tuple[torch.dtype, tuple]]:
    """key -> (dtype written, shape), in the order the reader yields the tensors; unused buffers dropped."""
    target = transformer_storage(dtype, fp32_norms=block_norms_fp32(variant))
    out = {}
    for key in reader.read_order():
        entry = reader.entries[key]
        if key in LEGACY_BUFFERS or not entry.dtype.is_floating_point:
            continue
        written = target(key, torch.empty(entry.shape, dtype=entry.dtype, device="meta"))
        if written not in SAFETENSORS_NAMES:
            raise ValueError(f"{reader.path}: {key} is stored as {entry.dtype}; convert from the official fp32 (or a "
                             "bf16 / fp16) checkpoint")
        out[key] = (written, tuple(entry.shape))
    return out


def header_bytes(layout: dict[str, tuple[torch.dtype, tuple]], metadata: dict[str, str]) -> bytes:
    """The safetensors header (8-byte little-endian length, then JSON) for tensors written back to back."""
    header, offset = {"__metadata__": metadata}, 0
    for key, (dtype, shape) in layout.items():
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % ALIGN)
    return len(text).to_bytes(8, "little") + text


def convert_safetensors(source, out: str | Path, dtype: str = "bf16", variant: str | None = None,
                        progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the transformer at ``source`` (sharded folder or file) to ``out`` (a new ``.safetensors``) with its
    blocks in ``dtype`` (bf16 / fp16). An error or Ctrl-C leaves no partial file."""
    from .video_io import written_whole

    if dtype not in DTYPES:
        raise ValueError(f"cannot write {dtype}; choose one of {', '.join(DTYPES)} (for fp8, load the bf16 file with "
                         "weight_dtype fp8_e4m3fn; for smaller files, convert-gguf)")
    out = output_file(source, out, ".safetensors", "infinitystar_8b_720p_bf16.safetensors")
    reader = transformer_source(source)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it first or write another name")
    variant = variant or detect_variant(reader.path, reader.metadata())
    layout = plan(reader, DTYPES[dtype], variant)
    with written_whole(out) as part:  # an error or Ctrl-C leaves no partial file
        write_streamed(part, reader, layout, {"format": "pt", "variant": variant, "blocks": dtype}, progress)
    logger.info("wrote %s (%s blocks, variant %s)", out, dtype, variant)
    return out


def output_file(source, out: str | Path, suffix: str, example: str) -> Path:
    """``out`` checked as a converter's output file: named ``*suffix`` (the loaders tell files by it), not a
    folder, not the checkpoint being read."""
    out = Path(out)
    if out.suffix.lower() != suffix:
        raise ValueError(f"{out}: the output is one {suffix} file; name it *{suffix} (the loaders tell files by "
                         "their suffix)")
    if out.is_dir():
        raise ValueError(f"{out} is a folder; give the file to write (e.g. {out / example})")
    read = Path(source).resolve()
    if read in (out.resolve(), out.resolve().parent):
        raise ValueError(f"{out} is (in) the checkpoint being read; write it elsewhere")
    return out


def transformer_source(source) -> CheckpointReader:
    """The official transformer to convert, its keys and shapes checked before anything is written: a GGUF (already
    quantized) or a foreign or incomplete checkpoint is refused with what it looks like."""
    reader = CheckpointReader(source)
    if reader.is_gguf:  # its quantized blocks are not float tensors: converting would drop them
        raise ValueError(f"{reader.path} is a GGUF file already; convert from the official weights (the sharded "
                         "folder or a merged .safetensors)")
    checked_transformer(reader, reader.path)
    return reader


def write_streamed(path: Path, reader: CheckpointReader, layout: dict[str, tuple[torch.dtype, tuple]],
                   metadata: dict[str, str], progress=None, names: dict[str, str] | None = None) -> None:
    """Write ``reader``'s tensors of ``layout`` (in its order, each cast to its dtype) as one safetensors file;
    ``names`` renames keys in the file (the reader's key -> the written key)."""
    names = names or {}
    with open(path, "wb") as f:
        f.write(header_bytes({names.get(k, k): v for k, v in layout.items()}, metadata))
        targets, order = {k: d for k, (d, _) in layout.items()}, list(layout)
        for i, (key, tensor) in enumerate(reader.tensors(lambda k, t: targets[k], keys=order)):
            if key != order[i]:  # the header's offsets assume this order
                raise RuntimeError(f"tensors came out of order ({key} where {order[i]} was due)")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())  # the bytes, no copy
            del tensor
            if progress:
                progress(i + 1, len(layout))


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".msgpack", ".h5", ".ot", ".gguf")
TEXT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def convert_text_encoder(source, out: str | Path, dtype: str = "fp16",
                         progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the flan-t5-xl folder at ``source`` as an encoder-only folder ``out``: ``model.safetensors`` with the
    encoder's tensors in ``dtype`` (``wo`` fp32 under half storage, as the loaders keep it) plus the folder's config
    and tokenizer files. The published folder is 11 GB (fp32, with the decoder the pack never reads); fp16 makes it
    about 2.9 GB and loads exactly as the published folder does in fp16 (the GPU default); fp32 keeps every bit."""
    from .t5 import checked_t5, state_dict_key, storage
    from .text import checked_folder

    if dtype not in TEXT_DTYPES:
        raise ValueError(f"cannot write {dtype}; choose one of {', '.join(TEXT_DTYPES)}")
    source, out = checked_folder(source), Path(out)  # config and vocabulary, as the loader checks them
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it first or write another folder")
    reader = checked_t5(source)[1]  # keys and shapes against the config, before anything is written
    target, layout, names = storage(TEXT_DTYPES[dtype]), {}, {}
    for key in reader.read_order():
        name = state_dict_key(key)
        if name is None or name in names.values():  # decoder / LM head, or a tied copy of the embedding
            continue
        entry = reader.entries[key]
        layout[key] = (target(name, torch.empty(entry.shape, dtype=entry.dtype, device="meta")), tuple(entry.shape))
        names[key] = name
    tmp = out.with_name(f".{out.name}.part")  # hidden: one left by a hard kill is not offered by the loaders' lists
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        for file in source.iterdir():  # config, tokenizer and generation files; no weights
            if file.is_file() and file.suffix.lower() not in WEIGHT_SUFFIXES and not file.name.endswith(".index.json"):
                shutil.copy2(file, tmp / file.name)
        write_streamed(tmp / "model.safetensors", reader, layout, {"format": "pt", "encoder_only": "true",
                                                                   "dtype": dtype}, progress, names)
        tmp.replace(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    logger.info("wrote %s (T5 encoder in %s)", out, dtype)
    return out
