"""Getting the official files (HF repo ``FoundationVision/InfinityStar``, spec §7) and finding them on disk.

Only the chosen variant's files are fetched (≈35 GB transformer + 0.7 GB tokenizer + the flan-t5-xl folder),
resumably, into a folder laid out like the hub repository:

    DEST/infinitystar_8b_720p_weights/   DEST/infinitystar_8b_480p_weights/   DEST/InfinityStarInteract_24K_iters/
    DEST/infinitystar_videovae.pth       DEST/text_encoder/flan-t5-xl-official/
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ID = "FoundationVision/InfinityStar"
# "interact": the InfinityStar-Interact weights, under the folder name the official interact script loads
TRANSFORMER_DIRS = {"720p": "infinitystar_8b_720p_weights", "480p": "infinitystar_8b_480p_weights",
                    "interact": "InfinityStarInteract_24K_iters"}
VAE_FILE = "infinitystar_videovae.pth"
TEXT_ENCODER_DIR = "text_encoder/flan-t5-xl-official"
COMPONENTS = ("transformer", "vae", "text_encoder")


def _check_variant(variant: str) -> None:
    if variant not in TRANSFORMER_DIRS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {list(TRANSFORMER_DIRS)}")


def allow_patterns(variant: str = "720p", components: Sequence[str] = COMPONENTS) -> list[str]:
    """Hub path patterns of the files one variant needs."""
    _check_variant(variant)
    table = {"transformer": f"{TRANSFORMER_DIRS[variant]}/*", "vae": VAE_FILE, "text_encoder": f"{TEXT_ENCODER_DIR}/*"}
    unknown = [c for c in components if c not in table]
    if unknown:
        raise ValueError(f"unknown components {unknown}; choose from {list(table)}")
    return [table[c] for c in components]


def model_paths(root: str | Path, variant: str = "720p") -> dict[str, Path]:
    """Where each component lives under a hub-layout folder (whether or not it exists)."""
    _check_variant(variant)
    root = Path(root)
    return {"transformer": root / TRANSFORMER_DIRS[variant], "vae": root / VAE_FILE,
            "text_encoder": root / TEXT_ENCODER_DIR}


def how_to_get(root: str | Path, variant: str) -> str:
    return (f"Download them with `python -m infinitystar download --variant {variant} --dest {root}` "
            f"(≈47 GB from huggingface.co/{REPO_ID}), or try the pipeline offline on random weights with "
            "`python -m infinitystar demo`.")


# What each component weighs on the hub (fp32 transformer shards, the tokenizer, the whole flan-t5-xl folder): only
# to warn before a download that the disk cannot hold
APPROX_BYTES = {"transformer": 35_200_000_000, "vae": 700_000_000, "text_encoder": 11_400_000_000}
GB = 1e9


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the disk that holds ``folder`` (or would: its nearest existing parent)."""
    import shutil

    for place in (folder, *folder.parents):
        if place.exists():
            try:
                return shutil.disk_usage(place).free
            except OSError:
                return None
    return None


def _bytes_under(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _warn_if_short_of_space(dest: Path, variant: str, components: Sequence[str]) -> None:
    """A 47 GB download that fills the disk stops hours in: say so before it starts (what is already there counts;
    the sizes are approximate, so this warns and does not refuse)."""
    paths = model_paths(dest, variant)
    need = sum(max(APPROX_BYTES[c] - _bytes_under(paths[c]), 0) for c in components)
    free = free_bytes(dest)
    if free is not None and need > free:
        logger.warning("about %.1f GB are still to download into %s, but only %.1f GB are free on that disk: the "
                       "download will stop when the disk is full (it resumes once there is room). Free some space, or "
                       "download to another disk and point ComfyUI there (extra_model_paths.yaml).", need / GB, dest,
                       free / GB)


def _is_present(component: str, path: Path) -> bool:
    if component == "transformer":  # what checkpoint.checkpoint_files loads from a folder
        return path.is_dir() and any(path.glob("*.safetensors"))
    if component == "text_encoder":
        return (path / "config.json").is_file()
    return path.is_file()


def _missing(paths: dict[str, Path], components: Sequence[str]) -> list[str]:
    return [f"{c} ({paths[c]})" for c in components if not _is_present(c, paths[c])]


def find_models(root: str | Path, variant: str = "720p", components: Sequence[str] = COMPONENTS) -> dict[str, Path]:
    """Paths of the wanted components under ``root``; FileNotFoundError saying how to get the missing ones."""
    paths = model_paths(root, variant)
    missing = _missing(paths, components)
    if missing:
        raise FileNotFoundError(f"InfinityStar {variant} files not found under {root}: missing "
                                f"{', '.join(missing)}. {how_to_get(root, variant)}")
    return {c: paths[c] for c in components}


def _check_source_file(path: Path) -> None:
    """Refuse a file of a local source that cannot be whole: a truncated .safetensors or zip-format .pth, an index
    naming shards the folder lacks, a text-encoder folder without its config or tokenizer."""
    from .checkpoint_files import _safetensors_header, check_readable

    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        _safetensors_header(path)  # checks every tensor's bytes against the file size
    elif suffix in (".pth", ".pt"):
        is_zip_format = check_readable(path).startswith(b"PK\x03\x04")  # torch.save's; legacy pickles: the loader
        if is_zip_format and not zipfile.is_zipfile(path):
            raise ValueError(f"{path}: truncated ({path.stat().st_size:,} bytes; its zip directory is missing). "
                             "Copy it to the source again.")
    elif path.name == "model.safetensors.index.json":
        try:
            shards = set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: not a safetensors index ({exc})") from None
        lacking = sorted(s for s in shards if not (path.parent / s).is_file())
        if lacking:
            raise ValueError(f"{path.parent} lacks the shards its index names: {', '.join(lacking)}")
    elif path.name == "config.json" and path.parent.name == Path(TEXT_ENCODER_DIR).name:
        from .text import TOKENIZER_FILES

        if not any((path.parent / f).is_file() for f in TOKENIZER_FILES):
            raise ValueError(f"{path.parent} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")


COPY_CHUNK = 64 << 20  # bytes copied between two progress reports (and cancel checks)


def _copy_file(source: Path, target: Path, on_chunk) -> None:
    """Copy in chunks, calling ``on_chunk(nbytes)`` after each; the file gets its final name only once complete,
    and an exception (a cancel) removes the partial copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".incomplete")
    try:
        with open(source, "rb") as src, open(partial, "wb") as dst:
            while chunk := src.read(COPY_CHUNK):
                dst.write(chunk)
                on_chunk(len(chunk))
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _copy_local(source: Path, dest: Path, components: Sequence[str], patterns: list[str], progress: bool,
                replace: bool = True, callback=None) -> None:
    """Copy the files matching ``patterns`` from a hub-layout folder; files already complete are skipped. A source
    lacking a component, or holding a truncated .safetensors file, is refused before anything is copied; so are
    files of another size already in ``dest`` unless ``replace``. ``callback(done_bytes, total_bytes)`` runs at
    each file's start and after each copied chunk (a host's progress bar and cancel: an exception from it stops
    the copy, leaving the files copied whole)."""
    from tqdm.auto import tqdm

    from .checkpoint_files import UNFINISHED_MARKERS, unfinished_marker

    every = [p for p in sorted(source.rglob("*")) if p.is_file()]
    by_pattern = {pat: [p for p in every if fnmatch.fnmatch(p.relative_to(source).as_posix(), pat)]
                  for pat in patterns}
    absent = [f"{c} ({pat})" for c, pat in zip(components, patterns) if not by_pattern[pat]]
    if "text_encoder" in components and by_pattern[patterns[components.index("text_encoder")]] and not (
            source / TEXT_ENCODER_DIR / "config.json").is_file():
        absent.append(f"text_encoder config ({TEXT_ENCODER_DIR}/config.json)")
    if absent:
        raise FileNotFoundError(f"local source {source} holds no {', '.join(absent)}; nothing copied. Is it laid "
                                "out like the hub repo? (a subset of the components can be copied alone)")
    files = sorted({p for found in by_pattern.values() for p in found})
    for p in files:
        try:
            _check_source_file(p)
        except ValueError as exc:
            raise ValueError(f"local source damaged, nothing copied: {exc}") from None
    unfinished = [p.relative_to(source).as_posix() for p in files
                  if unfinished_marker(dest / p.relative_to(source)) is not None]
    if unfinished:  # another tool's download of the same name: its size says nothing, and it may still be running
        raise FileExistsError(f"{dest} holds unfinished downloads of another tool: {', '.join(unfinished[:5])} (a "
                              f"{'/'.join(UNFINISHED_MARKERS)} file beside each); nothing copied. Let that download "
                              "finish, or delete those files and their markers, then copy again.")
    todo = [p for p in files if not ((dest / p.relative_to(source)).is_file()
                                     and (dest / p.relative_to(source)).stat().st_size == p.stat().st_size)]
    replaced = [p.relative_to(source).as_posix() for p in todo if (dest / p.relative_to(source)).exists()]
    if replaced and not replace:
        raise FileExistsError(f"{dest} already holds {len(replaced)} of these file(s) with another size: "
                              f"{', '.join(replaced[:5])}{' ...' if len(replaced) > 5 else ''}; nothing copied. Delete "
                              "them first if the source's should replace them.")
    if replaced:
        logger.warning("replacing %d file(s) under %s whose size differs from the source's: %s", len(replaced), dest,
                       ", ".join(replaced[:5]) + (" ..." if len(replaced) > 5 else ""))
    total, done = sum(p.stat().st_size for p in todo), 0
    free = free_bytes(dest)
    if free is not None and total > free:
        raise OSError(28, f"copying {total / GB:.1f} GB into {dest} needs more than the {free / GB:.1f} GB free on that "
                          "disk; nothing copied. Free some space, or copy to another disk and point ComfyUI there "
                          "(extra_model_paths.yaml)")
    with tqdm(total=total, unit="B", unit_scale=True, disable=not progress, desc="copying") as bar:

        def on_chunk(nbytes: int) -> None:
            nonlocal done
            done += nbytes
            bar.update(nbytes)
            if callback is not None:
                callback(done, total)

        for p in todo:
            if callback is not None:
                callback(done, total)
            _copy_file(p, dest / p.relative_to(source), on_chunk)


NO_NETWORK_HINT = ("Without a network, copy the files from a folder laid out like the hub repo (`python -m "
                   "infinitystar download --local-source FOLDER`, or the Download node's local_source); for a mirror "
                   "set HF_ENDPOINT; behind a proxy set HTTPS_PROXY.")


def _unreachable() -> tuple[type[BaseException], ...]:
    """The errors huggingface_hub raises when the hub cannot be reached (and nothing is cached locally)."""
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # older huggingface_hub
        from huggingface_hub.utils import LocalEntryNotFoundError
    return (LocalEntryNotFoundError, ConnectionError)


def _is_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return constants.HF_HUB_OFFLINE or flag in ("1", "true", "yes", "on")


def reporting_tqdm(callback):
    """A tqdm class for ``snapshot_download(tqdm_class=...)`` whose bars also call ``callback(done, total)``.

    huggingface_hub gives it the bar of files finished and, in recent releases, bars of bytes (unit B; the first
    counts bytes received, its total growing as downloads start). One bar is reported: the first bytes bar once
    it exists, the files bar before, so the host's single bar does not jump between scales. Updates come from
    several download threads: they are counted under a lock, and once the callback raises (a host's cancel, which
    a host may raise only once) every later update on any thread raises the same, so every running download
    stops instead of only the one that saw it."""
    import threading

    from tqdm.auto import tqdm

    state = {"bar": None, "stop": None}
    lock = threading.Lock()

    class Reporting(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)  # some huggingface_hub releases name their bars; plain tqdm refuses the key
            self.in_bytes, self.done = kwargs.get("unit") == "B", int(kwargs.get("initial") or 0)
            super().__init__(*args, **kwargs)

        def update(self, n=1):  # counted here: a disabled tqdm (HF_HUB_DISABLE_PROGRESS_BARS) counts nothing
            shown = super().update(n)
            with lock:
                if state["stop"] is not None:
                    raise state["stop"]
                self.done += int(n or 0)
                if state["bar"] is None or (self.in_bytes and not state["bar"].in_bytes):
                    state["bar"] = self  # the first bar, until a bytes bar reports
                if state["bar"] is self:
                    try:
                        callback(self.done, max(int(self.total or 0), self.done))
                    except BaseException as exc:
                        state["stop"] = exc
                        raise
            return shown

    return Reporting


def download_models(dest_dir: str | Path, variant: str = "720p", components: Sequence[str] = COMPONENTS,
                    progress: bool = True, repo_id: str = REPO_ID, local_source: str | Path | None = None,
                    endpoint: str | None = None, revision: str | None = None,
                    replace: bool = True, callback=None) -> dict[str, Path]:
    """Fetch one variant's files into ``dest_dir`` (hub layout) and return their paths.

    ``callback(done, total)``: progress, and a host's cancel (it may raise). A hub download reports the bytes
    received where huggingface_hub counts them (recent releases), else the files finished. ``local_source`` copies
    from a local folder laid out like the hub repo instead (a mirror, a USB disk, the tiny set), reporting bytes per
    file and per copied chunk; ``replace=False``
    refuses to overwrite files of another size. Downloads resume where they stopped. With ``HF_HUB_OFFLINE`` set, only files already present are
    accepted, with a clear error otherwise.
    """
    dest = Path(dest_dir)
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"the destination {dest} is a file; give the models folder (e.g. ComfyUI/models/infinitystar)")
    patterns = allow_patterns(variant, components)
    if local_source is not None:
        source = Path(local_source)
        if not source.is_dir():
            raise FileNotFoundError(f"local source folder not found: {source}")
        _copy_local(source, dest, components, patterns, progress, replace=replace, callback=callback)
        return find_models(dest, variant, components)
    if _is_offline():
        missing = _missing(model_paths(dest, variant), components)
        if missing:
            raise RuntimeError(f"HF_HUB_OFFLINE is set, so nothing can be downloaded, and {', '.join(missing)} "
                               f"{'is' if len(missing) == 1 else 'are'} missing under {dest}. Unset HF_HUB_OFFLINE, "
                               "or copy the files from a folder laid out like the hub repo (`python -m infinitystar "
                               "download --local-source FOLDER`, or the Download node's local_source).")
        return find_models(dest, variant, components)
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    logger.info("downloading %s (%s) from %s into %s", variant, ", ".join(components), repo_id, dest)
    _warn_if_short_of_space(dest, variant, components)
    if not progress:
        disable_progress_bars()
    try:
        extra = {"tqdm_class": reporting_tqdm(callback)} if callback is not None else {}
        snapshot_download(repo_id, local_dir=str(dest), allow_patterns=patterns, revision=revision,
                          endpoint=endpoint, **extra)
    except _unreachable() as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuntimeError(f"cannot reach huggingface.co/{repo_id}: {first}. {NO_NETWORK_HINT}") from exc
    finally:
        if not progress:
            enable_progress_bars()
    paths = model_paths(dest, variant)
    absent = [(c, pattern) for c, pattern in zip(components, patterns) if not _is_present(c, paths[c])]
    if absent:  # the download went through but brought nothing for these: the repo does not hold them
        hint = (f" The interact weights' place on the hub is not confirmed: if you have the folder "
                f"{TRANSFORMER_DIRS['interact']}, put it in {dest}." if variant == "interact" else "")
        raise FileNotFoundError(f"huggingface.co/{repo_id}{f' ({revision})' if revision else ''} holds no files "
                                f"matching {', '.join(p for _, p in absent)} (the {variant} "
                                f"{', '.join(c for c, _ in absent)}).{hint}")
    return find_models(dest, variant, components)
