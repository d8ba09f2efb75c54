"""Reading the weight files behind a checkpoint path: safetensors headers and byte ranges, GGUF tensors, weights-only
``.pth`` files and sharded folders, tensor by tensor (:class:`CheckpointReader`). What the tensors are, and how they
become a model, is :mod:`infinitystar.checkpoint`'s business.
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from . import gguf

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
# a Hugging Face folder saved before safetensors (a text encoder): shards read weights-only, as a single .pth
INDEX_FILES = (INDEX_FILE, "pytorch_model.bin.index.json")
MAX_HEADER_BYTES = 100_000_000  # as the safetensors library: a bigger header is no checkpoint's
SHARD_NAME = re.compile(r"-(\d+)-of-(\d+)\.safetensors$")  # model-00001-of-00007.safetensors
DOWNLOAD_HINT = ("Get the official files with the InfinityStar Download Models node in ComfyUI, or with "
                 "`python -m infinitystar download --variant 720p --dest DIR`.")

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and (safetensors only) byte range."""
    file: Path
    dtype: torch.dtype
    shape: tuple
    start: int = -1
    end: int = -1
    gguf_type: int = -1  # GGUF files: the GGML type id (quantized ones are read as their raw bytes, uint8)


# ---------------------------------------------------------------------------------------------- reading files

# NAME + these lie beside NAME while a download tool is not done with it (aria2c, Firefox, Chrome, Safari). Not
# ".incomplete": our own copy writes NAME.incomplete and renames it, and one left by a hard kill says nothing of NAME
UNFINISHED_MARKERS = (".aria2", ".part", ".crdownload", ".download")
LFS_POINTER = b"version https://git-lfs"


def unfinished_marker(file: Path) -> Path | None:
    """The marker another download tool keeps beside ``file`` while it is not done with it, if there is one."""
    return next((m for m in (file.with_name(file.name + s) for s in UNFINISHED_MARKERS) if m.exists()), None)


def check_readable(file: Path) -> bytes:
    """What no parser can say, said first; returns the file's first bytes.

    A download tool that preallocates (aria2c, as HF mirror scripts run it) leaves a whole-size file under the final
    name with its tail never written, and a ``NAME.aria2`` beside it until it is done: the size cannot tell, the
    marker can. A repo cloned without git-lfs holds small text pointers under the weights' names. And a file the
    user may not read is no damaged file."""
    marker = unfinished_marker(file)
    if marker is not None:
        raise ValueError(f"{file}: an unfinished download ({marker.name} lies beside it, left by the tool that is "
                         "fetching it). Let that download finish or resume it, or delete both files and download "
                         "again.")
    try:
        with open(file, "rb") as f:
            head = f.read(64)
    except PermissionError as exc:
        raise PermissionError(f"{file}: no permission to read it ({exc.strerror}); give the account that runs this "
                              "read access to it.") from None
    if head.startswith(LFS_POINTER):
        raise ValueError(f"{file} ({_size(file)}) is a Git LFS pointer, not the weights: the repo was cloned without "
                         "git-lfs. Run `git lfs pull` in it, or download the file itself.")
    return head


def _safetensors_header(file: Path, metadata: dict | None = None) -> dict[str, TensorEntry]:
    """Parse a safetensors header and check every byte range against the file size."""
    check_readable(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{file}: not a safetensors file (only {size} bytes); the download is incomplete.")
        n = int.from_bytes(raw, "little")
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"{file}: a safetensors header of {n:,} bytes (at most {MAX_HEADER_BYTES:,}): not a "
                             "safetensors file, or a damaged one. Delete it and download it again.")
        if n <= 0 or 8 + n > size:
            raise ValueError(f"{file}: corrupted or truncated safetensors header ({size} bytes on disk). "
                             "Delete it and download it again.")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{file}: corrupted safetensors header ({exc}). Delete it and download it again.") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{file}: corrupted safetensors header (a JSON {type(header).__name__}, not an object). "
                         "Delete it and download it again.")
    entries = {}
    for key, meta in header.items():
        if key == "__metadata__":
            if metadata is not None and isinstance(meta, dict):  # safetensors metadata: str -> str
                metadata.update({str(k): str(v) for k, v in meta.items()})
            continue
        if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= meta.keys():
            raise ValueError(f"{file}: corrupted safetensors header (entry {key!r} lacks dtype/shape/data_offsets). "
                             "Delete it and download it again.")
        dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise ValueError(f"{file}: tensor {key} has unsupported dtype {dtype!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"{file}: corrupted safetensors header (tensor {key}: shape {shape!r}, data_offsets "
                             f"{offsets!r}). Delete it and download it again.")
        start, end = (8 + n + o for o in offsets)
        if end > size:
            raise ValueError(f"{file}: truncated: tensor {key} ends at byte {end} but the file has {size} bytes. "
                             "Delete it and download it again.")
        entries[key] = TensorEntry(file, _ST_DTYPES[dtype], tuple(shape), start, end)
    return entries


def _gguf_header(file: Path, meta: dict) -> dict[str, TensorEntry]:
    """Entries of a GGUF file (logical shapes; quantized tensors as uint8 rows of their bytes); fills ``meta``
    with the file's ``infinitystar.*`` metadata, prefix dropped (``variant``)."""
    check_readable(file)
    found, tensors = gguf.read_header(file)
    meta.update({k.split(".", 1)[1]: v for k, v in found.items() if k.startswith("infinitystar.")})
    entries = {}
    for name, qtype, shape, start, end in tensors:
        try:
            nbytes = gguf.stored_bytes(shape, qtype)
        except KeyError:
            nbytes = end - start  # an unsupported type: the loader names it (gguf.check_quantized)
        if nbytes != end - start:
            raise ValueError(f"{file}: tensor {name} ({gguf.type_name(qtype)}, shape {shape}) should have {nbytes} bytes, "
                             f"has {end - start}. Delete the file and convert or download it again.")
        dtype = gguf.FLOAT_TYPES[qtype][3] if qtype in gguf.FLOAT_TYPES else torch.uint8
        entries[name] = TensorEntry(file, dtype, shape, start, end, qtype)
    return entries


def _read_safetensor(entry: TensorEntry, handle, scratch: torch.Tensor) -> torch.Tensor:
    """Read one tensor's bytes into ``scratch`` (uint8) and return a view of it in the stored dtype/shape
    (a quantized GGUF tensor: uint8, one row of bytes per output row)."""
    quantized = entry.dtype == torch.uint8 and entry.gguf_type >= 0
    if quantized:  # checked against the type's block size when the header was read
        nbytes = entry.end - entry.start
    else:
        nbytes = math.prod(entry.shape) * torch.empty((), dtype=entry.dtype).element_size()
        if (entry.end - entry.start) != nbytes:
            raise ValueError(f"{entry.file}: byte range does not match shape {entry.shape} {entry.dtype}")
    raw = scratch[:nbytes]
    handle.seek(entry.start)
    got = handle.readinto(memoryview(raw.numpy())) if nbytes else 0
    if got != nbytes:
        raise ValueError(f"{entry.file}: truncated while reading (got {got} of {nbytes} bytes)")
    if quantized:
        return raw.view(entry.shape[0] if entry.shape else 1, -1)
    return raw.view(entry.dtype).view(entry.shape)


def _size(file: Path) -> str:
    return f"{file.stat().st_size:,} bytes"


def _reason(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) > 8 else f"{type(exc).__name__}: {text}" if text else type(exc).__name__


SAFE_PICKLE_TORCH = (2, 6)  # torch.load(weights_only=True) can be made to run code before 2.6 (CVE-2025-32434)


def _torch_version() -> tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def _torch_load(file: Path) -> dict:
    if _torch_version() < SAFE_PICKLE_TORCH:
        logger.warning("%s: torch %s reads .pth files with a weights-only loader that a crafted file can get past "
                       "(CVE-2025-32434, fixed in torch 2.6): load .pth files only from sources you trust (the official "
                       "hub repo), or upgrade torch", file, torch.__version__)
    head = check_readable(file)
    if not head:
        raise ValueError(f"{file} is empty (0 bytes): its download or copy did not finish. Download it again.")
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip format, or a legacy pickle
        raise ValueError(f"{file} ({_size(file)}) is not a PyTorch checkpoint (it starts with {head[:16]!r}); the "
                         "download is damaged or a page was saved in its place. Download it again.")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        try:  # legacy (non-zip) .pth files cannot be memory-mapped
            obj = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{file} ({_size(file)}): cannot read this .pth ({_reason(exc)}); it is corrupted or "
                             "truncated.") from exc
    except Exception as exc:
        raise ValueError(f"{file} ({_size(file)}): cannot read this .pth ({_reason(exc)}); it is corrupted, "
                         "truncated or not a weights-only checkpoint.") from exc
    if isinstance(obj, Mapping):
        if isinstance(obj.get("vae"), Mapping):
            obj = obj["vae"]
        elif isinstance(obj.get("trainer"), Mapping) and isinstance(obj["trainer"].get("gpt_fsdp"), Mapping):
            obj = obj["trainer"]["gpt_fsdp"]
        elif isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{file}: holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def checkpoint_files(path: str | Path) -> list[Path]:
    """The weight files behind ``path`` (a sharded folder, one .safetensors, or one .pth)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}. {DOWNLOAD_HINT}")
    if path.is_dir():
        index = next((path / name for name in INDEX_FILES if (path / name).is_file()), None)
        if index is not None:
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
                weight_map = exc
            if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
                raise ValueError(f"{index}: not a shard index (no weight_map of file names: {weight_map!r}). "
                                 "Download the folder again.")
            names = list(dict.fromkeys(weight_map.values()))
            foreign = [n for n in names if n in ("", ".", "..") or "/" in n or "\\" in n
                       or ":" in n]
            if foreign:
                raise ValueError(f"{index}: names shard files outside its folder ({foreign[:3]!r}); an index lists "
                                 "file names only. Download the folder again.")
            files = [path / name for name in names]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{path}: shards listed in {index.name} are missing: {missing}. "
                                        "The download is incomplete; run the download again (it resumes).")
            return files
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no {INDEX_FILE} and no .safetensors files. {DOWNLOAD_HINT}")
        _check_whole_set(path, files)
        return files
    if path.suffix.lower() not in (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".gguf"):
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected .safetensors, .gguf, .pth or "
                         "a folder")
    return [path]


def _check_whole_set(path: Path, files: list[Path]) -> None:
    """Shards named like the hub's (``model-00001-of-00002.safetensors``) without their index must all be there: a
    cancelled copy or download leaves the first ones, which would load as a model with missing tensors."""
    sets: dict[tuple[str, str], set[int]] = {}  # (name before the numbers, total as written) -> shard numbers
    widths: dict[tuple[str, str], int] = {}  # the width of the shard numbers as written (00001, or 1)
    for f in files:
        shard = SHARD_NAME.search(f.name)
        if shard:
            key = (f.name[:shard.start()], shard[2])
            sets.setdefault(key, set()).add(int(shard[1]))
            widths[key] = max(widths.get(key, 1), len(shard[1]) if shard[1].startswith("0") else 1)
    for (stem, total), present in sets.items():
        width = widths[stem, total]
        missing = [f"{stem}-{i:0{width}d}-of-{total}.safetensors" for i in range(1, int(total) + 1)
                   if i not in present]
        if missing:
            raise FileNotFoundError(f"{path}: holds {len(present)} of {int(total)} shards ({', '.join(missing[:3])}"
                                    f"{' ...' if len(missing) > 3 else ''} missing) and no {INDEX_FILE}: the "
                                    "download or copy is incomplete; run it again (it resumes).")


class CheckpointReader:
    """Lazy view of all tensors behind a path: shapes/dtypes first, data tensor by tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.files = checkpoint_files(self.path)
        self.entries: dict[str, TensorEntry] = {}
        self._loaded: dict[str, torch.Tensor] = {}  # .pth tensors (memory-mapped by torch.load)
        self._meta: dict = {}
        for file in self.files:
            if file.suffix.lower() == ".safetensors":
                self.entries.update(_safetensors_header(file, self._meta if len(self.files) == 1 else None))
            elif file.suffix.lower() == ".gguf":
                self.entries.update(_gguf_header(file, self._meta))
            else:
                sd = _torch_load(file)
                self._loaded.update(sd)
                self.entries.update({k: TensorEntry(file, v.dtype, tuple(v.shape)) for k, v in sd.items()})

    @property
    def shapes(self) -> dict[str, tuple]:
        return {k: e.shape for k, e in self.entries.items()}

    def metadata(self) -> dict:
        """``metadata`` of the index file, if any (the released index has ``total_size``), else of the one file
        (a safetensors ``__metadata__``, a GGUF's keys): e.g. the ``variant`` that ``convert`` writes."""
        index = self.path / INDEX_FILE
        return json.loads(index.read_text(encoding="utf-8")).get("metadata", {}) if index.is_file() else dict(self._meta)

    @property
    def is_gguf(self) -> bool:
        return any(f.suffix.lower() == ".gguf" for f in self.files)

    def _by_file(self, keys=None) -> dict[Path, list[str]]:
        by_file: dict[Path, list[str]] = {}
        for key, entry in self.entries.items():
            if keys is not None and key not in keys:
                continue
            by_file.setdefault(entry.file, []).append(key)
        for file, keys in by_file.items():
            if file.suffix.lower() in (".safetensors", ".gguf"):
                keys.sort(key=lambda k: self.entries[k].start)
        return by_file

    def read_order(self) -> list[str]:
        """The keys in the order :meth:`tensors` yields them (file by file, by offset)."""
        return [k for keys in self._by_file().values() for k in keys]

    def tensors(self, target=None, device="cpu", keys=None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (key, tensor) file by file (only ``keys`` when given); each tensor is a fresh copy in
        ``target(key, stored)`` dtype.

        Safetensors bytes are read into one reused scratch buffer and cast from there, so the only allocations
        that stay are the results: no fp32 copy of a bf16 model ever piles up (or fragments the heap). GGUF
        tensors come as stored: floats in their dtype, quantized ones as their raw bytes (uint8, one row per
        output row), which ``target`` cannot change (:mod:`infinitystar.gguf` dequantizes them when used).
        """
        for file, names in self._by_file(None if keys is None else set(keys)).items():
            if file.suffix.lower() not in (".safetensors", ".gguf"):
                for key in names:
                    t = self._loaded[key]
                    yield key, t.to(device=device, dtype=target(key, t) if target else t.dtype, copy=True)
                continue
            size = max(self.entries[k].end - self.entries[k].start for k in names)
            scratch = torch.empty(size, dtype=torch.uint8)
            with open(file, "rb", buffering=0) as handle:
                for key in names:
                    view = _read_safetensor(self.entries[key], handle, scratch)
                    if view.dtype == torch.uint8 and self.entries[key].gguf_type >= 0:  # quantized: bytes as stored
                        yield key, view.to(device=device, copy=True)
                        continue
                    yield key, view.to(device=device, dtype=target(key, view) if target else view.dtype, copy=True)
            del scratch

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors())
