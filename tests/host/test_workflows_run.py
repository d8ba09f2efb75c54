"""Every shipped example workflow, converted to an API prompt, runs to success in the real ComfyUI server on the
tiny checkpoints; the object_info snapshot the offline workflow tests use is what this ComfyUI reports.

The tiny model set uses the official file names, so the workflows run as shipped except for the Encode node's
resolution (set to 0.06M; the sampler's "auto" already picks 0.06M for weights that are not the 8B model). The
test writes the start image, the clip to continue and a tiny 2x upscale model under the names the workflows use.

Refresh the snapshot after changing a node: INFINITYSTAR_UPDATE_OBJECT_INFO=1 COMFYUI_PATH=... pytest
tests/host/test_workflows_run.py -k snapshot, then rebuild the workflows (workflows/tools/build_workflows.py).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from comfy_server import PACK_FOLDER, START_IMAGE_H_DIV_W, Server, running_server, write_workflow_inputs
from workflow_graph import OBJECT_INFO, load_object_info, normalize_object_info, to_api, workflow_files

RUN_TIMEOUT = 900
TINY_RESOLUTION = "0.06M"
WORKFLOWS = workflow_files()

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(comfy, tiny_models, tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_workflows")
    write_workflow_inputs(base, runnable=True)
    with running_server(base, tiny_models["root"], http_timeout=60) as srv:
        yield srv


def test_object_info_snapshot_is_current(server):
    live = server.get("/object_info")
    saved = load_object_info()
    names = set(saved) | {k for k in live if k.startswith("InfinityStar")}
    missing = sorted(n for n in names if n not in live)
    assert not missing, f"ComfyUI does not know {missing}"
    current = normalize_object_info(live, names)
    if os.environ.get("INFINITYSTAR_UPDATE_OBJECT_INFO") == "1":
        OBJECT_INFO.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
        return
    changed = sorted(n for n in names if current.get(n) != saved.get(n))
    assert not changed, (f"tests/data/object_info.json is stale for {changed}; refresh it with "
                         "INFINITYSTAR_UPDATE_OBJECT_INFO=1 (see this module's docstring)")


def test_workflows_are_listed_as_templates(server):
    listed = server.get("/workflow_templates").get(PACK_FOLDER, [])
    assert sorted(listed) == sorted(p.stem for p in WORKFLOWS)
    path = WORKFLOWS[0]
    assert server.get(f"/api/workflow_templates/{PACK_FOLDER}/{path.name}") == json.loads(path.read_text())


def _tiny(prompt: dict) -> dict:
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] in ("InfinityStarEncode", "InfinityStarInteractStart") or (
                node["class_type"] == "InfinityStarSampler" and inputs["resolution"] != "auto"):
            inputs["resolution"] = TINY_RESOLUTION
    return prompt


def _wait(server: Server, prompt_id: str) -> dict:
    deadline = time.time() + RUN_TIMEOUT
    while time.time() < deadline:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None and (
                entry["status"]["status_str"] in ("success", "error")):
            return entry
        if server.proc.poll() is not None:
            pytest.fail(f"ComfyUI died:\n{server.log_tail()}")
        time.sleep(1)
    pytest.fail(f"workflow did not finish in {RUN_TIMEOUT} s:\n{server.log_tail()}")


def _video(path: Path) -> tuple[int, int, int, float]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f for f in container.decode(stream)]
        return len(frames), frames[0].height, frames[0].width, float(stream.average_rate)


def _expected_size(prompt: dict) -> tuple[int, int, int]:
    """(frames, height, width) of the decoded output, from the core's own schedule for the patched settings."""
    from infinitystar.pipeline import resolve_schedule

    sampler = next((n for n in prompt.values() if n["class_type"] == "InfinityStarSampler"), None)
    if sampler is not None:
        seconds = {"image": 0, "5 s": 5, "10 s": 10}[sampler["inputs"]["duration"]]
        aspect = sampler["inputs"]["aspect_ratio"]
        if aspect == "from start image":  # the shape of the image the template's Load Image names
            aspect = START_IMAGE_H_DIV_W
        schedule = resolve_schedule(TINY_RESOLUTION, aspect, seconds)
        return schedule.frames, schedule.height, schedule.width
    schedule = resolve_schedule(TINY_RESOLUTION, 96 / 160, 5)  # the test clip: 81 frames, h/w 0.6
    clips = [n for n in prompt.values() if n["class_type"] == "InfinityStarInteract"]  # one clip each
    if not clips:
        clips = [None] * next(n for n in prompt.values() if n["class_type"] == "InfinityStarExtend")["inputs"]["clips"]
    return schedule.frames + 80 * len(clips), schedule.height, schedule.width


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_runs_on_tiny_weights(server, path):
    prompt = _tiny(to_api(json.loads(path.read_text()), load_object_info()))
    status, body = server.post("/prompt", {"prompt": prompt, "client_id": "workflow-tests"})
    assert status == 200, body
    entry = _wait(server, body["prompt_id"])
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:]

    frames, height, width = _expected_size(prompt)
    scale = 1.0
    for node in prompt.values():  # the upscalers between the decoder and the video
        if node["class_type"] == "ImageUpscaleWithModel":
            scale *= 2
    for node_id, node in prompt.items():
        if node["class_type"] not in ("SaveVideo", "SaveImage"):
            continue
        saved = entry["outputs"][node_id]["images"]
        assert len(saved) == 1, saved
        out = server.base / "output" / saved[0]["subfolder"] / saved[0]["filename"]
        assert out.is_file() and out.stat().st_size > 0
        if node["class_type"] == "SaveImage":
            from PIL import Image

            assert frames == 1 and Image.open(out).size == (width, height)
            continue
        got_frames, got_h, got_w, fps = _video(out)
        up_h, up_w = round(height * scale), round(width * scale)
        for other in prompt.values():
            if other["class_type"] == "ImageScaleBy":
                up_h, up_w = round(up_h * other["inputs"]["scale_by"]), round(up_w * other["inputs"]["scale_by"])
        assert (got_frames, fps) == (frames, 16.0)
        # yuv420p needs even sizes: SaveVideo crops an odd row/column
        assert (got_h, got_w) == (up_h - up_h % 2, up_w - up_w % 2)
