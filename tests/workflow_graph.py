"""Offline model of how the ComfyUI frontend reads a saved (UI format 0.4) workflow, written for the tests.

It uses a saved ``/object_info`` snapshot (tests/data/object_info.json) to find each node's widgets, turns a
workflow into the API prompt the frontend's ``graphToPrompt()`` would queue, and lists everything that the
frontend or the server would refuse: unknown node types, widget values out of range or not among the options,
links between incompatible sockets, missing required inputs. The rules follow frontend 1.27 (shipped with
ComfyUI v0.3.64): widgets are the INT/FLOAT/STRING/BOOLEAN/COMBO inputs in ``input_order`` (required, then
optional); an INT with ``control_after_generate`` (or named seed/noise_seed) carries one extra value after it;
an ``image_upload``/``video_upload`` combo carries one extra "upload" value.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS_DIR = ROOT / "workflows"
OBJECT_INFO = Path(__file__).resolve().parent / "data" / "object_info.json"

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
VIRTUAL_NODES = {"Note", "MarkdownNote"}  # frontend-only: never sent to the server
# Combos whose options list files on the machine (empty in the snapshot; any file name is accepted offline).
FILE_COMBOS = {
    ("InfinityStarModelLoader", "model_name"), ("InfinityStarTextEncoderLoader", "encoder_name"),
    ("InfinityStarVAELoader", "vae_name"), ("InfinityStarLoadTokens", "tokens_file"),
    ("LoadImage", "image"), ("LoadVideo", "file"), ("UpscaleModelLoader", "model_name"),
}
# Fields that vary between machines or only carry prose; left out of the snapshot.
VOLATILE_FIELDS = ("python_module", "description", "output_tooltips",
                   "output_matchtypes")  # ComfyUI 0.4+ adds it (null for every node of ours)


def load_object_info(path: Path = OBJECT_INFO) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def workflow_files() -> list[Path]:
    return sorted(WORKFLOWS_DIR.glob("*.json"))


def normalize_object_info(info: dict, node_types) -> dict:
    """The machine-independent part of ``/object_info`` for ``node_types``: no tooltips, prose or file lists."""
    out = {}
    for name in sorted(node_types):
        entry = json.loads(json.dumps(info[name]))
        for field in VOLATILE_FIELDS:
            entry.pop(field, None)
        for section in ("required", "optional"):
            for inp, spec in entry.get("input", {}).get(section, {}).items():
                if len(spec) > 1 and isinstance(spec[1], dict):
                    spec[1].pop("tooltip", None)
                if (name, inp) in FILE_COMBOS:
                    if isinstance(spec[0], list):
                        spec[0] = []
                    else:
                        spec[1]["options"] = []
        out[name] = entry
    return out


def _spec(info: dict, node_type: str, name: str) -> tuple[str, list, dict]:
    """(section, raw spec, options) of one input."""
    inputs = info[node_type]["input"]
    for section in ("required", "optional"):
        if name in inputs.get(section, {}):
            spec = inputs[section][name]
            return section, spec, (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    raise KeyError(f"{node_type} has no input {name!r}")


def input_type(spec: list) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def combo_options(spec: list) -> list:
    if isinstance(spec[0], list):
        return spec[0]
    return spec[1].get("options", []) if len(spec) > 1 and isinstance(spec[1], dict) else []


def ordered_inputs(info: dict, node_type: str) -> list[tuple[str, str, list, dict]]:
    """(name, section, spec, options) in the frontend's order: input_order required, then optional."""
    entry = info[node_type]
    order = entry.get("input_order") or {s: list(entry["input"].get(s, {})) for s in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            _, spec, opts = _spec(info, node_type, name)
            out.append((name, section, spec, opts))
    return out


def is_widget(spec: list, opts: dict) -> bool:
    return input_type(spec) in WIDGET_TYPES and not opts.get("forceInput", False)


def has_control(name: str, spec: list, opts: dict) -> bool:
    if input_type(spec) != "INT":
        return False
    value = opts.get("control_after_generate")
    return bool(value) if value is not None else name in ("seed", "noise_seed")


def has_upload(opts: dict) -> bool:
    return bool(opts.get("image_upload") or opts.get("video_upload"))


def widget_slots(info: dict, node_type: str) -> list[tuple[str, str]]:
    """The widgets_values layout: (input name, kind) with kind 'value', 'control' or 'upload'."""
    slots = []
    for name, _, spec, opts in ordered_inputs(info, node_type):
        if not is_widget(spec, opts):
            continue
        slots.append((name, "value"))
        if has_control(name, spec, opts):
            slots.append((name, "control"))
        if has_upload(opts):
            slots.append((name, "upload"))
    return slots


def check_value(info: dict, node_type: str, name: str, value) -> str | None:
    """Why ``value`` is not acceptable for this widget, or None."""
    _, spec, opts = _spec(info, node_type, name)
    kind = input_type(spec)
    if kind == "COMBO":
        if (node_type, name) in FILE_COMBOS:
            return None if isinstance(value, str) and value.strip() else f"{name}: file name expected, got {value!r}"
        options = combo_options(spec)
        return None if value in options else f"{name}: {value!r} is not one of {options}"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}: boolean expected, got {value!r}"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{name}: string expected, got {value!r}"
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{name}: number expected, got {value!r}"
        if kind == "INT" and value != int(value):
            return f"{name}: integer expected, got {value!r}"
        lo, hi = opts.get("min"), opts.get("max")
        if lo is not None and value < lo or hi is not None and value > hi:
            return f"{name}: {value} outside [{lo}, {hi}]"
        return None
    return f"{name}: {kind} is not a widget type"


def _links(workflow: dict) -> dict[int, list]:
    return {link[0]: link for link in workflow.get("links", [])}


def types_compatible(out_type: str, in_type: str) -> bool:
    return out_type == in_type or "*" in (out_type, in_type)


def validate(workflow: dict, info: dict) -> list[str]:
    """Every problem the frontend or the server would report for this UI-format workflow (empty = valid)."""
    errors: list[str] = []
    for key in ("id", "revision", "last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra",
                "version"):
        if key not in workflow:
            errors.append(f"top level: missing {key!r}")
    if errors:
        return errors
    nodes = {}
    for node in workflow["nodes"]:
        if node["id"] in nodes:
            errors.append(f"node id {node['id']} used twice")
        nodes[node["id"]] = node
    links = _links(workflow)
    if len(links) != len(workflow["links"]):
        errors.append("link ids are not unique")
    if nodes and workflow["last_node_id"] < max(nodes):
        errors.append("last_node_id is below the largest node id")
    if links and workflow["last_link_id"] < max(links):
        errors.append("last_link_id is below the largest link id")

    for node in workflow["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "properties", "widgets_values"):
            if key not in node:
                errors.append(f"{where}: missing {key!r}")
        if node["type"] in VIRTUAL_NODES:
            values = node.get("widgets_values", [])
            if len(values) != 1 or not isinstance(values[0], str):
                errors.append(f"{where}: a note holds one text")
            continue
        if node["type"] not in info:
            errors.append(f"{where}: unknown node type")
            continue
        if node.get("mode", 0) != 0:
            errors.append(f"{where}: mode {node.get('mode')} (muted/bypassed nodes are not shipped)")
        slots = widget_slots(info, node["type"])
        values = node.get("widgets_values", [])
        if len(values) != len(slots):
            errors.append(f"{where}: {len(values)} widget values, the node has {len(slots)} widgets "
                          f"({[s for s in slots]})")
        else:
            for (name, kind), value in zip(slots, values):
                if kind == "value":
                    problem = check_value(info, node["type"], name, value)
                elif kind == "control":
                    problem = None if value in CONTROL_VALUES else f"{name}: control {value!r} not in {CONTROL_VALUES}"
                else:
                    problem = None if value == "image" else f"{name}: upload widget value {value!r}"
                if problem:
                    errors.append(f"{where}: {problem}")
        spec_inputs = {name: (spec, opts) for name, _, spec, opts in ordered_inputs(info, node["type"])}
        for slot, inp in enumerate(node.get("inputs", [])):
            if inp["name"] not in spec_inputs:
                errors.append(f"{where}: input {inp['name']!r} is not an input of the node")
                continue
            spec, opts = spec_inputs[inp["name"]]
            if not types_compatible(inp["type"], input_type(spec)) and not isinstance(spec[0], list):
                errors.append(f"{where}: input {inp['name']!r} typed {inp['type']}, the node says {input_type(spec)}")
            if is_widget(spec, opts) and inp.get("widget", {}).get("name") != inp["name"]:
                errors.append(f"{where}: widget input {inp['name']!r} lacks its widget marker")
            link_id = inp.get("link")
            if link_id is None:
                continue
            link = links.get(link_id)
            if link is None:
                errors.append(f"{where}: input {inp['name']!r} points at missing link {link_id}")
                continue
            _, src, src_slot, dst, dst_slot, ltype = link
            if dst != node["id"] or dst_slot != slot:
                errors.append(f"{where}: link {link_id} ends at node {dst} slot {dst_slot}, not here (slot {slot})")
            source = nodes.get(src)
            if source is None or source["type"] in VIRTUAL_NODES or source["type"] not in info:
                errors.append(f"{where}: link {link_id} comes from missing/unknown node {src}")
                continue
            outputs = info[source["type"]]["output"]
            if src_slot >= len(outputs):
                errors.append(f"{where}: link {link_id} uses output {src_slot} of {source['type']}")
                continue
            out_type = outputs[src_slot]
            if not types_compatible(out_type, input_type(spec)) or ltype != out_type:
                errors.append(f"{where}: link {link_id} carries {out_type} (typed {ltype}) into "
                              f"{inp['name']!r} ({input_type(spec)})")
            ui_outputs = source.get("outputs", [])
            if src_slot >= len(ui_outputs) or link_id not in (ui_outputs[src_slot].get("links") or []):
                errors.append(f"{where}: link {link_id} is not listed on node {src}'s output {src_slot}")
        for slot, out in enumerate(node.get("outputs", [])):
            expected = info[node["type"]]["output"]
            if slot >= len(expected) or out["type"] != expected[slot]:
                errors.append(f"{where}: output {slot} typed {out['type']}, the node says "
                              f"{expected[slot] if slot < len(expected) else 'nothing'}")
            for link_id in out.get("links") or []:
                if link_id not in links or links[link_id][1] != node["id"] or links[link_id][2] != slot:
                    errors.append(f"{where}: output {slot} lists link {link_id}, which does not start here")
    if not errors:
        try:
            errors += validate_prompt(to_api(workflow, info), info)
        except (KeyError, IndexError, ValueError) as exc:
            errors.append(f"conversion failed: {exc!r}")
    return errors


def to_api(workflow: dict, info: dict) -> dict:
    """The API prompt (``{id: {class_type, inputs, _meta}}``) that ``graphToPrompt()`` builds from the workflow."""
    links = _links(workflow)
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) != 0:
            continue
        inputs = {}
        for (name, kind), value in zip(widget_slots(info, node["type"]), node.get("widgets_values", [])):
            if kind == "value":
                inputs[name] = value
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                _, src, src_slot, *_ = links[inp["link"]]
                inputs[inp["name"]] = [str(src), src_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title") or info[node["type"]]["display_name"]}}
    return prompt


def validate_prompt(prompt: dict, info: dict) -> list[str]:
    """The server-side checks of an API prompt: required inputs, link targets and types, widget values."""
    errors = []
    if not any(info[n["class_type"]].get("output_node") for n in prompt.values()):
        errors.append("prompt: no output node")
    for node_id, node in prompt.items():
        cls = node["class_type"]
        where = f"prompt node {node_id} ({cls})"
        names = {name: (section, spec, opts) for name, section, spec, opts in ordered_inputs(info, cls)}
        for name, (section, _, _) in names.items():
            if section == "required" and name not in node["inputs"]:
                errors.append(f"{where}: required input {name!r} missing")
        for name, value in node["inputs"].items():
            if name not in names:
                errors.append(f"{where}: unexpected input {name!r}")
                continue
            _, spec, _ = names[name]
            if isinstance(value, list):
                src = prompt.get(value[0])
                if src is None:
                    errors.append(f"{where}: {name!r} links to missing node {value[0]}")
                    continue
                outputs = info[src["class_type"]]["output"]
                if value[1] >= len(outputs) or not types_compatible(outputs[value[1]], input_type(spec)):
                    errors.append(f"{where}: {name!r} fed by an incompatible output {value}")
            else:
                problem = check_value(info, cls, name, value)
                if problem:
                    errors.append(f"{where}: {problem}")
    return errors
