"""The shipped example workflows (workflows/*.json) against the nodes' own definitions, offline.

The node definitions come from a snapshot of the real ComfyUI's /object_info (tests/data/object_info.json; a
host test keeps it equal to what ComfyUI reports). Each workflow must load in the frontend without missing nodes,
hold widget values in range and in order, link compatible sockets, and convert to an API prompt the server
accepts. Mutated copies must be rejected, so the checks can fail.
"""
from __future__ import annotations

import ast
import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest
from workflow_graph import (
    VIRTUAL_NODES,
    WORKFLOWS_DIR,
    load_object_info,
    to_api,
    validate,
    widget_slots,
    workflow_files,
)

REPO = Path(__file__).resolve().parents[2]
OFFICIAL_FILES = {("InfinityStarModelLoader", "model_name"): {"infinitystar_8b_720p_weights",
                                                              "infinitystar_8b_480p_weights",
                                                              "InfinityStarInteract_24K_iters"},
                  ("InfinityStarTextEncoderLoader", "encoder_name"): {"text_encoder/flan-t5-xl-official"},
                  ("InfinityStarVAELoader", "vae_name"): {"infinitystar_videovae.pth"}}


@pytest.fixture(scope="module")
def info():
    return load_object_info()


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _by_type(wf: dict, node_type: str) -> list[dict]:
    return [n for n in wf["nodes"] if n["type"] == node_type]


def _widgets(info: dict, node: dict) -> dict:
    return {name: v for (name, kind), v in zip(widget_slots(info, node["type"]), node["widgets_values"])
            if kind == "value"}


def _node_ids_in_source() -> set[str]:
    """node_id=... of every schema in nodes/*.py, read without importing ComfyUI."""
    ids = set()
    for path in (REPO / "nodes").glob("*.py"):
        for call in ast.walk(ast.parse(path.read_text())):
            if isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "Schema":
                for kw in call.keywords:
                    if kw.arg == "node_id" and isinstance(kw.value, ast.Constant):
                        ids.add(kw.value.value)
    return ids


WORKFLOWS = workflow_files()


def test_workflows_are_shipped_where_comfyui_finds_them():
    names = [p.stem for p in WORKFLOWS]
    assert len(names) >= 6, names
    assert all(re.fullmatch(r"[a-z0-9_]+", n) for n in names), names
    assert WORKFLOWS_DIR.name in ("example_workflows", "workflows")  # folders ComfyUI serves as templates


def test_snapshot_knows_every_node_of_the_pack(info):
    ids = _node_ids_in_source()
    assert len(ids) >= 11 and all(i.startswith("InfinityStar") for i in ids), ids
    assert ids == {k for k in info if k.startswith("InfinityStar")}, "refresh tests/data/object_info.json"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_is_valid(path, info):
    wf = _load(path)
    assert wf["version"] == 0.4
    assert validate(wf, info) == []
    for node in wf["nodes"]:
        if node["type"] in VIRTUAL_NODES:
            continue
        props = node["properties"]
        assert props["Node name for S&R"] == node["type"]
        assert props["cnr_id"] == ("infinitystar" if node["type"].startswith("InfinityStar") else "comfy-core")
        for name, value in _widgets(info, node).items():
            if (node["type"], name) in OFFICIAL_FILES:
                assert value in OFFICIAL_FILES[node["type"], name], (name, value)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_says_where_the_model_files_go(path):
    notes = [n["widgets_values"][0] for n in _load(path)["nodes"] if n["type"] in VIRTUAL_NODES]
    assert notes and any("models/infinitystar" in t and "infinitystar_videovae.pth" in t for t in notes)


TITLE_BAR = 30  # px the frontend draws above a node's body (its size excludes the title)


def overlapping_nodes(wf: dict) -> list[tuple]:
    """Pairs of nodes whose boxes (title bar included) overlap on the canvas."""
    boxes = [(n["id"], n["pos"][0], n["pos"][1] - TITLE_BAR, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in wf["nodes"]]
    return [(a[0], b[0]) for i, a in enumerate(boxes) for b in boxes[i + 1:]
            if a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]]


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_nodes_do_not_overlap(path):
    assert overlapping_nodes(_load(path)) == []


def test_overlap_check_sees_an_overlap():
    moved = copy.deepcopy(_load(WORKFLOWS[0]))
    moved["nodes"][1]["pos"] = [moved["nodes"][0]["pos"][0] + 10, moved["nodes"][0]["pos"][1] + 10]
    assert overlapping_nodes(moved)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_sampler_settings_respect_the_weights(path, info):
    """The 720p weights make 5 s only (the sampler node refuses 10 s at 720p); 10 s needs the 480p weights."""
    api = to_api(_load(path), info)
    for node in api.values():
        if node["class_type"] != "InfinityStarSampler":
            continue
        loader = api[node["inputs"]["model"][0]]["inputs"]["model_name"]
        if node["inputs"]["duration"] == "10 s":
            assert "480p" in loader and node["inputs"]["resolution"] in ("auto", "480p")
        if node["inputs"]["resolution"] == "auto":
            continue
        assert node["inputs"]["resolution"] in loader


def _api_all(info) -> dict[str, dict]:
    return {p.stem: to_api(_load(p), info) for p in WORKFLOWS}


def _classes(api: dict) -> list[str]:
    return [n["class_type"] for n in api.values()]


def _find(api: dict, cls: str) -> list[dict]:
    return [n for n in api.values() if n["class_type"] == cls]


def test_the_promised_workflows_exist(info):
    """T2V 720p 5 s, T2V 480p 10 s, I2V 720p, T2I, video extension and T2V + upscaler are all shipped."""
    api = _api_all(info)

    def samplers(wf):
        return [(n["inputs"]["duration"], wf[n["inputs"]["model"][0]]["inputs"]["model_name"])
                for n in _find(wf, "InfinityStarSampler")]

    kinds = set()
    for wf in api.values():
        classes = _classes(wf)
        for duration, model in samplers(wf):
            starts = [n for n in _find(wf, "InfinityStarSampler") if "start_image" in n["inputs"]]
            if starts:
                assert wf[starts[0]["inputs"]["start_image"][0]]["class_type"] == "LoadImage"
                kinds.add(("i2v", duration, model))
            elif duration == "image":
                assert "SaveImage" in classes
                kinds.add(("t2i",))
            elif "ImageUpscaleWithModel" in classes or "ImageScaleBy" in classes:
                kinds.add(("upscale",))
            else:
                kinds.add(("t2v", duration, model))
        if "InfinityStarExtend" in classes:
            ext = _find(wf, "InfinityStarExtend")[0]
            assert wf[ext["inputs"]["tokens"][0]]["class_type"] in ("InfinityStarEncode", "InfinityStarSampler")
            kinds.add(("extend",))
        if "InfinityStarInteract" in classes:
            loader = _find(wf, "InfinityStarModelLoader")[0]["inputs"]["model_name"]
            chain = _find(wf, "InfinityStarInteract")
            texts = {wf[n["inputs"]["positive"][0]]["inputs"]["prompt"] for n in chain}
            sources = sorted(wf[n["inputs"]["tokens"][0]]["class_type"] for n in chain)
            assert "Interact" in loader and len(texts) == len(chain) >= 2  # a prompt per clip
            assert sources == ["InfinityStarInteract"] * (len(chain) - 1) + ["InfinityStarInteractStart"]
            kinds.add(("interact",))
        if any(c in classes for c in ("SaveVideo", "SaveImage")):
            save = next(n for n in wf.values() if n["class_type"] in ("SaveVideo", "SaveImage"))
            assert save["inputs"]["filename_prefix"]
    assert ("t2v", "5 s", "infinitystar_8b_720p_weights") in kinds
    assert ("t2v", "10 s", "infinitystar_8b_480p_weights") in kinds
    assert ("i2v", "5 s", "infinitystar_8b_720p_weights") in kinds
    assert {("t2i",), ("extend",), ("upscale",), ("interact",)} <= kinds


def test_upscaled_frames_reach_the_video(info):
    """Decode -> upscaler(s) -> CreateVideo -> SaveVideo, with the frame rate taken from the decoder."""
    wf = next(w for w in _api_all(info).values() if "ImageUpscaleWithModel" in _classes(w))
    create_id = next(k for k, n in wf.items() if n["class_type"] == "CreateVideo")
    create = wf[create_id]
    chain, node = [], wf[create["inputs"]["images"][0]]
    while node["class_type"] != "InfinityStarDecode":
        chain.append(node["class_type"])
        node = wf[node["inputs"]["image"][0]]
    assert {"ImageUpscaleWithModel", "ImageScaleBy"} <= set(chain)
    assert wf[create["inputs"]["fps"][0]]["class_type"] == "InfinityStarDecode"
    assert [n["inputs"]["video"] for n in _find(wf, "SaveVideo")] == [[create_id, 0]]


def test_video_workflows_feed_the_file_straight_to_the_encoders(info):
    """Load Video -> Encode / Interact Start .video: the node decodes only the frames it keeps. Get Video Components
    would first hold every frame of the clip as float32 (about 3 GiB for 10 s of 720p30)."""
    encoders = 0
    for name, wf in _api_all(info).items():
        assert "GetVideoComponents" not in _classes(wf), name
        for node in _find(wf, "InfinityStarEncode") + _find(wf, "InfinityStarInteractStart"):
            assert "images" not in node["inputs"] and "fps" in node["inputs"], name  # fps: the unused widget
            assert wf[node["inputs"]["video"][0]]["class_type"] == "LoadVideo", name
            encoders += 1
    assert encoders == 3


def test_seed_widgets_carry_the_frontend_control_value(info):
    """Frontend 1.27 puts a control_after_generate value right after a seed (V3 flag or legacy name), except where
    the schema sets control_after_generate false (Encode, Interact Start: an encode seed that must stay put)."""
    seen = fixed = 0
    for path in WORKFLOWS:
        for node in _load(path)["nodes"]:
            if node["type"] in VIRTUAL_NODES:
                continue
            slots = widget_slots(info, node["type"])
            for i, (name, kind) in enumerate(slots):
                if name == "seed" and kind == "value":
                    spec = {**info[node["type"]]["input"]["required"], **info[node["type"]]["input"].get("optional", {})}
                    if spec["seed"][1].get("control_after_generate") is False:
                        assert i + 1 == len(slots) or slots[i + 1] != ("seed", "control")
                        fixed += 1
                        continue
                    assert slots[i + 1] == ("seed", "control")
                    assert node["widgets_values"][i + 1] in ("fixed", "randomize")
                    seen += 1
    assert seen >= 6 and fixed >= 3


def test_builder_reproduces_the_shipped_files(info):
    """workflows/tools/build_workflows.py and the JSON files agree (edit the script, then rebuild)."""
    spec = importlib.util.spec_from_file_location("build_workflows", WORKFLOWS_DIR / "tools" / "build_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert sorted(module.WORKFLOWS) == sorted(p.stem for p in WORKFLOWS)
    for name, build in module.WORKFLOWS.items():
        assert build(info) == _load(WORKFLOWS_DIR / f"{name}.json"), name


# ---- the validator must be able to fail -------------------------------------------------------------------


def _first(wf, node_type):
    return next(n for n in wf["nodes"] if n["type"] == node_type)


def _set_widget(info, wf, node_type, name, value):
    node = _first(wf, node_type)
    index = widget_slots(info, node_type).index((name, "value"))
    node["widgets_values"][index] = value


def _drop_link(wf, node_type, input_name):
    node = _first(wf, node_type)
    inp = next(i for i in node["inputs"] if i["name"] == input_name)
    link_id = inp["link"]
    inp["link"] = None
    wf["links"] = [link for link in wf["links"] if link[0] != link_id]
    for other in wf["nodes"]:
        for out in other.get("outputs", []):
            if out.get("links") and link_id in out["links"]:
                out["links"].remove(link_id)


def _rewire(wf, node_type, input_name, src_type):
    """Feed ``input_name`` from output 0 of the first ``src_type`` node, keeping the link's declared type."""
    node = _first(wf, node_type)
    inp = next(i for i in node["inputs"] if i["name"] == input_name)
    link = next(link for link in wf["links"] if link[0] == inp["link"])
    src = _first(wf, src_type)
    old_src = next(n for n in wf["nodes"] if n["id"] == link[1])
    old_src["outputs"][link[2]]["links"].remove(link[0])
    src["outputs"][0]["links"].append(link[0])
    link[1], link[2], link[5] = src["id"], 0, src["outputs"][0]["type"]


MUTATIONS = {
    "unknown_node_type": lambda info, wf: _first(wf, "InfinityStarDecode").update(type="InfinityStarDecoder"),
    "combo_not_an_option": lambda info, wf: _set_widget(info, wf, "InfinityStarSampler", "duration", "7 s"),
    "int_out_of_range": lambda info, wf: _set_widget(info, wf, "InfinityStarSampler", "seed", -1),
    "float_out_of_range": lambda info, wf: _set_widget(info, wf, "InfinityStarSampler", "guidance_scale", 1e6),
    "string_where_bool": lambda info, wf: _set_widget(info, wf, "InfinityStarDecode", "tiled", "no"),
    "missing_widget_value": lambda info, wf: _first(wf, "InfinityStarSampler")["widgets_values"].pop(),
    "control_value_dropped": lambda info, wf: _first(wf, "InfinityStarSampler")["widgets_values"].remove("randomize"),
    "bad_control_value": lambda info, wf: _set_control(info, wf, "sometimes"),
    "required_link_removed": lambda info, wf: _drop_link(wf, "InfinityStarDecode", "vae"),
    "incompatible_link": lambda info, wf: _rewire(wf, "InfinityStarDecode", "tokens", "InfinityStarModelLoader"),
    "dangling_link": lambda info, wf: wf["links"].pop(),
    "output_node_removed": lambda info, wf: wf.update(nodes=[n for n in wf["nodes"] if n["type"] != "SaveVideo"]),
}


def _set_control(info, wf, value):
    node = _first(wf, "InfinityStarSampler")
    node["widgets_values"][widget_slots(info, "InfinityStarSampler").index(("seed", "control"))] = value


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_mutated_workflow_is_rejected(mutation, info):
    wf = _load(WORKFLOWS_DIR / "infinitystar_t2v_720p_5s.json")
    assert validate(copy.deepcopy(wf), info) == []
    MUTATIONS[mutation](info, wf)
    assert validate(wf, info), f"{mutation} was not detected"
