"""What the nodes tell the user on the node itself (ComfyUI's progress text), and the start-image choices that
avoid the messages: a crop, a batch given as a start image, a decode that runs out of memory."""
from __future__ import annotations

import logging
import sys
import threading
import types

import pytest
import torch
from node_kit import SMALL, run


class Server:
    """Stands in for ComfyUI's PromptServer.instance: records the text sent to each node."""

    def __init__(self):
        self.texts = []

    def send_progress_text(self, text, node_id, sid=None):
        self.texts.append((node_id, text))

    def on(self, node_id):
        return [text for nid, text in self.texts if nid == node_id]


@pytest.fixture
def server(comfy, monkeypatch):
    """ComfyUI's ``server`` module as main.py leaves it imported, with a recording PromptServer.instance."""
    recorder = Server()
    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(
        instance=recorder)))
    return recorder


def test_a_warning_while_a_node_runs_is_shown_on_that_node(pack, core, server):
    """Records of the pack's loggers at WARNING and above, on the node's thread, reach the node; the latest few are
    shown together; nothing stays attached after the node returns; other threads' records are not the node's."""
    host = pack.host
    log = logging.getLogger(core("pipeline").__name__)  # a library module's logger
    before = list(logging.getLogger(host._PACKAGE_LOGGER).handlers)
    with host.node_messages("12") as shown:
        log.info("routine detail")
        log.warning("first %s", "caution")
        other = threading.Thread(target=log.warning, args=("another prompt's warning",))
        other.start()
        other.join()
        for i in range(host.MAX_NODE_MESSAGES + 1):
            log.warning("caution %d", i)
    assert shown[0] == "first caution" and len(shown) == host.MAX_NODE_MESSAGES + 2
    assert all("another prompt" not in t for t in shown)
    last = server.on("12")[-1].split("\n")
    assert last == shown[-host.MAX_NODE_MESSAGES:] and "first caution" not in last
    assert logging.getLogger(host._PACKAGE_LOGGER).handlers == before
    log.warning("after the node")
    assert all("after the node" not in t for t in server.on("12"))


def test_sampler_crop_warning_reaches_the_node_and_from_start_image_avoids_it(pack, loaded, server):
    """A portrait start image at 16:9 loses most of itself: the node says so. 'from start image' takes the template
    nearest the image (portrait tokens, no crop message)."""
    portrait = torch.rand(1, 192, 108, 3, generator=torch.Generator().manual_seed(1))
    common = dict(model=loaded["model"], positive=loaded["cond"], duration="5 s", seed=0, start_image=portrait,
                  vae=loaded["vae"], **{**SMALL, "aspect_ratio": "16:9"})
    wide = run(pack.sampling.InfinityStarSampler, _node_id="5", **common)[0]
    assert wide.h_div_w < 1
    assert any("center-cropped" in t and "from start image" in t for t in server.on("5"))
    tall = run(pack.sampling.InfinityStarSampler, _node_id="6", **{**common, "aspect_ratio": "from start image"})[0]
    assert tall.h_div_w > 1.5, tall.h_div_w
    assert not any("center-cropped" in t for t in server.on("6"))
    without = run(pack.sampling.InfinityStarSampler, _node_id="7",
                  **{**common, "aspect_ratio": "from start image", "start_image": None, "vae": None})[0]
    assert abs(without.h_div_w - 9 / 16) < 0.01 and any("16:9" in t for t in server.on("7"))
    assert pack.sampling.InfinityStarSampler.validate_inputs(aspect_ratio="from start image") is True


def test_start_frame_picks_the_first_or_last_frame_of_a_batch(pack, loaded, core, server, monkeypatch):
    """A batch as start_image: 'first' (default) says it used frame 0 and how to continue a clip; 'last' encodes
    the batch's last frame."""
    pipeline = core("pipeline")
    seen, real = [], pipeline.encode_image
    monkeypatch.setattr(pipeline, "encode_image", lambda tokenizer, image, *a, **k: seen.append(image.copy())
                        or real(tokenizer, image, *a, **k))
    clip = torch.zeros(5, 64, 112, 3)
    clip[-1] = 1.0  # black frames, then a white last one
    common = dict(model=loaded["model"], positive=loaded["cond"], duration="5 s", seed=0, start_image=clip,
                  vae=loaded["vae"], **SMALL)
    run(pack.sampling.InfinityStarSampler, _node_id="8", **common)
    run(pack.sampling.InfinityStarSampler, _node_id="9", start_frame="last", **common)
    assert seen[0].max() == 0 and seen[1].min() == 255
    assert any("batch of 5 frames" in t and "'last'" in t for t in server.on("8"))
    assert not any("batch of" in t for t in server.on("9"))
    assert "start_frame" in pack.sampling.InfinityStarSampler.validate_inputs(start_frame="middle")


def test_decode_out_of_memory_retries_tiled_and_says_so(pack, loaded, core, server, monkeypatch):
    """Decode out of memory retries with spatial tiles (as ComfyUI's VAE decode does) and says so on the node; with
    tiled already on, and for other errors, the error stands."""
    pipeline = core("pipeline")
    tokens = run(pack.sampling.InfinityStarSampler, model=loaded["model"], positive=loaded["cond"], duration="image",
                 seed=0, **SMALL)[0]
    expect = run(pack.video.InfinityStarDecode, vae=loaded["vae"], tokens=tokens, tiled=True)[0]
    calls, real = [], pipeline.decode

    def failing(tokenizer, tokens, *, tiled, **kw):
        calls.append(tiled)
        if not tiled:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(tokenizer, tokens, tiled=tiled, **kw)

    monkeypatch.setattr(pipeline, "decode", failing)
    images, fps = run(pack.video.InfinityStarDecode, _node_id="3", vae=loaded["vae"], tokens=tokens, tiled=False)
    assert calls == [False, True] and torch.equal(images, expect) and fps == 16.0
    assert any("out of memory" in t and "tiled" in t for t in server.on("3"))
    monkeypatch.setattr(pipeline, "decode", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("again")))
    with pytest.raises(torch.OutOfMemoryError):
        run(pack.video.InfinityStarDecode, vae=loaded["vae"], tokens=tokens, tiled=True)
    monkeypatch.setattr(pipeline, "decode", lambda *a, **k: (_ for _ in ()).throw(ValueError("not memory")))
    with pytest.raises(ValueError, match="not memory"):
        run(pack.video.InfinityStarDecode, vae=loaded["vae"], tokens=tokens, tiled=False)


def test_every_node_shows_its_warnings(pack):
    """Each node runs inside node_messages and declares the unique_id it needs for that (a node added later without
    them would report only to the server log)."""
    from comfy_api.latest import io

    for node in pack.NODES:
        execute = node.__dict__["execute"].__func__
        assert getattr(execute, "shows_warnings", False), f"{node.__name__}.execute lacks host.shows_warnings"
        assert io.Hidden.unique_id in (node.define_schema().hidden or []), f"{node.__name__} lacks hidden unique_id"
