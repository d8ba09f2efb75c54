"""Encode and Interact Start fed a core VIDEO (Load Video) instead of Get Video Components' IMAGE batch: the same
tokens, bit for bit, while only the frames they use are decoded (core's Get Video Components holds every frame as
float32: 3.3 GB for 10 s of 720p30, and a peak of about 9.8 GiB while it builds them)."""
from __future__ import annotations

import tracemalloc
from fractions import Fraction

import numpy as np
import pytest
import torch
from node_kit import run

HEIGHT, WIDTH, FPS, SECONDS = 288, 512, 30, 7  # 210 frames: Encode keeps 81 of the first 5 s, Start of the last
OUT_FRAME = 192 * 336 * 3  # bytes of a 0.06M 16:9 output frame, the size the picks are held at (as read)


@pytest.fixture(scope="module")
def vae(pack, comfy_dirs):
    return run(pack.loaders.InfinityStarVAELoader, vae_name="infinitystar_videovae.pth", dtype="auto")[0]


@pytest.fixture(scope="module")
def video_nodes(comfy):
    from comfy_extras import nodes_video

    return nodes_video


@pytest.fixture(scope="module")
def clip(core, comfy_dirs):
    """A 7 s 30 fps mp4 in ComfyUI's input folder whose every frame differs (a wrong pick changes the tokens)."""
    rng = np.random.default_rng(4)
    base = np.repeat(np.repeat(rng.integers(0, 255, (HEIGHT // 8, WIDTH // 8 + FPS * SECONDS, 3)), 8, 0), 8, 1)
    frames = np.stack([base[:, 8 * i:8 * i + WIDTH] for i in range(FPS * SECONDS)]).astype(np.uint8)
    core("video_io").write_mp4(comfy_dirs["input"] / "seven_seconds.mp4", frames, fps=FPS)
    return "seven_seconds.mp4"


def _load(video_nodes, name):
    return run(video_nodes.LoadVideo, file=name)[0]


def _components(video_nodes, video):
    images, _, fps = run(video_nodes.GetVideoComponents, video=video)
    return images, fps


def _picked_peak(fn):
    """(result, peak bytes traced while it ran): numpy arrays are traced; torch tensors are not, so the guard below
    that the VIDEO is never decoded whole covers core's float32 decode."""
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _never_whole(monkeypatch, video):
    def whole():
        raise AssertionError("the VIDEO was decoded whole (get_components)")

    monkeypatch.setattr(video, "get_components", whole)


def test_encode_of_a_video_equals_its_image_batch_and_decodes_only_the_picks(pack, vae, clip, video_nodes,
                                                                              monkeypatch):
    """Load Video -> Encode.video gives Load Video -> Get Video Components -> Encode.images/fps's tokens; peak traced
    memory stays about the 81 picks as uint8 at the output's size, below the picks at the file's size."""
    settings = dict(vae=vae, resolution="0.06M", aspect_ratio="from input", seed=3)
    images, fps = _components(video_nodes, _load(video_nodes, clip))
    assert images.shape == (FPS * SECONDS, HEIGHT, WIDTH, 3) and fps == FPS
    expect = run(pack.video.InfinityStarEncode, images=images, fps=fps, **settings)[0]
    del images

    video = _load(video_nodes, clip)
    _never_whole(monkeypatch, video)
    got, peak = _picked_peak(lambda: run(pack.video.InfinityStarEncode, video=video, **settings)[0])
    assert got.frames == expect.frames == 81
    assert len(got.bits) == len(expect.bits) and all(torch.equal(a, b) for a, b in zip(got.bits, expect.bits))
    assert got.schedule().height * got.schedule().width * 3 == OUT_FRAME
    assert peak < 1.5 * 81 * OUT_FRAME, f"peak {peak / OUT_FRAME:.0f} output frames"
    assert peak < 81 * HEIGHT * WIDTH * 3


def test_interact_start_of_a_video_equals_its_image_batch(pack, vae, clip, video_nodes, monkeypatch):
    """The last 5 s (81 frames) of the file, read alone, start the same story as the whole IMAGE batch does."""
    settings = dict(vae=vae, resolution="0.06M", aspect_ratio="from input", seed=3)
    images, fps = _components(video_nodes, _load(video_nodes, clip))
    expect = run(pack.interact.InfinityStarInteractStart, images=images, fps=fps, **settings)[0]
    del images

    video = _load(video_nodes, clip)
    _never_whole(monkeypatch, video)
    got, peak = _picked_peak(lambda: run(pack.interact.InfinityStarInteractStart, video=video, **settings)[0])
    assert torch.equal(got.summed_codes, expect.summed_codes)
    assert peak < 1.5 * 81 * OUT_FRAME and peak < 81 * HEIGHT * WIDTH * 3


def test_a_video_from_tensors_is_read_through_its_components(pack, vae, core, tmp_path, monkeypatch):
    """A VIDEO that is no file (Create Video's VideoFromComponents) gives its components' frames at its rate; a
    BytesIO-backed VideoFromFile is read at the picks like a path. The frames reaching the tokenizer are compared
    (the encode itself is the one the tests above check)."""
    import io

    from comfy_api.latest import InputImpl, Types

    pipeline, seen = core("pipeline"), []
    monkeypatch.setattr(pipeline, "encode_video", lambda tokenizer, frames, *a, **k: seen.append(frames))
    frames = torch.rand(170, 48, 64, 3, generator=torch.Generator().manual_seed(2))  # 5.3 s at 32 fps
    settings = dict(vae=vae, resolution="0.06M", aspect_ratio="16:9", seed=1)

    def encoded(**inputs):
        run(pack.video.InfinityStarEncode, **inputs, **settings)
        return seen.pop()

    video = InputImpl.VideoFromComponents(Types.VideoComponents(images=frames, audio=None, frame_rate=Fraction(32)))
    assert pack.host.video_file(video) is None
    expect = encoded(images=frames, fps=32.0)
    assert len(expect) == 81 and np.array_equal(encoded(video=video), expect)

    path = core("video_io").write_mp4(tmp_path / "in_memory.mp4", frames, fps=32)
    from_memory = InputImpl.VideoFromFile(io.BytesIO(path.read_bytes()))
    assert pack.host.video_file(from_memory) is not None
    expect = encoded(images=from_memory.get_components().images, fps=32.0)
    _never_whole(monkeypatch, from_memory)
    assert len(expect) == 81 and np.array_equal(encoded(video=from_memory), expect)


def test_keep_the_last_seconds_encodes_the_video_s_end(pack, vae, clip, video_nodes, core, monkeypatch):
    """keep = last 5 s: the frames reaching the tokenizer are those of the file cut to its last 5 s (frames 60..209
    of the 7 s 30 fps clip, as an IMAGE batch with keep = all whole clips), from the VIDEO and from the whole IMAGE
    batch alike; last 10 s of a 7 s video is its one whole clip, the same frames; the default keeps the first 5 s."""
    pipeline, seen = core("pipeline"), []
    monkeypatch.setattr(pipeline, "encode_video", lambda tokenizer, frames, *a, **k: seen.append(frames) or "tokens")
    settings = dict(vae=vae, resolution="0.06M", aspect_ratio="from input", seed=3)
    images, fps = _components(video_nodes, _load(video_nodes, clip))

    def encoded(**inputs):
        run(pack.video.InfinityStarEncode, **inputs, **settings)
        return seen.pop()

    cut = encoded(images=images[2 * FPS:], fps=float(fps))
    assert len(cut) == 81
    assert np.array_equal(encoded(images=images, fps=float(fps), keep="last 5 s"), cut)
    assert np.array_equal(encoded(video=_load(video_nodes, clip), keep="last 5 s"), cut)
    assert np.array_equal(encoded(video=_load(video_nodes, clip), keep="last 10 s"), cut)
    first = encoded(images=images[:5 * FPS], fps=float(fps))
    assert np.array_equal(encoded(video=_load(video_nodes, clip)), first) and not np.array_equal(first, cut)
    assert pack.video.InfinityStarEncode.validate_inputs(keep="last 7 s").startswith("keep is 'last 7 s'")


def test_the_end_of_a_video_cut_short_is_read_up_to_its_last_decodable_frame(pack, vae, clip, video_nodes, core,
                                                                               comfy_dirs, monkeypatch, caplog):
    """An unfinished download (index first, its last packets missing or partial): Encode with keep = last 5 s and
    Interact Start take the last 5 s of what decodes, the frames the same decodable frames give as an IMAGE batch,
    and say so; it was refused as damaged."""
    from video_files import cut_short, decodable

    cut = cut_short(comfy_dirs["input"] / clip, comfy_dirs["input"] / "cut_short.mp4")
    images = torch.from_numpy(decodable(cut)).float() / 255
    listed = core("video_io").video_frame_count(cut)[0]
    assert 5 * FPS < len(images) < listed
    settings = dict(vae=vae, resolution="0.06M", aspect_ratio="from input", seed=3)

    pipeline, seen = core("pipeline"), []
    with monkeypatch.context() as patched:
        patched.setattr(pipeline, "encode_video", lambda tokenizer, frames, *a, **k: seen.append(frames) or "tokens")
        run(pack.video.InfinityStarEncode, images=images, fps=float(FPS), keep="last 5 s", **settings)
        with caplog.at_level("WARNING"):
            run(pack.video.InfinityStarEncode, video=_load(video_nodes, "cut_short.mp4"), keep="last 5 s", **settings)
    assert len(seen) == 2 and len(seen[0]) == 81 and np.array_equal(seen[1], seen[0])
    assert f"cut_short.mp4: its last {listed - len(images)} of the {listed} frames it lists cannot be decoded" in caplog.text

    expect = run(pack.interact.InfinityStarInteractStart, images=images, fps=float(FPS), **settings)[0]
    got = run(pack.interact.InfinityStarInteractStart, video=_load(video_nodes, "cut_short.mp4"), **settings)[0]
    assert torch.equal(got.summed_codes, expect.summed_codes)


def test_images_or_video_is_asked_for_before_anything_loads(pack, clip, video_nodes, core):
    """Neither or both inputs, and a video under 5 s, are refused with what to connect, the tokenizer untouched."""
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"vae.{name} used before the inputs were checked")

    settings = dict(vae=Untouchable(), resolution="0.06M", aspect_ratio="16:9", seed=0)
    video = _load(video_nodes, clip)
    for node, name in ((pack.video.InfinityStarEncode, "Encode"),
                       (pack.interact.InfinityStarInteractStart, "Interact Start")):
        with pytest.raises(ValueError, match=f"{name}: connect video \\(from Load Video\\) or images"):
            run(node, **settings)
        with pytest.raises(ValueError, match=f"{name}: connect either images or video, not both"):
            run(node, images=torch.zeros(1, 8, 8, 3), video=video, **settings)
    short = core("video_io").write_mp4(video_nodes.folder_paths.get_input_directory() + "/two_seconds.mp4",
                                       np.zeros((60, 32, 32, 3), np.uint8), fps=30)
    with pytest.raises(ValueError, match=r"Encode got 60 frames at 30 fps \(2.00 s\): give it one frame"):
        run(pack.video.InfinityStarEncode, video=_load(video_nodes, short.name), **settings)
    with pytest.raises(ValueError, match=r"Interact Start got 60 frames at 30 fps \(2.00 s\): a story starts"):
        run(pack.interact.InfinityStarInteractStart, video=_load(video_nodes, short.name), **settings)


def test_an_encode_the_memory_cannot_hold_is_refused_before_a_frame_is_read(pack, clip, video_nodes, core,
                                                                          monkeypatch, caplog):
    """Encode keeps every whole 5 s clip of its input: one that the machine's RAM cannot hold is refused with what
    to do before the tokenizer or a frame is touched (no OOM-killed ComfyUI); one above what is free now is warned
    about and encoded (the free figure misses caches some systems give back)."""
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"vae.{name} used before the memory was checked")

    def no_read(*_a, **_k):
        raise AssertionError("frames were read")

    pipeline = core("pipeline")
    need = pipeline.encode_host_memory(81, 192, 336)  # the clip's one 5 s clip at 0.06M, any 16:9-sized template
    monkeypatch.setattr(core("video_io"), "read_frames", no_read)
    monkeypatch.setattr(pack.host, "free_ram", lambda: need // 3)
    monkeypatch.setattr(pack.host, "total_ram", lambda: need // 2)
    # one clip: the advice is not keep = last 5 s, which would change nothing
    with pytest.raises(ValueError, match=r"Encode: the 1 whole 5 s clip it keeps of this 7 s video \(keep = all "
                                         r"whole clips\) need about 0\.0 GB of system memory at 0.06M, more than "
                                         r"this machine's [\d.]+ GB: choose a lower resolution\.$"):
        run(pack.video.InfinityStarEncode, vae=Untouchable(), video=_load(video_nodes, clip), resolution="0.06M",
            aspect_ratio="from input", seed=0)
    monkeypatch.setattr(pack.host, "total_ram", lambda: 4 * need)
    with caplog.at_level("WARNING"), pytest.raises(AssertionError, match="frames were read"):
        run(pack.video.InfinityStarEncode, vae=Untouchable(), video=_load(video_nodes, clip), resolution="0.06M",
            aspect_ratio="from input", seed=0)
    assert "the system may swap" in caplog.text
    caplog.clear()
    monkeypatch.setattr(pack.host, "free_ram", lambda: 2 * need)
    with caplog.at_level("WARNING"), pytest.raises(AssertionError, match="frames were read"):
        run(pack.video.InfinityStarEncode, vae=Untouchable(), video=_load(video_nodes, clip), resolution="0.06M",
            aspect_ratio="from input", seed=0)
    assert "swap" not in caplog.text
    caplog.clear()  # what to do follows keep: the video's length no longer matters once only its end is kept
    monkeypatch.setattr(pack.host, "free_ram", lambda: 0)
    monkeypatch.setattr(pack.host, "total_ram", lambda: 0)
    ten = core("video_io").write_mp4(video_nodes.folder_paths.get_input_directory() + "/ten_seconds.mp4",
                                     np.zeros((168, 32, 32, 3), np.uint8), fps=16)  # 10.5 s: 2 whole clips
    for keep, fix in (("all whole clips", r"set keep to 'last 5 s' \(continuing a video needs only its last clip\), "
                                          r"give it a shorter video or choose a lower resolution"),
                      ("last 10 s", r"set keep to 'last 5 s' or choose a lower resolution"),
                      ("last 5 s", r"choose a lower resolution")):
        clips = "the 1 whole 5 s clip" if keep == "last 5 s" else "the 2 whole 5 s clips"
        with pytest.raises(ValueError, match=r"Encode: %s it keeps of this 10 s video \(keep = %s\) .*: %s\.$"
                                             % (clips, keep, fix)):
            run(pack.video.InfinityStarEncode, vae=Untouchable(), video=_load(video_nodes, ten.name),
                resolution="0.06M", aspect_ratio="from input", seed=0, keep=keep)
