"""Files that no parser can judge rightly are said for what they are (fault-injection audit): a weight file another
download tool has not finished (whole-size under its final name, a marker beside it), a Git LFS pointer, a page
saved as a .pth, a file the user may not read, a tokens path that is a folder, a cut sentencepiece vocabulary, a
video damaged in the middle of its data."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from infinitystar import checkpoint_files
from infinitystar import download as D
from infinitystar.checkpoint import load_tokenizer, load_transformer
from infinitystar.tiny import SHARDS

SHARD = f"model-{SHARDS:05d}-of-{SHARDS:05d}.safetensors"  # the tiny set's last shard


@pytest.fixture
def weights(tiny_models, tmp_path):
    folder = tmp_path / "infinitystar_8b_720p_weights"
    shutil.copytree(tiny_models["transformer_720p"], folder)
    return folder


@pytest.mark.parametrize("marker", checkpoint_files.UNFINISHED_MARKERS)
def test_a_shard_another_tool_is_still_downloading_is_refused(weights, marker):
    """aria2c preallocates: the shard has its full size, its tail unwritten, and NAME.aria2 beside it."""
    load_transformer(weights)  # whole, it loads
    (weights / (SHARD + marker)).write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{SHARD}: an unfinished download \({SHARD}{marker} lies beside it"):
        load_transformer(weights)


def test_a_local_copy_neither_takes_nor_skips_unfinished_downloads(tiny_models, weights, tmp_path):
    source = weights.parent
    shutil.copy(tiny_models["vae"], source / "infinitystar_videovae.pth")
    (weights / (SHARD + ".aria2")).write_bytes(b"")
    dest = tmp_path / "dest"
    with pytest.raises(ValueError, match=r"local source damaged, nothing copied: .*an unfinished download"):
        D.download_models(dest, "720p", components=("transformer",), progress=False, local_source=source)
    assert not dest.exists() or not any(dest.rglob("*.safetensors"))
    (weights / (SHARD + ".aria2")).unlink()
    # the same name in the destination, whole-size but another tool's unfinished download: not skipped as complete
    shutil.copytree(weights, dest / weights.name)
    (dest / weights.name / (SHARD + ".aria2")).write_bytes(b"")
    with pytest.raises(FileExistsError, match=rf"unfinished downloads of another tool: {weights.name}/{SHARD}"):
        D.download_models(dest, "720p", components=("transformer",), progress=False, local_source=source)
    (dest / weights.name / (SHARD + ".aria2")).unlink()  # once that tool is done, the copy finds everything in place
    D.download_models(dest, "720p", components=("transformer",), progress=False, local_source=source)


def test_a_git_lfs_pointer_is_named(weights, tmp_path):
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 735000000\n"
    (weights / SHARD).write_bytes(pointer)
    with pytest.raises(ValueError, match=rf"{SHARD} \(\d+ bytes\) is a Git LFS pointer.*git lfs pull"):
        load_transformer(weights)
    vae = tmp_path / "infinitystar_videovae.pth"
    vae.write_bytes(pointer)
    with pytest.raises(ValueError, match="is a Git LFS pointer"):
        load_tokenizer(vae)


def test_a_pth_that_is_no_checkpoint_says_so_without_torchs_advice(tmp_path):
    page = tmp_path / "infinitystar_videovae.pth"
    page.write_bytes(b"<!DOCTYPE html><html><body>Access denied</body></html>")
    with pytest.raises(ValueError, match=r"is not a PyTorch checkpoint \(it starts with b'<!DOCTYPE") as err:
        load_tokenizer(page)
    assert "weights_only" not in str(err.value)


def _refuse_opening(monkeypatch, endings: tuple[str, ...]) -> None:
    """open() of a file whose name ends in one of ``endings`` fails as a file the user may not read."""
    import builtins

    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if str(file).endswith(endings):
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)


def test_a_file_the_user_may_not_read_is_not_called_damaged(tiny_models, weights, monkeypatch):
    """As root a chmod does not bite, so the refusal is simulated where the file is opened."""
    _refuse_opening(monkeypatch, (SHARD, ".pth"))
    with pytest.raises(PermissionError, match=rf"{SHARD}: no permission to read it \(Permission denied\)"):
        load_transformer(weights)
    with pytest.raises(PermissionError, match="no permission to read it"):
        load_tokenizer(tiny_models["vae"])


def test_an_image_or_video_the_user_may_not_read_is_not_called_damaged(tmp_path, monkeypatch):
    from infinitystar.video_io import read_image, video_frame_count, write_mp4, write_png

    write_png(tmp_path / "i.png", np.zeros((8, 8, 3), np.uint8))
    write_mp4(tmp_path / "v.mp4", np.zeros((3, 16, 16, 3), np.uint8))
    _refuse_opening(monkeypatch, (".png", ".mp4"))
    with pytest.raises(PermissionError, match=r"i.png: no permission to read this image"):
        read_image(tmp_path / "i.png")
    with pytest.raises(PermissionError, match=r"v.mp4: no permission to read this video"):
        video_frame_count(tmp_path / "v.mp4")


def test_a_tokens_path_that_is_a_folder_says_so(tmp_path):
    from infinitystar.pipeline import Tokens

    with pytest.raises(IsADirectoryError, match="is a folder; give a tokens .safetensors file"):
        Tokens.load(tmp_path)


def test_a_cut_sentencepiece_vocabulary_is_said_damaged(tiny_models, tmp_path):
    from infinitystar.text import TextEncoder

    folder = tmp_path / "flan-t5-xl-official"
    shutil.copytree(tiny_models["text_encoder"], folder)
    (folder / "tokenizer.json").unlink(missing_ok=True)  # spiece.model is then the only vocabulary
    TextEncoder.from_folder(folder, dtype=__import__("torch").float32)  # whole, it loads
    data = (folder / "spiece.model").read_bytes()
    (folder / "spiece.model").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"spiece.model \([\d,]+ bytes\) cannot be read by sentencepiece .*damaged or "
                                         "incomplete") as err:
        TextEncoder.from_folder(folder)
    assert "tiktoken" not in str(err.value)


def test_a_video_damaged_mid_file_names_the_file_and_what_to_do(tmp_path):
    """Which bytes break which frame depends on the encoder; of a few spans overwritten in the data, those FFmpeg
    cannot decode must give our message (file, frames decoded, advice), never FFmpeg's bare error."""
    from infinitystar.video_io import read_frames, video_frame_count, write_mp4

    frames = (np.random.default_rng(0).random((40, 64, 96, 3)) * 255).astype(np.uint8)
    write_mp4(tmp_path / "a.mp4", frames)
    whole = (tmp_path / "a.mp4").read_bytes()
    messages = []
    for share in (0.4, 0.5, 0.6, 0.7, 0.8):
        damaged = bytearray(whole)
        start = int(len(whole) * share)
        damaged[start:start + 4000] = b"\xff" * 4000
        path = tmp_path / f"damaged_{share}.mp4"
        path.write_bytes(bytes(damaged))
        try:
            count, _ = video_frame_count(path)
            read_frames(path, np.arange(count))
        except ValueError as exc:
            messages.append(str(exc))
    assert messages, "no span damaged the video: the test needs other spans"
    for message in messages:
        assert "damaged" in message and "damaged_" in message and "Errno" not in message, message
