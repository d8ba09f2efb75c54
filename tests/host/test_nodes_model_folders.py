"""The pack's model folders inside a real ComfyUI, in-process on the CPU: what the loaders list (official layout,
shared folders, links, unreadable or partial copies), names from a prompt kept inside the folders, and files that
are not what a loader wants. Needs COMFYUI_PATH (see conftest.py)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from node_kit import run


def test_folders_list_official_layout(pack, comfy_dirs):
    paths = pack.paths
    assert "infinitystar_8b_720p_weights" in paths.transformer_choices()
    assert "infinitystar_8b_480p_weights" in paths.transformer_choices()
    assert not any(c.endswith("-of-00002.safetensors") for c in paths.transformer_choices())  # folders, not shards
    assert "text_encoder/flan-t5-xl-official" in paths.text_encoder_choices()
    assert "infinitystar_videovae.pth" in paths.vae_choices()


def test_infinitystar_files_are_listed_before_other_models_in_shared_folders(pack, comfy_dirs, tmp_path,
                                                                              monkeypatch):
    """diffusion_models and vae hold every other model too (Wan, Flux...): ours come first in the loaders' lists."""
    import folder_paths

    (tmp_path / "aaa_wan2.1_t2v_1.3B_fp16.safetensors").write_bytes(b"")
    (tmp_path / "infinitystar_8b_720p_bf16.safetensors").write_bytes(b"")
    (tmp_path / "ae.safetensors").write_bytes(b"")
    for folder in ("diffusion_models", "vae"):
        monkeypatch.setitem(folder_paths.folder_names_and_paths, folder,
                            ([str(tmp_path)], set(folder_paths.supported_pt_extensions)))
    models = pack.paths.transformer_choices()
    assert models.index("aaa_wan2.1_t2v_1.3B_fp16.safetensors") > models.index("infinitystar_8b_720p_bf16.safetensors")
    assert models.index("aaa_wan2.1_t2v_1.3B_fp16.safetensors") > models.index("infinitystar_8b_720p_weights")
    vaes = pack.paths.vae_choices()
    assert vaes.index("ae.safetensors") > vaes.index("infinitystar_videovae.pth")


def test_a_workflow_name_finds_the_folder_put_straight_into_text_encoders(pack, comfy_dirs, tmp_path, monkeypatch):
    """Workflows name text_encoder/flan-t5-xl-official (the hub layout); the README allows the folder straight in
    models/text_encoders: found there when exactly one folder has that last name, else 'not found' as before."""
    import folder_paths

    def t5_folder(path):
        path.mkdir(parents=True)
        (path / "config.json").write_text("{}")
        (path / "spiece.model").write_bytes(b"")
        return path

    one, two = tmp_path / "a", tmp_path / "b"
    (one / "not-t5").mkdir(parents=True)  # a folder of that name that is no text encoder is not taken
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "text_encoders", ([str(one)], set()))
    with pytest.raises(FileNotFoundError, match="not found"):
        pack.paths.resolve_text_encoder("text_encoder/not-t5")
    t5_folder(one / "my-t5")
    assert pack.paths.resolve_text_encoder("text_encoder/my-t5") == one / "my-t5"
    t5_folder(two / "my-t5")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "text_encoders", ([str(one), str(two)], set()))
    with pytest.raises(FileNotFoundError, match="not found"):  # two candidates: which one is not guessed
        pack.paths.resolve_text_encoder("text_encoder/my-t5")
    with pytest.raises(FileNotFoundError, match="not found"):
        pack.paths.resolve_text_encoder("text_encoder/other-t5")
    (one / "model.safetensors").write_bytes(b"")  # other components keep their exact names
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(one)], {".safetensors"}))
    with pytest.raises(FileNotFoundError, match="not found"):
        pack.paths.resolve_transformer("old/model.safetensors")
    assert (Path(folder_paths.models_dir) / "infinitystar").is_dir()  # registered and created


def test_unreadable_and_looping_entries_never_take_the_lists_down(pack, comfy_dirs, tmp_path, monkeypatch):
    """A folder the server cannot read (a disk's lost+found, another user's folder, a dead network mount) used to
    raise out of the loaders' schemas, and ComfyUI then dropped the whole pack at startup. Such entries are
    skipped; a link loop or a link to a parent lists nothing twice, and a dangling link is no choice."""
    import os

    import folder_paths

    base = tmp_path / "models"
    (base / "sub").mkdir(parents=True)
    (base / "a.safetensors").write_bytes(b"")
    (base / "sub" / "b.safetensors").write_bytes(b"")
    private = base / "lost+found"
    (private / "inner").mkdir(parents=True)
    (private / "c.safetensors").write_bytes(b"")
    (base / "dead.safetensors").symlink_to(tmp_path / "nowhere.safetensors")
    (base / "sub" / "loop").symlink_to(base / "sub", target_is_directory=True)
    (base / "up").symlink_to(tmp_path, target_is_directory=True)
    real_stat, real_scandir = os.stat, os.scandir

    def denied(path):
        if str(private) in os.fsdecode(path):
            raise PermissionError(13, "Permission denied", str(path))

    def stat(path, *a, **k):  # what a non-root server meets: the folder is seen, nothing in it can be
        if os.fsdecode(path) != str(private):
            denied(path)
        return real_stat(path, *a, **k)

    def scandir(path="."):
        denied(path)
        return real_scandir(path)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(base)], {".safetensors"}))
    listed = pack.paths.transformer_choices()
    assert "a.safetensors" in listed and "sub/b.safetensors" in listed
    assert not [n for n in listed if n.startswith(("lost+found", "dead", "up/", "sub/loop"))], listed
    schema = pack.loaders.InfinityStarModelLoader.define_schema()  # what ComfyUI calls at startup
    assert "a.safetensors" in next(i for i in schema.inputs if i.id == "model_name").options
    assert "not found" in pack.loaders.InfinityStarModelLoader.validate_inputs(model_name="lost+found/c.safetensors")


def test_a_complete_copy_is_not_hidden_by_a_partial_one_and_lists_are_reused(pack, comfy_dirs, tmp_path,
                                                                             monkeypatch):
    """The loader opens what the list offered: a half-downloaded folder in models/infinitystar (only the hub's
    .cache) does not hide a complete copy in diffusion_models. A folder registered twice is read once, and a listing
    is reused until a folder in it changes (ComfyUI asks for every node's list at each refresh and each queue)."""
    import os

    import folder_paths

    first, second = tmp_path / "first", tmp_path / "second"
    (first / "weights" / ".cache").mkdir(parents=True)
    (first / "weights" / ".cache" / "x.incomplete").write_bytes(b"")
    (second / "weights").mkdir(parents=True)
    (second / "weights" / "model-00001-of-00002.safetensors").write_bytes(b"")
    (second / "weights" / "model-00002-of-00002.safetensors").write_bytes(b"")
    (first / "videovae.pth").write_bytes(b"")
    (first / "t5").mkdir()
    (first / "t5" / "config.json").write_text("{}", encoding="utf-8")
    (first / "t5" / "spiece.model").write_bytes(b"")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "infinitystar", ([str(first)], {".safetensors"}))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models",
                        ([str(second), str(second) + os.sep, str(first)], {".safetensors"}))
    assert pack.paths.resolve_transformer("weights") == second / "weights"
    bases = [b.resolve() for b in pack.paths._bases(pack.paths.TRANSFORMER_FOLDERS)]
    assert bases.count(first) == 1 and bases.count(second) == 1  # registered three times between them

    for folder in (first, second, second / "weights", first / "weights", first / "t5"):  # older than the racy window
        os.utime(folder, ns=(10**18, 10**18))
    reads = []
    real = pack.paths._entries
    monkeypatch.setattr(pack.paths, "_entries", lambda folder: reads.append(str(folder)) or real(folder))
    assert pack.paths.transformer_choices().count("weights") == 1
    reads.clear()
    assert "weights" in pack.paths.transformer_choices()
    assert reads == []  # nothing changed: nothing read again
    (second / "new.safetensors").write_bytes(b"")
    assert "new.safetensors" in pack.paths.transformer_choices() and reads

    def no_walk(*a, **k):
        raise AssertionError("a queue's validation walked the model folders")

    monkeypatch.setattr(pack.paths, "_list", no_walk)  # a queue checks the names it got, without listing again
    assert pack.loaders.InfinityStarModelLoader.validate_inputs(model_name="weights", weight_dtype="auto") is True
    assert "weight_dtype is 'fp4'" in pack.loaders.InfinityStarModelLoader.validate_inputs(model_name="weights",
                                                                                           weight_dtype="fp4")
    assert pack.loaders.InfinityStarVAELoader.validate_inputs(vae_name="videovae.pth", dtype="auto") is True
    assert pack.loaders.InfinityStarTextEncoderLoader.validate_inputs(encoder_name="t5", dtype="fp16") is True
    assert "not found" in pack.loaders.InfinityStarTextEncoderLoader.validate_inputs(encoder_name="t6", dtype="fp16")


def test_a_copy_is_whole_by_the_loader_s_own_rule(pack, comfy_dirs, tmp_path, monkeypatch):
    """A folder counts as whole only if its loader could read it: a text encoder cut off after its .bin and a
    safetensors index (which the loader reads first) and a transformer whose index is damaged both give way to a
    whole copy further on; a text encoder of .bin shards under their index is whole."""
    import json

    import folder_paths

    first, second = tmp_path / "first", tmp_path / "second"
    for base in (first, second):
        t5 = base / "text_encoder" / "flan-t5-xl-official"
        t5.mkdir(parents=True)
        (t5 / "config.json").write_text("{}", encoding="utf-8")
        (t5 / "spiece.model").write_bytes(b"")
        (t5 / "pytorch_model.bin").write_bytes(b"")
        (base / "weights").mkdir()
        (base / "weights" / "model-00001-of-00001.safetensors").write_bytes(b"")
    cut = first / "text_encoder" / "flan-t5-xl-official"
    (cut / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}), encoding="utf-8")
    (first / "weights" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": ["model-00001-of-00001.safetensors"]}}), encoding="utf-8")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "infinitystar", ([str(first)], {".safetensors"}))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "text_encoders", ([str(second)], {".safetensors"}))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(second)], {".safetensors"}))
    assert pack.paths.resolve_text_encoder("text_encoder/flan-t5-xl-official") == \
        second / "text_encoder" / "flan-t5-xl-official"
    assert pack.paths.resolve_transformer("weights") == second / "weights"

    (cut / "model.safetensors.index.json").unlink()
    (cut / "pytorch_model.bin").unlink()
    (cut / "pytorch_model-00001-of-00002.bin").write_bytes(b"")
    (cut / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}),
        encoding="utf-8")
    assert pack.paths.resolve_text_encoder("text_encoder/flan-t5-xl-official") == second / "text_encoder" / \
        "flan-t5-xl-official"  # a shard missing
    (cut / "pytorch_model-00002-of-00002.bin").write_bytes(b"")
    assert pack.paths.resolve_text_encoder("text_encoder/flan-t5-xl-official") == cut


OLD_NS = (10**18, 10**18)  # far past, outside the racy window: a listing of such folders is reused


def _older(*folders):
    import os

    for folder in folders:
        os.utime(folder, ns=OLD_NS)


def _listed(pack) -> list[str]:
    """The transformer list of diffusion_models alone (models/infinitystar holds the session's tiny models)."""
    return pack.paths._list(("diffusion_models",), pack.paths.TRANSFORMER_KINDS)


def test_folders_that_could_not_be_read_are_listed_once_they_can(pack, comfy_dirs, tmp_path, monkeypatch):
    """A listing is reused until a folder in it changes, but a folder that was missing (extra_model_paths on a disk
    mounted later) or unreadable (a chmod, a remount) is tried again at each listing: pressing R shows it."""
    import os

    import folder_paths

    nas = tmp_path / "nas" / "diffusion_models"
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(nas)], {".safetensors"}))
    assert _listed(pack) == []
    nas.mkdir(parents=True)
    (nas / "shared").mkdir()
    (nas / "a.safetensors").write_bytes(b"")
    (nas / "shared" / "b.safetensors").write_bytes(b"")
    _older(nas, nas / "shared")
    real_scandir, locked = os.scandir, {"on": True}

    def scandir(path="."):
        if locked["on"] and os.fsdecode(path).endswith("shared"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert _listed(pack) == ["a.safetensors"]  # the mount came: listed without a restart
    locked["on"] = False  # no mtime changes with a chmod
    assert _listed(pack) == ["a.safetensors", "shared/b.safetensors"]


def test_folders_are_told_apart_where_the_file_system_gives_no_inodes(pack, comfy_dirs, tmp_path, monkeypatch):
    """sshfs-win, WebDAV drives and VirtualBox shares report inode 0 for every file: loops are told by real paths,
    so sharded folders and subfolders still show there."""
    import os

    import folder_paths

    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / pack.paths.INDEX_FILE).write_text("{}", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.safetensors").write_bytes(b"")
    real_stat = os.stat

    class NoInode:
        def __init__(self, st):
            self._st = st

        def __getattr__(self, name):
            return 0 if name in ("st_ino", "st_dev") else getattr(self._st, name)

    def stat(path, *a, **k):
        return NoInode(real_stat(path, *a, **k))

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(tmp_path)], {".safetensors"}))
    assert _listed(pack) == ["sub/b.safetensors", "weights"]


def test_links_keep_their_names_and_a_file_link_shows_once_its_target_is_there(pack, comfy_dirs, tmp_path,
                                                                               monkeypatch):
    """A link to a model folder beside it (a short alias) does not hide the folder's own name, which the templates
    use; a link to a file still downloading elsewhere is offered once the file is there."""
    import folder_paths

    base, elsewhere = tmp_path / "models", tmp_path / "downloads"
    (base / "infinitystar_8b_720p_weights").mkdir(parents=True)
    (base / "infinitystar_8b_720p_weights" / pack.paths.INDEX_FILE).write_text("{}", encoding="utf-8")
    (base / "720p").symlink_to(base / "infinitystar_8b_720p_weights", target_is_directory=True)
    elsewhere.mkdir()
    (base / "big.safetensors").symlink_to(elsewhere / "big.safetensors")
    _older(base, base / "infinitystar_8b_720p_weights", elsewhere)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(base)], {".safetensors"}))
    assert _listed(pack) == ["720p", "infinitystar_8b_720p_weights"]
    (elsewhere / "big.safetensors").write_bytes(b"")
    assert _listed(pack) == ["720p", "big.safetensors", "infinitystar_8b_720p_weights"]


def test_a_junction_back_up_the_tree_lists_nothing_twice(pack, comfy_dirs, tmp_path, monkeypatch):
    """Windows junctions are links the directory listing does not call links: a junction to its own folder or one
    above is no loop into the lists (played here by a symlink that the listing reports as a plain folder)."""
    import folder_paths

    base = tmp_path / "models"
    (base / "all_models").mkdir(parents=True)
    (base / "all_models" / "a.safetensors").write_bytes(b"")
    (base / "all_models" / "again").symlink_to(base / "all_models", target_is_directory=True)
    (base / "all_models" / "up").symlink_to(tmp_path, target_is_directory=True)
    real = pack.paths._entries
    monkeypatch.setattr(pack.paths, "_entries", lambda folder: [(n, d, False) for n, d, _ in real(folder) or ()]
                        if real(folder) is not None else None)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(base)], {".safetensors"}))
    assert _listed(pack) == ["all_models/a.safetensors"]


def test_a_cut_off_download_does_not_hide_a_whole_copy(pack, comfy_dirs, tmp_path, monkeypatch):
    """A download cut off after the index and some shards is a sharded folder too: the loader opens the complete
    copy in a later folder. A workflow's text encoder name that exists only as a broken folder in the first place
    resolves to the complete copy moved into text_encoders/; with no complete copy anywhere, the loader gets the
    broken one and says what it lacks."""
    import json

    import folder_paths

    first, second = tmp_path / "first", tmp_path / "second"
    for folder, shards in ((first, [1]), (second, [1, 2])):
        weights = folder / "weights"
        weights.mkdir(parents=True)
        names = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
        (weights / pack.paths.INDEX_FILE).write_text(json.dumps({"weight_map": {"a": names[0], "b": names[1]}}),
                                                     encoding="utf-8")
        for i in shards:
            (weights / names[i - 1]).write_bytes(b"")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "infinitystar", ([str(first)], {".safetensors"}))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(second)], {".safetensors"}))
    assert pack.paths.resolve_transformer("weights") == second / "weights"
    (second / "weights" / "model-00002-of-00002.safetensors").unlink()
    assert pack.paths.resolve_transformer("weights") == first / "weights"  # none whole: the first, as listed

    broken = first / "text_encoder" / "flan-t5-xl-official"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}", encoding="utf-8")
    moved = second / "flan-t5-xl-official"
    moved.mkdir()
    (moved / "config.json").write_text("{}", encoding="utf-8")
    (moved / "spiece.model").write_bytes(b"")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "text_encoders", ([str(second)], set()))
    assert pack.paths.resolve_text_encoder("text_encoder/flan-t5-xl-official") == moved
    (moved / "spiece.model").unlink()
    assert pack.paths.resolve_text_encoder("text_encoder/flan-t5-xl-official") == broken

    # a text encoder download cut off after its config, tokenizer and index, beside a whole copy in text_encoders/
    (moved / "spiece.model").write_bytes(b"")
    (broken / "spiece.model").write_bytes(b"")
    index = json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    (broken / pack.paths.INDEX_FILE).write_text(index, encoding="utf-8")
    (broken / "model-00001-of-00002.safetensors").write_bytes(b"")
    whole = second / "text_encoder" / "flan-t5-xl-official"
    whole.mkdir(parents=True)
    for name in ("config.json", "spiece.model", "pytorch_model.bin"):  # a single .bin is whole too
        (whole / name).write_bytes(b"{}")
    assert pack.paths.resolve_text_encoder("text_encoder/flan-t5-xl-official") == whole


def test_registration_keeps_user_paths(pack, comfy_dirs):
    import folder_paths

    pack.paths.register()
    pack.paths.register()
    listed = folder_paths.get_folder_paths("infinitystar")
    assert listed[0] == str(comfy_dirs["models"])  # the user's (here: the test's) folder stays first
    assert len(listed) == len(set(listed))
    assert folder_paths.folder_names_and_paths["infinitystar"][1]  # extensions set is not empty


# ---------------------------------------------------------------------------------------------- bad input

def test_missing_model_names_folder_and_download(pack, comfy_dirs):
    loader = pack.loaders.InfinityStarModelLoader
    msg = loader.validate_inputs(model_name="infinitystar_8b_1080p_weights")
    assert isinstance(msg, str) and "models" in msg and "Download" in msg
    with pytest.raises(FileNotFoundError, match="infinitystar"):
        run(loader, model_name="nope.safetensors", weight_dtype="default", compute_dtype="auto", attention="auto")


def test_names_from_a_prompt_stay_inside_the_model_folders(pack, comfy_dirs, tmp_path):
    """A model or tokens name sent to the API cannot point outside ComfyUI's folders (absolute or ../ paths),
    as with ComfyUI's own folder_paths.get_full_path."""
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"x")
    vae = pack.paths.resolve_vae("infinitystar_videovae.pth")
    escape = os.path.relpath(outside, vae.parent)
    assert ".." in escape
    for name in (str(outside), escape):
        with pytest.raises(FileNotFoundError):
            pack.paths.resolve_vae(name)
        with pytest.raises(FileNotFoundError):
            pack.paths.resolve_input(name)
    import ntpath  # Windows: a drive letter or share is dropped too (relpath would raise on another drive)

    for name, inside in (("D:\\models\\x.pth", "models\\x.pth"), ("\\\\host\\share\\y.pth", "y.pth"),
                         ("C:..\\..\\z.pth", "z.pth"), ("a\\b.pth", "a\\b.pth")):
        assert pack.paths._inside(name, ntpath) == inside


def test_annotated_names_resolve_in_their_folder(pack, comfy_dirs):
    """``name [output]`` / ``name [temp]`` (ComfyUI's annotations, e.g. a preview's file sent on) resolve in that
    folder, and ``..`` does not leave it."""
    import folder_paths

    temp = Path(folder_paths.get_temp_directory())
    temp.mkdir(parents=True, exist_ok=True)
    (temp / "clip_temp.mp4").write_bytes(b"x")
    try:
        assert pack.paths.resolve_input("clip_temp.mp4 [temp]") == temp / "clip_temp.mp4"
        with pytest.raises(FileNotFoundError, match="temp folder"):
            pack.paths.resolve_input("../../clip_temp.mp4/../x/clip_temp.mp4 [temp]")
        with pytest.raises(FileNotFoundError, match="input folder"):
            pack.paths.resolve_input("clip_temp.mp4")
    finally:
        (temp / "clip_temp.mp4").unlink()


def test_an_empty_file_name_prefix_still_names_the_file(pack, comfy_dirs):
    """Save Tokens with an empty prefix (or only a folder) writes ``infinitystar_00001_.safetensors``, not a hidden
    ``._00001_`` file."""
    for prefix, folder in (("", ""), ("  ", ""), ("clips/", "clips"), (".", ""), ("clips/..", "clips")):
        path, subfolder = pack.paths.next_output_file(prefix, ".safetensors")
        assert path.name.startswith("infinitystar_") and subfolder == folder, (prefix, path)
        assert path.parent == Path(comfy_dirs["output"]) / folder


def test_foreign_file_says_what_it_looks_like(pack, comfy_dirs):
    from safetensors.torch import save_file

    folder = comfy_dirs["models"] / "foreign"
    folder.mkdir(exist_ok=True)
    save_file({"patch_embedding.weight": torch.zeros(4, 4), "blocks.0.self_attn.q.weight": torch.zeros(4, 4)},
              str(folder / "wan_like.safetensors"))
    with pytest.raises(ValueError, match="Wan"):
        run(pack.loaders.InfinityStarModelLoader, model_name="foreign/wan_like.safetensors", weight_dtype="default",
            compute_dtype="auto", attention="auto")
    with pytest.raises(ValueError, match="not the InfinityStar video tokenizer"):
        run(pack.loaders.InfinityStarVAELoader, vae_name="foreign/wan_like.safetensors", dtype="auto")


def test_sharded_text_encoder_folder_is_a_text_encoder(pack, comfy_dirs, loaded):
    """The official flan-t5-xl folder holds an index and two shards: it is offered by the Text Encoder Loader (not
    the Model Loader), and it loads and encodes like the single-file one."""

    from transformers import T5EncoderModel

    source = comfy_dirs["models"] / "text_encoder" / "flan-t5-xl-official"
    folder = comfy_dirs["models"] / "text_encoder" / "flan-sharded"
    folder.mkdir()
    try:
        for f in source.iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".index.json")):
                shutil.copy(f, folder / f.name)
        T5EncoderModel.from_pretrained(str(source)).save_pretrained(str(folder), max_shard_size="40KB")
        assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*-of-*"))) > 1
        assert "text_encoder/flan-sharded" in pack.paths.text_encoder_choices()
        assert not any(c.startswith("text_encoder/") for c in pack.paths.transformer_choices())
        te = run(pack.loaders.InfinityStarTextEncoderLoader, encoder_name="text_encoder/flan-sharded", dtype="fp32")[0]
        want = loaded["te"].encoder.encode("a red fox", duration_s=5)
        assert torch.equal(te.encoder.encode("a red fox", duration_s=5).cond, want.cond)
        assert type(te.patcher.model).__name__ == "InfinityStarTextEncoder"  # "Requested to load ..." in the log
    finally:
        shutil.rmtree(folder)


def test_shards_without_their_index_are_one_folder(pack, comfy_dirs):
    """A sharded folder that lost its index is listed (and loads) as a folder, not shard by shard; a shard picked
    on its own (a saved workflow, the API) says it is one shard of several and to choose the folder."""

    source = comfy_dirs["models"] / "infinitystar_8b_720p_weights"
    folder = comfy_dirs["models"] / "unindexed_720p"
    shards = sorted(source.glob("*-of-*.safetensors"))
    assert len(shards) > 1
    folder.mkdir()
    try:
        for shard in shards:
            shutil.copy(shard, folder / shard.name)
        choices = pack.paths.transformer_choices()
        assert "unindexed_720p" in choices and not any(c.startswith("unindexed_720p/") for c in choices)
        loader = dict(weight_dtype="default", compute_dtype="auto", attention="auto")
        model = run(pack.loaders.InfinityStarModelLoader, model_name="unindexed_720p", **loader)[0]
        assert model.info.config.depth > 0
        with pytest.raises(ValueError, match=f"shard 1 of {len(shards)} of a sharded checkpoint: choose the folder"):
            run(pack.loaders.InfinityStarModelLoader, model_name=f"unindexed_720p/{shards[0].name}", **loader)
    finally:
        shutil.rmtree(folder)


def test_a_loader_s_fingerprint_follows_its_files_on_disk(pack, comfy_dirs, tmp_path, monkeypatch):
    """ComfyUI reruns a loader whose fingerprint changed: a shard or a text encoder file replaced under its name
    (same folder, same names) changes it; nothing changed, or a file beside a merged one, does not."""
    import folder_paths

    shards = tmp_path / "weights"
    shards.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (shards / name).write_bytes(b"1" * 8)
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text("{}", encoding="utf-8")
    (tmp_path / "t5" / "spiece.model").write_bytes(b"s")
    (tmp_path / "merged.safetensors").write_bytes(b"m" * 8)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "infinitystar", ([str(tmp_path)], {".safetensors"}))
    model, text = pack.loaders.InfinityStarModelLoader, pack.loaders.InfinityStarTextEncoderLoader

    def prints():
        return (model.fingerprint_inputs(model_name="weights", weight_dtype="auto"),
                model.fingerprint_inputs(model_name="merged.safetensors"), text.fingerprint_inputs(encoder_name="t5"))

    first = prints()
    assert prints() == first and len(set(first)) == 3
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")
    assert prints() == first
    (shards / "model-00002-of-00002.safetensors").write_bytes(b"2" * 9)  # a download replacing the demo shard
    second = prints()
    assert second[0] != first[0] and second[1:] == first[1:]
    (tmp_path / "t5" / "spiece.model").write_bytes(b"t")
    stat = (tmp_path / "t5" / "spiece.model").stat()
    os.utime(tmp_path / "t5" / "spiece.model", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same size
    assert prints()[2] != second[2]
    assert "not found" in model.fingerprint_inputs(model_name="gone")
