"""Model folders of the pack: registers ``models/infinitystar`` with ComfyUI's ``folder_paths`` and lists the
transformer (single file or sharded folder), text-encoder folders and tokenizer files a user can pick.

The only module of the pack that touches ``folder_paths``. A user's ``extra_model_paths.yaml`` may already have
added ``infinitystar:`` paths before the pack is imported; they are kept.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import folder_paths

logger = logging.getLogger(__name__)
FOLDER = "infinitystar"
WEIGHT_EXTENSIONS = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".sft", ".gguf")  # .gguf: transformer only
INDEX_FILE = "model.safetensors.index.json"
MAX_DEPTH = 3  # how deep to look for sharded folders and text-encoder folders
RACY_NS = 3 * 10**9  # a folder changed this close to its scan may change again within its mtime's resolution (FAT: 2 s)
# Where each component may live, searched in this order.
TRANSFORMER_FOLDERS = (FOLDER, "diffusion_models")
TEXT_ENCODER_FOLDERS = (FOLDER, "text_encoders")
VAE_FOLDERS = (FOLDER, "vae")
# What each list offers: 'file' a weight file, 'sharded' a sharded checkpoint folder, 'hf' a text-encoder folder
TRANSFORMER_KINDS, TEXT_ENCODER_KINDS, VAE_KINDS = ("sharded", "file"), ("hf",), ("file",)


def register() -> None:
    """Add ``<models>/infinitystar`` (idempotent; created, like ComfyUI's own model folders, so the README's
    ``cd models/infinitystar`` works on a fresh install) and make sure its extension set is not empty."""
    folder = os.path.join(folder_paths.models_dir, FOLDER)
    folder_paths.add_model_folder_path(FOLDER, folder)  # de-duplicates
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:  # a read-only install: the other registered folders still work
        pass
    paths, exts = folder_paths.folder_names_and_paths[FOLDER]
    if not exts:  # an empty set means "any file" to folder_paths; keep listings to weight files
        folder_paths.folder_names_and_paths[FOLDER] = (paths, set(folder_paths.supported_pt_extensions))


def default_dir() -> Path:
    """The folder downloads go to: the first registered ``infinitystar`` path."""
    register()
    return Path(folder_paths.get_folder_paths(FOLDER)[0])


def output_dir() -> Path:
    return Path(folder_paths.get_output_directory())


def input_dir() -> Path:
    return Path(folder_paths.get_input_directory())


def is_upload_folder(path: str | Path) -> bool:
    """Whether ``path`` lies in ComfyUI's input, output or temp folder (clients of the server can write there)."""
    target = Path(path).resolve()
    bases = (folder_paths.get_input_directory(), folder_paths.get_output_directory(),
             folder_paths.get_temp_directory())
    return any(target.is_relative_to(Path(base).resolve()) for base in bases)


def _bases(folders: tuple[str, ...]) -> list[Path]:
    """The registered folders of ``folders``, each once (a folder registered twice, or under two names through a
    link such as unet -> diffusion_models, is scanned once)."""
    register()
    out, seen = [], set()
    for name in folders:
        if name in folder_paths.folder_names_and_paths:
            for folder in folder_paths.get_folder_paths(name):
                key = os.path.normcase(os.path.realpath(folder))
                if key not in seen:
                    seen.add(key)
                    out.append(Path(folder))
    return out


def _entries(folder: str | Path) -> list[tuple[str, bool, bool]] | None:
    """(name, is a folder, is a link) of each entry of ``folder``, sorted; None where it cannot be read
    (permissions, a dead mount, gone). Folders and links are told by the directory listing, without a stat per
    file, and an entry that cannot be told is left out."""
    try:
        out = []
        with os.scandir(folder) as it:
            for entry in it:
                try:
                    out.append((entry.name, entry.is_dir(), entry.is_symlink()))
                except OSError:
                    continue
        return sorted(out)
    except OSError:
        return None


def _folder_kind(names) -> str | None:
    """'hf' (a Hugging Face text-encoder folder with a tokenizer; one with only tokenizer_config.json too, the loader
    then says which tokenizer files are missing), 'sharded' (a sharded checkpoint: its index, or shards named like
    the hub's) or None, from a folder's entry names. hf first: the official flan-t5-xl folder is sharded too."""
    from ..infinitystar.checkpoint_files import SHARD_NAME
    from ..infinitystar.text import TOKENIZER_FILES

    names = set(names)
    if "config.json" in names and not names.isdisjoint((*TOKENIZER_FILES, "tokenizer_config.json")):
        return "hf"
    if INDEX_FILE in names or any(SHARD_NAME.search(n) for n in names):
        return "sharded"
    return None


def _kind(path: Path) -> str | None:
    """'file' (a weight file), 'hf' / 'sharded' (see _folder_kind) or None (anything else, unreadable, dangling)."""
    if os.path.isdir(path):  # os.path's tests say False where pathlib's raise (a folder that cannot be read)
        entries = _entries(path)
        return None if entries is None else _folder_kind(name for name, _, _ in entries)
    if os.path.isfile(path) and path.suffix.lower() in WEIGHT_EXTENSIONS:
        return "file"
    return None


class _Scan:
    """What one registered folder holds: (kind, relative posix name) of its 'sharded' and 'hf' folders (not
    descended into) and weight 'file's, down to MAX_DEPTH folders.

    An entry that cannot be read is skipped, never raised: ComfyUI builds the node list from these lists, and one
    error there drops the whole pack (a lost+found, a private folder, a dead network mount). Links are followed onto
    other disks and listed under their own names, but not into the folder being walked or one above it (a loop;
    told by real paths: some network and shared-folder file systems give every file the same inode). Kept while no
    folder it read has changed (their mtimes) and none it could not read has become readable, as ComfyUI's own lists
    are: ComfyUI asks for the node list at every refresh and on every queue."""

    def __init__(self, base: Path):
        self.mtimes: dict[str, int] = {}  # folders read, and the folders of links' missing targets
        self.failed: set[str] = set()  # folders that could not be read: a mount that comes later, a chmod
        self.found: list[tuple[str, str]] = []
        started = time.time_ns()
        entries = self._enter(str(base))
        if entries is not None:
            self._walk(str(base), "", 0, entries, (os.path.realpath(base),))
        # a change within the same mtime tick as the scan would not show: such a scan is not reused
        self.reusable = all(m < started - RACY_NS for m in self.mtimes.values())

    def _enter(self, folder: str):
        try:
            mtime = os.stat(folder).st_mtime_ns
        except OSError:
            self.failed.add(folder)
            return None
        entries = _entries(folder)
        if entries is None:
            self.failed.add(folder)
        else:
            self.mtimes[folder] = mtime
        return entries

    def _watch(self, folder: str) -> None:
        """Notice when something appears in ``folder`` (a link's target still downloading, a disk not mounted)."""
        try:
            self.mtimes.setdefault(folder, os.stat(folder).st_mtime_ns)
        except OSError:
            self.failed.add(folder)

    def _walk(self, folder: str, rel: str, depth: int, entries, chain: tuple[str, ...]) -> None:
        for name, is_dir, is_link in entries:
            if name.startswith("."):  # .cache (hub downloads), hidden partial files
                continue
            path = os.path.join(folder, name)
            if is_dir:
                real = os.path.realpath(path)  # also for what is no link to scandir: a Windows junction
                if _loops(real, chain):
                    continue
                inner = self._enter(path)
                if inner is None:
                    continue
                kind = _folder_kind(n for n, _, _ in inner)
                if kind:
                    self.found.append((kind, rel + name))
                elif depth < MAX_DEPTH:
                    self._walk(path, f"{rel}{name}/", depth + 1, inner, (*chain, real))
            elif name.lower().endswith(WEIGHT_EXTENSIONS):
                if not is_link or os.path.isfile(path):
                    self.found.append(("file", rel + name))
                else:  # listed once its target is there
                    self._watch(os.path.dirname(os.path.realpath(path)))

    def fresh(self) -> bool:
        if not self.reusable:
            return False
        try:
            if not all(os.stat(f).st_mtime_ns == m for f, m in self.mtimes.items()):
                return False
        except OSError:
            return False
        return not any(os.path.isdir(f) and _entries(f) is not None for f in self.failed)


def _loops(target: str, chain: tuple[str, ...]) -> bool:
    """Whether a link to real path ``target`` leads back into a folder being walked (``chain``, real paths): its
    own folder, one above it, or one above the scanned folder, where everything would be listed again."""
    target = os.path.normcase(target)  # Windows: one folder, whatever the case of its name
    top = target.rstrip(os.sep) + os.sep
    return any(c == target or c.startswith(top) for c in map(os.path.normcase, chain))


_SCANS: dict[str, _Scan] = {}


def _scan(base: Path) -> list[tuple[str, str]]:
    key = os.path.normcase(os.path.realpath(base))
    scan = _SCANS.get(key)
    if scan is None or not scan.fresh():  # names are relative: any path to the same folder finds the same
        try:
            scan = _Scan(base)
        except Exception:  # a last guard: a listing error must never take the node list down
            logger.warning("InfinityStar: could not list %s", base, exc_info=True)
            return []
        _SCANS[key] = scan
    return scan.found


def _list(folders: tuple[str, ...], kinds: tuple[str, ...]) -> list[str]:
    names: dict[str, None] = {}  # ordered, de-duplicated
    for base in _bases(folders):
        for kind, rel in _scan(base):
            if kind in kinds:
                names.setdefault(rel)
    return list(names)


def ours_first(names: list[str]) -> list[str]:
    """InfinityStar's files before the other models that share ComfyUI's folders (Wan, Flux...), each group in its
    order: told by the name, as headers are not read for a list."""
    return sorted(names, key=lambda n: "infinitystar" not in n.lower())


def transformer_choices() -> list[str]:
    # the tokenizer shares models/infinitystar; keep it out of this list by its name (headers are not read here)
    return ours_first([n for n in _list(TRANSFORMER_FOLDERS, TRANSFORMER_KINDS)
                       if "vae" not in n.rsplit("/", 1)[-1].lower()])


def text_encoder_choices() -> list[str]:
    return _list(TEXT_ENCODER_FOLDERS, TEXT_ENCODER_KINDS)


def vae_choices() -> list[str]:
    return ours_first([n for n in _list(VAE_FOLDERS, VAE_KINDS) if not n.lower().endswith((".index.json", ".gguf"))])


def _inside(name: str, pathmod=os.path) -> str:
    """``name`` as a path inside its folder: absolute parts and ``..`` are dropped, as ComfyUI's own
    ``folder_paths.get_full_path`` does, so a prompt sent to the API cannot name a file elsewhere. On Windows a drive
    letter or UNC share goes too (``relpath`` refuses a path on another drive)."""
    tail = pathmod.splitdrive(str(name))[1]
    return pathmod.relpath(pathmod.join(pathmod.sep, tail), pathmod.sep)


def _complete(path: Path, kind: str) -> bool:
    """Whether a sharded or text-encoder ('hf') folder holds every file its loader would read: each shard its index
    names (or, without one, every shard of its set); a text encoder's single pytorch_model.bin where the loader
    takes that (the same rule: ``t5.weight_files``)."""
    from ..infinitystar.checkpoint_files import checkpoint_files
    from ..infinitystar.t5 import weight_files

    try:
        checkpoint_files(weight_files(path) if kind == "hf" else path)
    except (OSError, ValueError):
        return False
    return True


def _resolve(name: str, folders: tuple[str, ...], what: str, hint: str, kinds: tuple[str, ...],
             moved: bool = False) -> Path:
    """The file or folder ``name`` as the list offers it, whole, in the first of ``folders`` that holds it so (a
    download cut off in one folder does not hide a complete copy in a later one); else, with ``moved``, the one
    place that holds its last part directly (a workflow's ``text_encoder/flan-t5-xl-official`` put straight into
    ``text_encoders/``, as the README allows); else the first of ``folders`` that holds anything by that name (the
    loader then says what is wrong with it: the shards it lacks, the files of a text encoder)."""
    name = _inside(name)
    bases = _bases(folders)
    candidates = [base / name for base in bases]
    kinds_of = {c: _kind(c) for c in candidates}
    offered = [c for c in candidates if kinds_of[c] in kinds]
    for candidate in offered:
        if kinds_of[candidate] == "file" or _complete(candidate, kinds_of[candidate]):
            return candidate
    tail = Path(name).name
    if moved and tail != name:
        elsewhere = {os.path.realpath(c): c for c in (base / tail for base in bases) if _kind(c) in kinds}
        if len(elsewhere) == 1:
            found = next(iter(elsewhere.values()))
            logger.info("InfinityStar %s %r found as %s", what, name, found)
            return found
    for candidate in (*offered, *candidates):
        if os.path.exists(candidate):
            return candidate
    looked = ", ".join(str(b) for b in bases) or "(no folder registered)"
    raise FileNotFoundError(
        f"InfinityStar {what} {name!r} not found. Put it in {default_dir()} (searched: {looked}). {hint}")


DOWNLOAD_HINT = ("Use the 'InfinityStar Download Models' node (or `python -m infinitystar download --dest "
                 "<ComfyUI>/models/infinitystar`) to fetch the official files from FoundationVision/InfinityStar.")


def resolve_transformer(name: str) -> Path:
    return _resolve(name, TRANSFORMER_FOLDERS, "transformer",
                    "It is the folder infinitystar_8b_720p_weights/ (or _480p_) with its shards and "
                    f"{INDEX_FILE}, or one merged .safetensors file. {DOWNLOAD_HINT}", TRANSFORMER_KINDS)


def resolve_text_encoder(name: str) -> Path:
    return _resolve(name, TEXT_ENCODER_FOLDERS, "text encoder",
                    f"It is the Hugging Face folder text_encoder/flan-t5-xl-official/. {DOWNLOAD_HINT}",
                    TEXT_ENCODER_KINDS, moved=True)


def resolve_vae(name: str) -> Path:
    return _resolve(name, VAE_FOLDERS, "video tokenizer",
                    f"It is the file infinitystar_videovae.pth. {DOWNLOAD_HINT}", VAE_KINDS)


def on_disk(name: str, resolve) -> str:
    """What a loader's file (or its folder's files) is on disk now, for ``fingerprint_inputs``: size and modification
    time of each file, so that files replaced under the same name (the demo weights by a download, a shard copied
    over) are loaded again instead of ComfyUI's cache serving the old weights until a restart."""
    try:
        path = resolve(name)
    except (FileNotFoundError, ValueError):
        return f"{name}: not found"  # the loader says so when it runs

    def stamp(entry: Path) -> str:
        try:
            stat = entry.stat()
        except OSError:
            return f"{entry.name}:?"
        return f"{entry.name}:{stat.st_size}:{stat.st_mtime_ns}"

    if not path.is_dir():
        return f"{path}|{stamp(path)}"
    try:
        entries = sorted(p for p in path.iterdir() if p.is_file())
    except OSError:
        entries = []
    return "|".join([str(path), *map(stamp, entries)])


def next_output_file(prefix: str, extension: str) -> tuple[Path, str]:
    """A new numbered file in ComfyUI's output folder for ``prefix`` (which may hold subfolders).

    Returns (path, subfolder relative to the output folder, with / on Windows too). An empty name (``""``, ``"videos/"``) becomes
    ``infinitystar``, not a hidden ``._00001_`` file.
    """
    prefix = prefix.strip()
    if not prefix.replace("\\", "/").rsplit("/", 1)[-1].strip("."):  # "", "videos/", "." would name a hidden file
        prefix = prefix.rstrip(".") + "infinitystar"
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, folder_paths.get_output_directory())
    return Path(folder) / f"{name}_{counter:05}_{extension}", Path(subfolder).as_posix() if subfolder else ""


def _files(base: Path, extension: str) -> list[Path]:
    """Files named ``*extension`` (any case: CLIP.MP4 too, as Windows users name them) under ``base``; folders that
    cannot be read are skipped (os.walk's default), links to folders not followed."""
    extension = extension.lower()
    return [Path(root, name) for root, _, names in os.walk(base) for name in names
            if name.lower().endswith(extension) and os.path.isfile(os.path.join(root, name))]


def input_files(extension: str) -> list[str]:
    """Files with ``extension`` under ComfyUI's input folder (relative posix paths)."""
    base = input_dir()
    return sorted(p.relative_to(base).as_posix() for p in _files(base, extension))


OUTPUT_TAG = " [output]"  # ComfyUI's annotation for a file picked from the output folder (as Load Image takes it)


def output_files(extension: str, keep) -> list[str]:
    """Files with ``extension`` under ComfyUI's output folder that ``keep(path)`` accepts, annotated ``[output]``."""
    base = output_dir()
    return sorted(p.relative_to(base).as_posix() + OUTPUT_TAG for p in _files(base, extension) if keep(p))


def resolve_input(name: str) -> Path:
    """A file in ComfyUI's input folder, or in its output / temp folder when annotated ``[output]`` / ``[temp]``
    (ComfyUI's annotations, read here rather than by ``folder_paths`` so that ``..`` stays inside the folder)."""
    base, where = input_dir(), "input"
    if name.endswith("[output]"):
        base, where, name = output_dir(), "output", name[:-len("[output]")].rstrip()
    elif name.endswith("[temp]"):
        base, where, name = Path(folder_paths.get_temp_directory()), "temp", name[:-len("[temp]")].rstrip()
    elif name.endswith("[input]"):
        name = name[:-len("[input]")].rstrip()
    path = base / _inside(name)
    if not os.path.isfile(path):  # os.path: False, not an error, for a folder that cannot be read
        raise FileNotFoundError(f"{name!r} not found in ComfyUI's {where} folder {base}")
    return path
