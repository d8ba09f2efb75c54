"""Model folders of the pack: registers ``models/infinitystar`` with ComfyUI's ``folder_paths`` and lists the
transformer (single file or sharded folder), text-encoder folders and tokenizer files a user can pick.

The only module of the pack that touches ``folder_paths``. A user's ``extra_model_paths.yaml`` may already have
added ``infinitystar:`` paths before the pack is imported; they are kept.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import folder_paths

logger = logging.getLogger(__name__)
FOLDER = "infinitystar"
WEIGHT_EXTENSIONS = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".sft", ".gguf")  # .gguf: transformer only
INDEX_FILE = "model.safetensors.index.json"
MAX_DEPTH = 3  # how deep to look for sharded folders and text-encoder folders
# Where each component may live, searched in this order.
TRANSFORMER_FOLDERS = (FOLDER, "diffusion_models")
TEXT_ENCODER_FOLDERS = (FOLDER, "text_encoders")
VAE_FOLDERS = (FOLDER, "vae")


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
    register()
    out = []
    for name in folders:
        if name in folder_paths.folder_names_and_paths:
            out += [Path(p) for p in folder_paths.get_folder_paths(name)]
    return out


def _is_sharded(folder: Path) -> bool:
    """A sharded checkpoint folder: its index, or shards named like the hub's (the loader reads every shard then)."""
    from ..infinitystar.checkpoint_files import SHARD_NAME

    return (folder / INDEX_FILE).is_file() or any(SHARD_NAME.search(f.name) for f in folder.glob("*.safetensors"))


def _is_hf_text_encoder(folder: Path) -> bool:
    """A Hugging Face model folder with a tokenizer. One with only tokenizer_config.json is listed too: the loader
    then says which tokenizer files are missing."""
    from ..infinitystar.text import TOKENIZER_FILES

    return (folder / "config.json").is_file() and any(
        (folder / f).is_file() for f in (*TOKENIZER_FILES, "tokenizer_config.json"))


def _scan(base: Path, depth: int = 0):
    """Yield (kind, path) under ``base``: 'sharded' and 'hf' folders (not descended into) and weight 'file's."""
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if _is_hf_text_encoder(entry):  # first: the official flan-t5-xl folder is sharded too (index + 2 shards)
                yield "hf", entry
            elif _is_sharded(entry):
                yield "sharded", entry
            elif depth < MAX_DEPTH:
                yield from _scan(entry, depth + 1)
        elif entry.suffix.lower() in WEIGHT_EXTENSIONS:
            yield "file", entry


def _list(folders: tuple[str, ...], kinds: tuple[str, ...]) -> list[str]:
    names: list[str] = []
    for base in _bases(folders):
        for kind, path in _scan(base):
            rel = path.relative_to(base).as_posix()
            if kind in kinds and rel not in names:
                names.append(rel)
    return names


def ours_first(names: list[str]) -> list[str]:
    """InfinityStar's files before the other models that share ComfyUI's folders (Wan, Flux...), each group in its
    order: told by the name, as headers are not read for a list."""
    return sorted(names, key=lambda n: "infinitystar" not in n.lower())


def transformer_choices() -> list[str]:
    # the tokenizer shares models/infinitystar; keep it out of this list by its name (headers are not read here)
    return ours_first([n for n in _list(TRANSFORMER_FOLDERS, ("sharded", "file"))
                       if "vae" not in n.rsplit("/", 1)[-1].lower()])


def text_encoder_choices() -> list[str]:
    return _list(TEXT_ENCODER_FOLDERS, ("hf",))


def vae_choices() -> list[str]:
    return ours_first([n for n in _list(VAE_FOLDERS, ("file",)) if not n.lower().endswith((".index.json", ".gguf"))])


def _inside(name: str, pathmod=os.path) -> str:
    """``name`` as a path inside its folder: absolute parts and ``..`` are dropped, as ComfyUI's own
    ``folder_paths.get_full_path`` does, so a prompt sent to the API cannot name a file elsewhere. On Windows a drive
    letter or UNC share goes too (``relpath`` refuses a path on another drive)."""
    tail = pathmod.splitdrive(str(name))[1]
    return pathmod.relpath(pathmod.join(pathmod.sep, tail), pathmod.sep)


def _resolve(name: str, folders: tuple[str, ...], what: str, hint: str, moved=None) -> Path:
    """The file or folder ``name`` in the first of ``folders`` that holds it; else, with ``moved`` (what the
    component must be), when exactly one place holds its last part directly (a workflow's
    ``text_encoder/flan-t5-xl-official`` put straight into ``text_encoders/``, as the README allows), that one."""
    name = _inside(name)
    for base in _bases(folders):
        candidate = base / name
        if candidate.exists():
            return candidate
    tail = Path(name).name
    elsewhere = {c.resolve(): c for c in (base / tail for base in _bases(folders))
                 if moved is not None and tail != name and c.exists() and moved(c)}
    if len(elsewhere) == 1:
        found = next(iter(elsewhere.values()))
        logger.info("InfinityStar %s %r found as %s", what, name, found)
        return found
    looked = ", ".join(str(b) for b in _bases(folders)) or "(no folder registered)"
    raise FileNotFoundError(
        f"InfinityStar {what} {name!r} not found. Put it in {default_dir()} (searched: {looked}). {hint}")


DOWNLOAD_HINT = ("Use the 'InfinityStar Download Models' node (or `python -m infinitystar download --dest "
                 "<ComfyUI>/models/infinitystar`) to fetch the official files from FoundationVision/InfinityStar.")


def resolve_transformer(name: str) -> Path:
    return _resolve(name, TRANSFORMER_FOLDERS, "transformer",
                    "It is the folder infinitystar_8b_720p_weights/ (or _480p_) with its shards and "
                    f"{INDEX_FILE}, or one merged .safetensors file. {DOWNLOAD_HINT}")


def resolve_text_encoder(name: str) -> Path:
    return _resolve(name, TEXT_ENCODER_FOLDERS, "text encoder",
                    f"It is the Hugging Face folder text_encoder/flan-t5-xl-official/. {DOWNLOAD_HINT}",
                    moved=_is_hf_text_encoder)


def resolve_vae(name: str) -> Path:
    return _resolve(name, VAE_FOLDERS, "video tokenizer",
                    f"It is the file infinitystar_videovae.pth. {DOWNLOAD_HINT}")


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


def input_files(extension: str) -> list[str]:
    """Files with ``extension`` under ComfyUI's input folder (relative posix paths)."""
    base = input_dir()
    if not base.is_dir():
        return []
    return sorted(p.relative_to(base).as_posix() for p in base.rglob(f"*{extension}") if p.is_file())


OUTPUT_TAG = " [output]"  # ComfyUI's annotation for a file picked from the output folder (as Load Image takes it)


def output_files(extension: str, keep) -> list[str]:
    """Files with ``extension`` under ComfyUI's output folder that ``keep(path)`` accepts, annotated ``[output]``."""
    base = output_dir()
    if not base.is_dir():
        return []
    return sorted(p.relative_to(base).as_posix() + OUTPUT_TAG for p in base.rglob(f"*{extension}")
                  if p.is_file() and keep(p))


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
    if not path.is_file():
        raise FileNotFoundError(f"{name!r} not found in ComfyUI's {where} folder {base}")
    return path
