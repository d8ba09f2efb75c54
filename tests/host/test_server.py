"""End to end: the real ComfyUI server (``main.py --cpu`` on 127.0.0.1, a free port) loads this repository as a
custom-node pack through an extra-model-paths file, runs an API prompt on the tiny checkpoints and writes an mp4;
progress arrives over the websocket and ``POST /interrupt`` stops a run. Needs COMFYUI_PATH (see conftest.py)."""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest
from comfy_server import PACK_FOLDER, Server, running_server

RUN_TIMEOUT = 600


@pytest.fixture(scope="module")
def server(comfy, tiny_models, tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("comfy_server"), tiny_models["root"], http_timeout=30) as srv:
        yield srv


def _prompt(duration: str, seed: int = 1) -> dict:
    """API-format graph: loaders -> encode -> sample -> decode -> CreateVideo -> SaveVideo."""
    return {
        "1": {"class_type": "InfinityStarModelLoader",
              "inputs": {"model_name": "infinitystar_8b_480p_weights", "weight_dtype": "default",
                         "compute_dtype": "auto", "attention": "auto"}},
        "2": {"class_type": "InfinityStarTextEncoderLoader",
              "inputs": {"encoder_name": "text_encoder/flan-t5-xl-official", "dtype": "auto"}},
        "3": {"class_type": "InfinityStarVAELoader", "inputs": {"vae_name": "infinitystar_videovae.pth", "dtype": "auto"}},
        "4": {"class_type": "InfinityStarTextEncode",
              "inputs": {"text_encoder": ["2", 0], "prompt": "a dog running on a beach at sunset",
                         "negative_prompt": "", "duration_tag": "auto"}},
        "5": {"class_type": "InfinityStarSampler",
              "inputs": {"model": ["1", 0], "positive": ["4", 0], "resolution": "0.06M", "aspect_ratio": "16:9",
                         "duration": duration, "seed": seed, "guidance_scale": 34.0, "apg_threshold": 0.05,
                         "use_plain_cfg": False, "tau_video": 0.4, "tau_image": 1.0}},
        "6": {"class_type": "InfinityStarDecode", "inputs": {"vae": ["3", 0], "tokens": ["5", 0], "tiled": False}},
        "7": {"class_type": "CreateVideo", "inputs": {"images": ["6", 0], "fps": ["6", 1]}},
        "8": {"class_type": "SaveVideo",
              "inputs": {"video": ["7", 0], "filename_prefix": "video/infinitystar", "format": "auto",
                         "codec": "auto"}},
    }


def _connect(server: Server):
    websocket = pytest.importorskip("websocket", reason="websocket-client is not installed")
    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(server.url.replace("http", "ws") + f"/ws?clientId={client_id}", timeout=RUN_TIMEOUT)
    return ws, client_id


def _messages(ws, prompt_id: str, until: set[str]):
    """Yield websocket JSON messages of ``prompt_id`` until one whose type is in ``until``."""
    while True:
        raw = ws.recv()
        if isinstance(raw, bytes):
            continue  # binary preview frames
        msg = json.loads(raw)
        data = msg.get("data", {})
        if data.get("prompt_id") not in (None, prompt_id):
            continue
        yield msg
        if msg["type"] in until:
            return


def _history(server: Server, prompt_id: str) -> dict:
    for _ in range(50):
        hist = server.get(f"/history/{prompt_id}")
        if prompt_id in hist:
            return hist[prompt_id]
        time.sleep(0.2)
    raise AssertionError(f"no history for {prompt_id}")


def test_pack_registers_its_nodes(server):
    info = server.get("/object_info")
    ours = {k: v for k, v in info.items() if k.startswith("InfinityStar")}
    assert len(ours) == 13, sorted(ours)
    assert all(v["category"].startswith("InfinityStar/") and v["python_module"].endswith(PACK_FOLDER)
               for v in ours.values())
    spec = info["InfinityStarModelLoader"]["input"]["required"]["model_name"]
    options = spec[1]["options"] if isinstance(spec[1], dict) and "options" in spec[1] else spec[0]
    assert "infinitystar_8b_480p_weights" in options and "infinitystar_videovae.pth" not in options
    assert "InfinityStarInteract_24K_iters" in options


def test_help_pages_are_served_where_the_frontend_looks(server):
    """The frontend's node help panel fetches ``/extensions/<pack>/docs/<node>.md``, the pack being the second part of
    the node's ``python_module`` (``custom_nodes.<folder>``)."""
    import urllib.request

    ours = {k: v for k, v in server.get("/object_info").items() if k.startswith("InfinityStar")}
    assert ours
    for node, info in ours.items():
        prefix, pack = info["python_module"].split(".")[:2]
        assert prefix == "custom_nodes"
        url = f"{server.url}/extensions/{pack.split('@')[0]}/docs/{node}.md"
        with urllib.request.urlopen(url, timeout=server.http_timeout) as r:
            assert r.status == 200
            assert r.read().decode("utf-8").startswith(f"# {info['display_name']}\n"), url


def test_validation_errors_come_back_before_running(server):
    prompt = _prompt("10 s")
    prompt["5"]["inputs"]["resolution"] = "720p"
    status, body = server.post("/prompt", {"prompt": prompt})
    assert status == 400
    errors = body["node_errors"]["5"]["errors"]
    assert any("5 s clips only" in e["details"] for e in errors)
    for node, name, value in [("1", "weight_dtype", "fp9"), ("1", "compute_dtype", "int8"), ("1", "attention", "xformers"),
                              ("2", "dtype", "fp8"), ("3", "dtype", "fp8"), ("4", "duration_tag", "20s"),
                              ("5", "aspect_ratio", "banana"), ("6", "frames", "first")]:
        bad = _prompt("image")  # dropdown values ComfyUI itself does not check for V3 nodes
        bad[node]["inputs"][name] = value
        status, body = server.post("/prompt", {"prompt": bad})
        assert status == 400, (name, value, body)
        details = " ".join(e["details"] for e in body["node_errors"][node]["errors"])
        assert f"{name} is {value!r}, which this node does not offer; pick one of" in details, details
    bad_type = _prompt("image")
    bad_type["6"]["inputs"]["tokens"] = ["1", 0]  # a model where tokens belong
    status, body = server.post("/prompt", {"prompt": bad_type})
    assert status == 400 and body["node_errors"]["6"]["errors"][0]["type"] == "return_type_mismatch"


def test_an_api_prompt_missing_a_file_name_or_with_a_bad_schedule_is_refused_plainly(server):
    """An API prompt without a loader's file name gets ComfyUI's "Required input is missing" for that input, not a
    traceback from validate_inputs called without it; a guidance schedule that is no list of numbers is refused
    when queued, before a model loads."""
    for node, name in [("1", "model_name"), ("2", "encoder_name"), ("3", "vae_name")]:
        bad = _prompt("image")
        del bad[node]["inputs"][name]
        status, body = server.post("/prompt", {"prompt": bad})
        assert status == 400, (name, body)
        errors = body["node_errors"][node]["errors"]
        assert [(e["type"], e["details"]) for e in errors] == [("required_input_missing", name)], errors
    bad = _prompt("image")
    bad["9"] = {"class_type": "InfinityStarLoadTokens", "inputs": {}}
    bad["6"]["inputs"]["tokens"] = ["9", 0]
    status, body = server.post("/prompt", {"prompt": bad})
    errors = body["node_errors"]["9"]["errors"]
    assert status == 400 and [(e["type"], e["details"]) for e in errors] == [("required_input_missing", "tokens_file")]
    for schedule, why in [("abc, 3", "write numbers separated by commas"), ("34, -5", "finite number >= 0")]:
        bad = _prompt("image")
        bad["5"]["inputs"]["guidance_schedule"] = schedule
        status, body = server.post("/prompt", {"prompt": bad})
        assert status == 400, (schedule, body)
        assert any(why in e["details"] for e in body["node_errors"]["5"]["errors"]), body


def _run(server: Server, prompt: dict) -> list[str]:
    """Queue ``prompt``, wait for it to succeed; the nodes ComfyUI answered from its cache."""
    ws, client_id = _connect(server)
    try:
        status, body = server.post("/prompt", {"prompt": prompt, "client_id": client_id})
        assert status == 200, body
        cached = [m["data"]["nodes"] for m in _messages(ws, body["prompt_id"], {"execution_success", "execution_error"})
                  if m["type"] == "execution_cached"]
    finally:
        ws.close()
    assert _history(server, body["prompt_id"])["status"]["status_str"] == "success"
    return sorted(n for nodes in cached for n in nodes)


def test_a_model_file_replaced_on_disk_is_loaded_again(server, tiny_models):
    """ComfyUI's cache keeps a loader's output while its inputs stay the same; a file replaced under the same name
    (the demo weights by a download, a shard copied over) must be read again, the other loaders still cached."""
    vae = Path(tiny_models["root"]) / "infinitystar_videovae.pth"
    before = vae.stat()
    _run(server, _prompt("image", seed=11))
    assert {"1", "2", "3"} <= set(_run(server, _prompt("image", seed=12)))  # nothing changed: cached
    os.utime(vae, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # as a copy over it would leave it
    try:
        cached = _run(server, _prompt("image", seed=13))
    finally:
        os.utime(vae, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert "3" not in cached and {"1", "2"} <= set(cached), cached


def test_text_to_video_round_trip_writes_mp4(server):
    import av

    ws, client_id = _connect(server)
    try:
        status, body = server.post("/prompt", {"prompt": _prompt("5 s"), "client_id": client_id})
        assert status == 200, body
        prompt_id = body["prompt_id"]
        progress = [m["data"] for m in _messages(ws, prompt_id, {"execution_success", "execution_error"})
                    if m["type"] == "progress"]
    finally:
        ws.close()
    entry = _history(server, prompt_id)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-2000:]
    sampler = [p for p in progress if p["node"] == "5"]
    assert sampler and sampler[-1]["value"] == sampler[-1]["max"] > 20  # one update per AR step
    saved = entry["outputs"]["8"]["images"][0]
    path = server.base / "output" / saved["subfolder"] / saved["filename"]
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        assert float(stream.average_rate) == 16.0
    assert frames == 81


def test_interrupt_stops_a_run(server):
    ws, client_id = _connect(server)
    try:
        status, body = server.post("/prompt", {"prompt": _prompt("5 s", seed=7), "client_id": client_id})
        assert status == 200, body
        prompt_id = body["prompt_id"]
        kinds = []
        for msg in _messages(ws, prompt_id, {"execution_interrupted", "execution_success", "execution_error"}):
            kinds.append(msg["type"])
            if msg["type"] == "progress" and msg["data"]["node"] == "5" and msg["data"]["value"] >= 2:
                server.post("/interrupt")
    finally:
        ws.close()
    assert kinds[-1] == "execution_interrupted", kinds[-5:]
    entry = _history(server, prompt_id)
    assert entry["status"]["status_str"] == "error"
    assert "8" not in entry.get("outputs", {})
