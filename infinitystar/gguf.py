"""GGUF transformer weights: llama.cpp's block-quantized formats, dequantized one layer at a time at call time.

Why: quantized weights are the second most asked-for feature in video packs (after fitting in VRAM), and GGUF is
the format ComfyUI users already keep (city96's ComfyUI-GGUF). Each matmul weight is stored in blocks of 32 or 256
values that share a scale (Q8_0: 8.5 bits a value, Q5_K: 5.5, Q4_K: 4.5), so the 8.77B transformer takes
9.4 / 6.1 / 5.0 GB instead of 17.6 GB in bf16. Only the blocks' matmul weights are quantized; the fp32 embeddings,
heads and norms stay as they are, as in the official precision layout.

The header is parsed with the ``gguf`` package (in requirements.txt; ComfyUI-GGUF needs it too); the tensors are
read and dequantized here, in torch, on the device that computes. Writing (:func:`convert`) quantizes the legacy
types with that package's reference quantizers and the K-quants with ours (:func:`quantize_k`).
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import is_block_key

logger = logging.getLogger(__name__)

ARCH = "infinitystar"  # general.architecture of the files we write
INSTALL_HINT = "GGUF files need the 'gguf' package: pip install gguf"

# GGML type id -> (name, values per block, bytes per block[, torch dtype]); ids and sizes are the format's (ggml.h)
FLOAT_TYPES = {0: ("F32", 1, 4, torch.float32), 1: ("F16", 1, 2, torch.float16), 30: ("BF16", 1, 2, torch.bfloat16)}
QUANT_TYPES = {
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
}
QUANT_IDS = {name: qtype for qtype, (name, _, _) in QUANT_TYPES.items()}
# what convert() can write: the legacy types with the gguf package's reference quantizers, the K-quants with
# ours (:func:`quantize_k`)
WRITABLE = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "BF16", "F16")
K_FALLBACK = "Q8_0"  # K-quants need rows of 256 values; narrower weights (tiny models) get this


def written_type(name: str, cols: int) -> str | None:
    """The type a block weight with rows of ``cols`` values is written in when ``name`` is asked for: ``name``,
    else :data:`K_FALLBACK` when its blocks do not divide the rows, else None (kept in F32)."""
    blocks = {n: b for n, b, _ in QUANT_TYPES.values()}
    for t in (name, K_FALLBACK):
        if cols % blocks.get(t, 1) == 0:
            return t
    return None


def type_name(qtype: int) -> str:
    entry = QUANT_TYPES.get(qtype) or FLOAT_TYPES.get(qtype)
    return entry[0] if entry else f"type {qtype}"


def _f16(raw: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte ``at`` of each block, as (blocks, 1) fp32."""
    return raw[:, at:at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(blocks, n) bytes -> (blocks, 2n): the low nibbles are the first n values, the high nibbles the next n."""
    return torch.cat((qs & 0xF, qs >> 4), dim=-1)


def _bits(raw: torch.Tensor, count: int) -> torch.Tensor:
    """(blocks, count/8) little-endian bytes -> (blocks, count) of their bits, lowest first."""
    shifts = torch.arange(8, device=raw.device, dtype=torch.uint8)
    return ((raw.unsqueeze(-1) >> shifts) & 1).reshape(raw.shape[0], count)


# Each dequantizer makes one fp32 tensor of the values and scales it in place: the peak is that tensor plus the
# unpacked bytes (about 5 bytes a value); with the raw bytes copied to the device, about 6 on top of the result,
# which memory.step_activation_bytes counts for GGUF storage (tests/unit/test_gguf.py measures it).
WORKSPACE_BYTES_PER_VALUE = 6

def _q8_0(raw):
    return raw[:, 2:].contiguous().view(torch.int8).float().mul_(_f16(raw, 0))


def _q4_0(raw):
    return _nibbles(raw[:, 2:]).float().sub_(8).mul_(_f16(raw, 0))


def _q4_1(raw):
    return _nibbles(raw[:, 4:]).float().mul_(_f16(raw, 0)).add_(_f16(raw, 2))


def _q5(raw, at):  # the 5-bit values of Q5_0 / Q5_1: a nibble from qs, the fifth bit from the 32-bit qh
    return (_nibbles(raw[:, at + 4:]) | (_bits(raw[:, at:at + 4], 32) << 4)).float()


def _q5_0(raw):
    return _q5(raw, 2).sub_(16).mul_(_f16(raw, 0))


def _q5_1(raw):
    return _q5(raw, 4).mul_(_f16(raw, 0)).add_(_f16(raw, 2))


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit (scale, min) pairs of a Q4_K / Q5_K super-block, packed in 12 bytes."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scale = torch.cat((lo & 63, (hi & 0xF) | ((lo >> 6) << 4)), dim=-1)
    low = torch.cat((mid & 63, (hi >> 4) | ((mid >> 6) << 4)), dim=-1)
    return scale.float().unsqueeze(-1), low.float().unsqueeze(-1)


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes -> 8 sub-blocks of 32: each 32 bytes hold two sub-blocks, low nibbles first."""
    q = qs.reshape(-1, 4, 1, 32)
    return torch.cat((q & 0xF, q >> 4), dim=2).reshape(-1, 8, 32)


def _k_apply(raw, q):  # q (blocks, 8, 32) of Q4_K / Q5_K: d * scale * q - dmin * min, per sub-block
    scale, low = _k_scales(raw[:, 4:16])
    d, dmin = _f16(raw, 0).unsqueeze(-1), _f16(raw, 2).unsqueeze(-1)
    return q.float().mul_(d * scale).sub_(dmin * low).reshape(-1, 256)


def _q4_k(raw):
    return _k_apply(raw, _k_nibbles(raw[:, 16:144]))


def _q5_k(raw):
    high = _bits(raw[:, 16:48], 256).reshape(-1, 32, 8).transpose(1, 2)  # bit j of byte l: sub-block j, value l
    return _k_apply(raw, _k_nibbles(raw[:, 48:176]) | (high << 4))


def _q6_k(raw):
    ql, qh = raw[:, 0:128], raw[:, 128:192]
    halves = []
    for h in range(2):  # 128 values each: 4 runs of 32, a nibble of ql and two bits of qh each
        lo, hi = ql[:, 64 * h:64 * h + 32], ql[:, 64 * h + 32:64 * h + 64]
        top = qh[:, 32 * h:32 * h + 32]
        halves += [(lo & 0xF) | ((top & 3) << 4), (hi & 0xF) | (((top >> 2) & 3) << 4),
                   (lo >> 4) | (((top >> 4) & 3) << 4), (hi >> 4) | (((top >> 6) & 3) << 4)]
    q = torch.cat(halves, dim=-1).float().sub_(32).reshape(-1, 16, 16)  # 16 runs of 16 values, a scale each
    scale = raw[:, 192:208].contiguous().view(torch.int8).float().unsqueeze(-1)
    return q.mul_(_f16(raw, 208).unsqueeze(-1) * scale).reshape(-1, 256)


_DEQUANT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0, 12: _q4_k, 13: _q5_k, 14: _q6_k}


def dequantize(raw: torch.Tensor, qtype: int, shape: tuple, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``shape`` tensor in ``dtype`` that ``raw`` (its GGUF bytes, uint8, any shape) holds as ``qtype``.

    Computed in fp32 (as llama.cpp's reference does) and rounded once to ``dtype``, on ``raw``'s device."""
    if qtype in FLOAT_TYPES:
        return raw.contiguous().view(FLOAT_TYPES[qtype][3]).reshape(shape).to(dtype)
    if qtype not in QUANT_TYPES:
        raise ValueError(f"GGUF tensor type {qtype} is not supported; supported: "
                         f"{', '.join(v[0] for v in {**FLOAT_TYPES, **QUANT_TYPES}.values())}")
    _, block, size = QUANT_TYPES[qtype]
    blocks = raw.reshape(-1, size)
    if blocks.shape[0] * block != math.prod(shape):
        raise ValueError(f"{type_name(qtype)} data of {raw.numel()} bytes does not hold a tensor of shape {shape}")
    return _DEQUANT[qtype](blocks).reshape(shape).to(dtype)


def stored_bytes(shape: tuple, qtype: int) -> int:
    if qtype in FLOAT_TYPES:
        return math.prod(shape) * FLOAT_TYPES[qtype][2]
    _, block, size = QUANT_TYPES[qtype]
    return math.prod(shape) // block * size


class GGUFLinear(nn.Linear):
    """A Linear whose weight may be GGUF blocks (uint8, ``gguf_type`` set): dequantized to the input's dtype on the
    input's device at every call, so one layer's full-precision copy is alive at a time; float weights are cast."""

    gguf_type: int | None = None  # set by the loader on layers whose weight is quantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.device != x.device:  # left in system RAM by a partial load: its bytes come over, still quantized
            w = w.to(x.device, non_blocking=True)
        if self.gguf_type is None:
            w = w.to(x.dtype)
        else:
            w = dequantize(w, self.gguf_type, (self.out_features, self.in_features), x.dtype)
        b = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype, non_blocking=True)
        return F.linear(x, w, b)


class ops:  # noqa: N801  (a namespace like torch.nn; ComfyUI's variant is built in nodes/host.py)
    Linear = GGUFLinear


# ---------------------------------------------------------------------------------------------- K-quant writing

REFINE = 2  # least-squares refits of each sub-block's scale after rounding (lower error than min/max alone)


def _to_f16(t: torch.Tensor) -> torch.Tensor:
    """(blocks,) fp32 -> (blocks, 2) bytes of its fp16, and the fp16 value back as fp32 (what readers will use)."""
    h = t.to(torch.float16)
    return h.view(torch.uint8).reshape(-1, 2), h.float()


def _divide(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return torch.where(step > 0, x / torch.where(step > 0, step, 1), 0)


def _pack_k_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_k_scales`: 8 six-bit scales and mins -> 12 bytes."""
    lo, hi = sc[:, :4], sc[:, 4:]
    mlo, mhi = mn[:, :4], mn[:, 4:]
    return torch.cat((lo | ((hi >> 4) << 6), mlo | ((mhi >> 4) << 6), (hi & 0xF) | ((mhi & 0xF) << 4)), dim=-1)


def _fit(x: torch.Tensor, q: torch.Tensor, step: torch.Tensor, low: torch.Tensor | None):
    """Least-squares step (and offset <= 0, unless ``low`` is None) of x ~ step * q + low for fixed integers q."""
    sq, sqq, sqx = q.sum(-1), (q * q).sum(-1), (q * x).sum(-1)
    if low is not None:
        n, sx = x.shape[-1], x.sum(-1)
        det = n * sqq - sq * sq
        low = torch.where(det > 0, (sx * sqq - sq * sqx) / torch.where(det > 0, det, 1), low).clamp(max=0)
        sqx = sqx - low * sq
    return torch.where(sqq > 0, sqx / torch.where(sqq > 0, sqq, 1), step).clamp(min=0), low


def _quantize_k_affine(x: torch.Tensor, top: int) -> tuple[torch.Tensor, ...]:
    """Q4_K / Q5_K: x (blocks, 8, 32) ~ d * sc * q - dmin * m, q in [0, top], 6-bit sc and m per sub-block."""
    low = x.amin(-1).clamp(max=0)
    step = (x.amax(-1) - low) / top  # (blocks, 8): min/max, then refined by least squares on the rounded values
    for _ in range(REFINE):
        q = _divide(x - low[..., None], step[..., None]).round().clamp(0, top)
        step, low = _fit(x, q, step, low)
    d_bytes, d = _to_f16(step.amax(-1) / 63)
    m_bytes, dmin = _to_f16(-low.amin(-1) / 63)
    sc = _divide(step, d[:, None]).round().clamp(0, 63)
    mn = _divide(-low, dmin[:, None]).round().clamp(0, 63)
    q = _divide(x + (dmin[:, None] * mn)[..., None], (d[:, None] * sc)[..., None]).round().clamp(0, top)
    return d_bytes, m_bytes, _pack_k_scales(sc.to(torch.uint8), mn.to(torch.uint8)), q.to(torch.uint8)


def _pack_k_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_k_nibbles`: (blocks, 8, 32) values < 16 -> 128 bytes."""
    pairs = q.reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)


def quantize(weight: torch.Tensor, name: str) -> torch.Tensor:
    """``weight`` (rows, cols) as GGUF ``name`` bytes (rows, bytes per row), in torch on its device: Q8_0 and the
    K-quants (the benchmark quantizes the full-size random model on the GPU with it)."""
    if name != "Q8_0":
        return quantize_k(weight, name)
    rows, cols = weight.shape
    if cols % 32:
        raise ValueError(f"Q8_0 needs rows of a multiple of 32 values, not {cols}")
    x = weight.detach().float().reshape(-1, 32)
    d_bytes, d = _to_f16(x.abs().amax(-1) / 127)
    q = _divide(x, d[:, None]).round().clamp(-127, 127).to(torch.int8)
    return torch.cat((d_bytes, q.view(torch.uint8)), dim=-1).reshape(rows, -1)


def quantize_k(weight: torch.Tensor, name: str) -> torch.Tensor:
    """``weight`` (rows, cols), cols a multiple of 256, as Q4_K / Q5_K / Q6_K bytes (rows, cols / 256 * size).

    Min/max scales per sub-block, refined by least squares on the rounded values (llama.cpp's quantizer searches
    further); the layout is the format's, checked against the gguf package's reference dequantizers."""
    rows, cols = weight.shape
    if cols % 256:
        raise ValueError(f"{name} needs rows of a multiple of 256 values, not {cols}")
    x = weight.detach().float().reshape(-1, 256)
    if name == "Q6_K":
        sub = x.reshape(-1, 16, 16)
        step = sub.abs().amax(-1) / 31  # (blocks, 16), q - 32 in [-31, 31]; refined as for Q4_K
        for _ in range(REFINE):
            step, _ = _fit(sub, _divide(sub, step[..., None]).round().clamp(-32, 31), step, None)
        d_bytes, d = _to_f16(step.amax(-1) / 127)
        sc = _divide(step, d[:, None]).round().clamp(0, 127)
        u = (_divide(sub, (d[:, None] * sc)[..., None]).round().clamp(-32, 31) + 32).to(torch.uint8)
        u = u.reshape(-1, 2, 4, 32)  # halves, runs of 32, values
        ql = torch.cat(((u[:, :, 0] & 0xF) | ((u[:, :, 2] & 0xF) << 4),
                        (u[:, :, 1] & 0xF) | ((u[:, :, 3] & 0xF) << 4)), dim=-1).reshape(-1, 128)
        qh = ((u[:, :, 0] >> 4) | ((u[:, :, 1] >> 4) << 2) | ((u[:, :, 2] >> 4) << 4)
              | ((u[:, :, 3] >> 4) << 6)).reshape(-1, 64)
        blocks = torch.cat((ql, qh, sc.to(torch.int8).view(torch.uint8), d_bytes), dim=-1)
    elif name in ("Q4_K", "Q5_K"):
        d_bytes, m_bytes, scales, q = _quantize_k_affine(x.reshape(-1, 8, 32), 15 if name == "Q4_K" else 31)
        parts = [d_bytes, m_bytes, scales]
        if name == "Q5_K":
            bits = (q >> 4) << torch.arange(8, dtype=torch.uint8).view(1, 8, 1)  # bit j of byte l: sub-block j
            parts.append(bits.sum(1, dtype=torch.uint8))
        blocks = torch.cat(parts + [_pack_k_nibbles(q & 0xF)], dim=-1)
    else:
        raise ValueError(f"{name} is not a K-quant this pack writes (Q4_K, Q5_K, Q6_K)")
    return blocks.reshape(rows, -1)


# ---------------------------------------------------------------------------------------------- reading

def _bounded_reader() -> type:
    """The ``gguf`` package's reader, stopped at the end of the file: it reads past it as empty arrays, so a crafted
    field claiming 2**62 array items would loop (and grow lists) until the process is killed."""
    from gguf import GGUFReader

    class BoundedReader(GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            items = super()._get(offset, dtype, count, override_order)
            if len(items) < int(count):
                raise ValueError(f"a field at byte {offset} claims {int(count)} items, past the end of the file")
            return items

    return BoundedReader


def read_header(file: Path) -> tuple[dict, list[tuple[str, int, tuple, int, int]]]:
    """(metadata, tensors) of a GGUF file: metadata as plain values, tensors as (name, type id, torch shape,
    first byte, end byte) with absolute offsets into the file."""
    try:
        reader_class = _bounded_reader()
    except ImportError as exc:
        raise ImportError(f"{file}: {INSTALL_HINT}") from exc
    try:
        reader = reader_class(file, "r")
    except Exception as exc:  # noqa: BLE001 — the package raises ValueError, struct.error, IndexError...
        raise ValueError(f"{file}: not a readable GGUF file ({exc}). Delete it and convert or download it again.") \
            from exc
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or not field.types:
            continue
        try:
            meta[name] = field.contents()
        except Exception:  # noqa: BLE001 — a value type we have no use for
            continue
    size = file.stat().st_size
    tensors = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists the innermost dimension first
        start, end = int(t.data_offset), int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ValueError(f"{file}: truncated: tensor {t.name} ends at byte {end} of {size}. "
                             "Delete it and convert or download it again.")
        tensors.append((t.name, int(t.tensor_type), shape, start, end))
    del reader
    return meta, tensors


def check_quantized(name: str, qtype: int, allowed: bool) -> None:
    """Quantized tensors are allowed only where the model dequantizes them (the blocks' matmul weights)."""
    if qtype in FLOAT_TYPES:
        return
    if qtype not in QUANT_TYPES:
        raise ValueError(f"tensor {name} has GGUF type {type_name(qtype)}, which this pack cannot read; "
                         f"supported: {', '.join(v[0] for v in {**FLOAT_TYPES, **QUANT_TYPES}.values())}")
    if not allowed:
        raise ValueError(f"tensor {name} is quantized ({type_name(qtype)}), but only the transformer blocks' matmul "
                         "weights may be: convert the official checkpoint with `python -m infinitystar convert-gguf`")


# ---------------------------------------------------------------------------------------------- writing

def block_weight(key: str, shape: tuple) -> bool:
    """The tensors :func:`convert` quantizes: the blocks' 2-D matmul weights."""
    return is_block_key(key) and key.endswith(".weight") and len(shape) == 2


def convert(source, out: str | Path, qtype: str = "Q8_0", variant: str | None = None,
            progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the transformer checkpoint at ``source`` (file or sharded folder) as a GGUF file: the blocks' matmul
    weights in ``qtype``, everything else in F32 (lossless for the official bf16/fp32 tensors).

    Streams tensor by tensor: peak host memory is about one tensor's fp32 copy and its quantized bytes."""
    try:
        import gguf
        import numpy as np
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    from .checkpoint import LEGACY_BUFFERS
    from .convert import output_file, transformer_source
    from .video_io import written_whole

    if qtype not in WRITABLE:
        raise ValueError(f"cannot write {qtype}; choose one of {', '.join(WRITABLE)}")
    out = output_file(source, out, ".gguf", "infinitystar_Q8_0.gguf")
    target = gguf.GGMLQuantizationType[qtype]
    reader = transformer_source(source)  # GGUF or foreign checkpoints refused before anything is written
    for key in [k for k, e in reader.entries.items() if k in LEGACY_BUFFERS or not e.dtype.is_floating_point]:
        del reader.entries[key]  # the official files' unused buffers: the loader drops them anyway
    plan = {}  # key -> GGML type written
    for key, entry in reader.entries.items():
        name = written_type(qtype, entry.shape[-1]) if block_weight(key, entry.shape) else None
        plan[key] = gguf.GGMLQuantizationType[name or "F32"]
    # an error or Ctrl-C leaves no partial file; the writer's file is closed first (Windows cannot remove an open one)
    with written_whole(out) as part, contextlib.closing(gguf.GGUFWriter(part, ARCH)) as writer:
        _write(gguf, np, writer, reader, plan, variant, target, progress)
    logger.info("wrote %s (%s blocks)", out, qtype)
    return out


def _write(gguf, np, writer, reader, plan: dict, variant: str | None, target, progress) -> None:
    from .checkpoint import detect_variant

    writer.add_string(f"{ARCH}.variant", variant or detect_variant(reader.path, reader.metadata()))
    writer.add_file_type(int(target))
    for key in reader.read_order():  # shapes and sizes first, in the order the data follows
        entry, t = reader.entries[key], plan[key]
        shape = tuple(entry.shape) or (1,)
        if t == gguf.GGMLQuantizationType.F32:
            writer.add_tensor_info(key, shape, np.dtype(np.float32), math.prod(shape) * 4)
        else:
            nbytes = gguf.quant_shape_to_byte_shape(shape, t)
            writer.add_tensor_info(key, nbytes, np.dtype(np.uint8), math.prod(nbytes), raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for i, (key, tensor) in enumerate(reader.tensors(lambda k, t: torch.float32)):
        data = tensor.reshape(tuple(reader.entries[key].shape) or (1,)).numpy()
        t = plan[key]
        if t == gguf.GGMLQuantizationType.F32:
            writer.write_tensor_data(data)
        elif t.name in ("Q4_K", "Q5_K", "Q6_K"):
            writer.write_tensor_data(quantize_k(tensor, t.name).numpy())
        else:
            writer.write_tensor_data(gguf.quants.quantize(data, t))
        del tensor, data
        if progress:
            progress(i + 1, len(plan))
