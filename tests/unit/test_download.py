"""Downloading and finding model files, offline: local-folder copies and a stand-in for the hub client."""
import shutil

import pytest

from infinitystar import download as D


def test_patterns_select_one_variant():
    assert D.allow_patterns("480p") == ["infinitystar_8b_480p_weights/*", "infinitystar_videovae.pth",
                                         "text_encoder/flan-t5-xl-official/*"]
    assert D.allow_patterns("720p", ["vae"]) == ["infinitystar_videovae.pth"]
    with pytest.raises(ValueError, match="variant"):
        D.allow_patterns("1080p")
    with pytest.raises(ValueError, match="components"):
        D.allow_patterns("720p", ["lora"])


def test_interact_variant_fetches_the_folder_the_official_script_loads(tiny_models, tmp_path):
    assert D.allow_patterns("interact", ["transformer"]) == ["InfinityStarInteract_24K_iters/*"]
    dest = tmp_path / "models"
    paths = D.download_models(dest, "interact", ["transformer"], local_source=tiny_models["root"], progress=False)
    assert paths["transformer"] == dest / "InfinityStarInteract_24K_iters"
    assert (paths["transformer"] / "model.safetensors.index.json").is_file()
    assert not (dest / "infinitystar_8b_480p_weights").exists()
    from infinitystar.checkpoint import detect_variant

    assert detect_variant(paths["transformer"]) == "interact"
    assert detect_variant(dest / "x.gguf", {"variant": "interact"}) == "interact"


def test_find_models_says_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m infinitystar download --variant 480p --dest"):
        D.find_models(tmp_path, "480p")
    folder = tmp_path / "infinitystar_8b_480p_weights"  # a folder the loader cannot read counts as missing
    folder.mkdir()
    (folder / "checkpoint.pth").write_bytes(b"not a shard")
    with pytest.raises(FileNotFoundError, match="missing transformer"):
        D.find_models(tmp_path, "480p", components=["transformer"])


def test_local_source_copies_only_the_variant(tiny_models, tmp_path):
    dest = tmp_path / "models"
    paths = D.download_models(dest, "480p", local_source=tiny_models["root"], progress=False)
    assert paths == D.find_models(dest, "480p")
    assert not (dest / "infinitystar_8b_720p_weights").exists()
    assert (dest / "infinitystar_8b_480p_weights" / "model.safetensors.index.json").is_file()
    assert (dest / "text_encoder/flan-t5-xl-official/spiece.model").is_file()
    # resumable: a complete file is not copied again, a partial one is replaced
    vae = dest / "infinitystar_videovae.pth"
    vae.write_bytes(b"partial")
    before = (dest / "infinitystar_8b_480p_weights/model.safetensors.index.json").stat().st_mtime_ns
    D.download_models(dest, "480p", local_source=tiny_models["root"], progress=False)
    assert vae.stat().st_size == tiny_models["vae"].stat().st_size
    assert (dest / "infinitystar_8b_480p_weights/model.safetensors.index.json").stat().st_mtime_ns == before


def test_hub_path_passes_only_the_variant_patterns(tiny_models, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, *, local_dir, allow_patterns, **kwargs):
        calls.append((repo_id, allow_patterns))
        D._copy_local(tiny_models["root"], D.Path(local_dir), ("transformer", "vae"), allow_patterns, progress=False)
        return local_dir

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    paths = D.download_models(tmp_path, "720p", components=("transformer", "vae"), progress=False)
    assert calls == [(D.REPO_ID, ["infinitystar_8b_720p_weights/*", "infinitystar_videovae.pth"])]
    assert set(paths) == {"transformer", "vae"} and paths["transformer"].is_dir()


def test_files_the_hub_does_not_hold_are_named(tmp_path, monkeypatch):
    """A download that brings nothing for a component (the repo has no such files) says which and, for the
    interact weights, whose hub place is unconfirmed, where to put the folder by hand."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, *, local_dir, **kw: local_dir)
    with pytest.raises(FileNotFoundError, match="holds no files matching InfinityStarInteract_24K_iters/.*put it in"):
        D.download_models(tmp_path, "interact", components=("transformer",), progress=False)
    with pytest.raises(FileNotFoundError, match=r"holds no files matching infinitystar_videovae.pth \(the 720p vae\)\.$"):
        D.download_models(tmp_path, "720p", components=("vae",), progress=False)


def test_offline_mode_is_clear(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set") as info:
        D.download_models(tmp_path, "720p", progress=False)
    assert "--local-source FOLDER" in str(info.value) and "Download them with" not in str(info.value)
    for name in ("infinitystar_8b_720p_weights", "text_encoder"):
        shutil.copytree(tiny_models["root"] / name, tmp_path / name)
    shutil.copy(tiny_models["vae"], tmp_path)
    assert D.download_models(tmp_path, "720p", progress=False)["vae"].is_file()


def test_a_local_copy_says_which_files_it_replaces(tiny_models, tmp_path, caplog):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "infinitystar_videovae.pth").write_bytes(b"an older, smaller file")
    with caplog.at_level("WARNING", logger="infinitystar.download"):
        D.download_models(dest, "720p", components=("vae",), progress=False, local_source=tiny_models["root"])
    assert "replacing 1 file(s)" in caplog.text and "infinitystar_videovae.pth" in caplog.text
    assert (dest / "infinitystar_videovae.pth").stat().st_size == tiny_models["vae"].stat().st_size


def test_a_local_copy_without_replace_leaves_existing_files(tiny_models, tmp_path):
    """replace=False (the Download node, whose source a shared workflow may name): a file of another size already in
    place is refused, naming it, and nothing is copied."""
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "infinitystar_videovae.pth").write_bytes(b"the user's own file")
    with pytest.raises(FileExistsError, match=r"already holds 1 of these file\(s\) .*infinitystar_videovae.pth.*"
                                              "nothing copied"):
        D.download_models(dest, "720p", components=("vae", "text_encoder"), progress=False,
                          local_source=tiny_models["root"], replace=False)
    assert (dest / "infinitystar_videovae.pth").read_bytes() == b"the user's own file"
    assert not (dest / "text_encoder").exists()


def test_a_damaged_or_partial_local_source_copies_nothing(tiny_models, tmp_path):
    """A mirror with a truncated shard (sizes alone matched it to itself) or without a component is refused before
    a byte is copied, naming the file or the component, instead of a copy that fails at load time."""
    source = tmp_path / "mirror"
    shutil.copytree(tiny_models["root"], source)
    shard = sorted((source / "infinitystar_8b_720p_weights").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    dest = tmp_path / "dest"
    with pytest.raises(ValueError, match=f"local source damaged, nothing copied: {shard}: truncated"):
        D.download_models(dest, "720p", progress=False, local_source=source)
    shutil.rmtree(source / "infinitystar_8b_720p_weights")
    with pytest.raises(FileNotFoundError, match=r"holds no transformer \(infinitystar_8b_720p_weights/\*\)"):
        D.download_models(dest, "720p", progress=False, local_source=source)
    assert not dest.exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file; give the models folder"):
        D.download_models(tmp_path / "afile", "720p", progress=False, local_source=source)


@pytest.mark.parametrize("damage, says", [
    ("pth", "infinitystar_videovae.pth: truncated"),
    ("shard", "lacks the shards its index names"),
    ("config", r"holds no text_encoder config"),
    ("tokenizer", "has no tokenizer"),
])
def test_a_local_source_is_checked_whole_before_copying(tiny_models, tmp_path, damage, says):
    """A truncated tokenizer .pth, an index naming a shard the folder lacks, a text encoder without its config or
    tokenizer: refused before anything is copied (they were copied, and failed at load time)."""
    source = tmp_path / "mirror"
    shutil.copytree(tiny_models["root"], source)
    if damage == "pth":
        pth = source / "infinitystar_videovae.pth"
        pth.write_bytes(pth.read_bytes()[:-200])
    elif damage == "shard":
        sorted((source / "infinitystar_8b_720p_weights").glob("*.safetensors"))[-1].unlink()
    elif damage == "config":
        (source / "text_encoder" / "flan-t5-xl-official" / "config.json").unlink()
    else:
        for name in ("spiece.model", "tokenizer.json"):
            (source / "text_encoder" / "flan-t5-xl-official" / name).unlink(missing_ok=True)
    dest = tmp_path / "dest"
    with pytest.raises((ValueError, FileNotFoundError), match=says):
        D.download_models(dest, "720p", progress=False, local_source=source)
    assert not dest.exists()


def test_an_unreachable_hub_points_to_the_local_source(tmp_path, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise D._unreachable()[0]("An error happened while trying to locate the files on the Hub.")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(RuntimeError, match="cannot reach huggingface.co/.*--local-source FOLDER"):
        D.download_models(tmp_path, "720p", progress=False)


def test_a_local_copy_reports_per_chunk_and_a_raising_callback_stops_it(tiny_models, tmp_path, monkeypatch):
    """Progress (and a host's cancel) per file and per copied chunk, not once per component: the bytes grow to
    the total; an exception from the callback stops the copy, keeps the files copied whole and leaves no partial
    file; a second copy then completes the rest."""
    monkeypatch.setattr(D, "COPY_CHUNK", 4096)
    seen = []
    dest = tmp_path / "a"
    D.download_models(dest, "720p", ("transformer",), progress=False, local_source=tiny_models["root"],
                      callback=lambda done, total: seen.append((done, total)))
    files = [p for p in (dest / "infinitystar_8b_720p_weights").iterdir()]
    total = sum(p.stat().st_size for p in files)
    assert {t for _, t in seen} == {total} and seen[-1][0] == total
    assert all(a <= b for (a, _), (b, _) in zip(seen, seen[1:]))
    assert len(seen) > len(files) + 1 and len({d for d, _ in seen}) > len(files)  # more than one report per file

    class Cancelled(Exception):
        pass

    def cancel(done, total):
        if done > total // 2:
            raise Cancelled

    dest = tmp_path / "b"
    with pytest.raises(Cancelled):
        D.download_models(dest, "720p", ("transformer",), progress=False, local_source=tiny_models["root"],
                          callback=cancel)
    left = sorted(p.name for p in (dest / "infinitystar_8b_720p_weights").iterdir())
    assert left and not any(name.endswith(".incomplete") for name in left) and len(left) < len(files)
    D.download_models(dest, "720p", ("transformer",), progress=False, local_source=tiny_models["root"])
    assert len(list((dest / "infinitystar_8b_720p_weights").iterdir())) == len(files)


def test_hub_download_reports_through_the_callback_and_a_raising_callback_stops_it(tmp_path, monkeypatch):
    """snapshot_download gets a tqdm class whose bars call back: bytes once a bytes bar reports (files before), and
    an exception from the callback (a host's cancel) comes out of download_models as itself, not as 'cannot reach'."""
    import huggingface_hub

    seen = []

    def fake_snapshot_download(repo_id, *, local_dir, tqdm_class, **kwargs):
        files = tqdm_class(total=2, unit="it", disable=True)
        files.update(1)  # reported: no bytes bar yet
        received = tqdm_class(total=0, unit="B", disable=True)
        received.total = 100
        received.update(40)
        files.update(1)  # left out: bytes are reported now
        received.update(60)
        D.model_paths(local_dir, "720p")["vae"].write_bytes(b"x")
        return local_dir

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    D.download_models(tmp_path, "720p", components=("vae",), progress=False,
                      callback=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 2), (40, 100), (100, 100)]

    class Cancel(Exception):
        pass

    def cancel(done, total):
        raise Cancel

    with pytest.raises(Cancel):
        D.download_models(tmp_path / "again", "720p", components=("vae",), progress=False, callback=cancel)


def test_a_cancel_stops_every_download_thread_and_one_bar_is_reported():
    """Downloads run on several threads sharing the bytes bar: a cancel raised once (ComfyUI clears its flag when it
    raises) stops every thread at its next update; a second bytes bar (huggingface_hub's reconstruction bar) and the
    files bar are not mixed into the one reported."""
    import threading
    import time

    seen, raised = [], []

    class Cancel(Exception):
        pass

    def callback(done, total):
        seen.append((done, total))
        if done >= 50 and not raised:
            raised.append(True)
            raise Cancel

    bar_class = D.reporting_tqdm(callback)
    files = bar_class(total=4, unit="it", disable=True)
    received = bar_class(total=400, unit="B", disable=True)
    rebuilt = bar_class(total=999, unit="B", disable=True)
    files.update(0)
    received.update(1)
    rebuilt.update(7)  # not reported: the first bytes bar is
    counts, errors = [0] * 4, []

    def download(slot):
        try:
            for _ in range(100):
                received.update(1)
                counts[slot] += 1
                time.sleep(0.001)
        except Cancel as exc:
            errors.append(exc)

    threads = [threading.Thread(target=download, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 4 and all(c < 100 for c in counts), counts  # every thread stopped early
    assert all(total in (4, 400) for _, total in seen) and (0, 4) in seen and not any(t == 999 for _, t in seen)
    assert [d for d, t in seen if t == 400] == sorted(d for d, t in seen if t == 400)  # counted under the lock


def _free(monkeypatch, nbytes):
    import collections
    import shutil as sh

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda path: usage(10**13, 0, nbytes))


def test_a_local_copy_the_disk_cannot_hold_copies_nothing(tiny_models, tmp_path, monkeypatch):
    dest = tmp_path / "dest"
    _free(monkeypatch, 1000)
    with pytest.raises(OSError, match=r"copying 0.0 GB into .*dest needs more than the 0.0 GB free on that disk; "
                                      "nothing copied"):
        D.download_models(dest, "720p", components=("vae",), progress=False, local_source=tiny_models["root"])
    assert not (dest / D.VAE_FILE).exists()
    _free(monkeypatch, 10**12)
    D.download_models(dest, "720p", components=("vae",), progress=False, local_source=tiny_models["root"])
    assert (dest / D.VAE_FILE).is_file()


def test_a_hub_download_the_disk_cannot_hold_is_warned_before_it_starts(tmp_path, monkeypatch, caplog):
    """The hub's sizes are not asked for; the published ones are near enough to warn (not refuse). What is already
    there counts."""
    import huggingface_hub

    started = []

    def fake_snapshot_download(repo_id, **kwargs):
        started.append(caplog.text)
        (tmp_path / D.VAE_FILE).write_bytes(b"x")
        return str(tmp_path)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    _free(monkeypatch, 20 * 10**9)
    with caplog.at_level("WARNING", logger=D.__name__):
        with pytest.raises(FileNotFoundError):  # the fake brings no transformer
            D.download_models(tmp_path, "720p", components=("transformer", "vae"), progress=False)
    assert len(started) == 1 and "about 35.9 GB are still to download" in started[0]
    assert "only 20.0 GB are free" in started[0]
    caplog.clear()
    (tmp_path / D.TRANSFORMER_DIRS["720p"]).mkdir()
    with open(tmp_path / D.TRANSFORMER_DIRS["720p"] / "model-00001-of-00002.safetensors", "wb") as f:
        f.truncate(30 * 10**9)  # sparse: a resumed download's first part
    with caplog.at_level("WARNING", logger=D.__name__):
        D.download_models(tmp_path, "720p", components=("transformer",), progress=False)
    assert "still to download" not in caplog.text  # 5.2 GB to go, 20 GB free
