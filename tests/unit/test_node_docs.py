"""The node help pages (``web/docs/<node id>.md``, shown by ComfyUI's frontend in the node's help panel): one per
node, titled with its display name, naming every input the node has and no input it lacks (a renamed input shows
up here)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "web" / "docs"
NODES = json.loads((ROOT / "node_list.json").read_text(encoding="utf-8"))
OBJECT_INFO = json.loads((ROOT / "tests" / "data" / "object_info.json").read_text(encoding="utf-8"))
BOLD_NAME = re.compile(r"\*\*([a-z][a-z0-9_]*)\*\*")  # **seed**: how the pages mark an input they explain
CODE_NAME = re.compile(r"`([a-z][a-z0-9_]*)`")


def _schema(node: str) -> tuple[set[str], set[str]]:
    info = OBJECT_INFO[node]
    inputs = set(info["input"].get("required", {})) | set(info["input"].get("optional", {}))
    return inputs, set(info.get("output_name", ()))


def test_every_node_has_a_page_and_every_page_a_node():
    pages = {p.stem for p in DOCS.glob("*.md")}
    assert pages == set(NODES), {"without a page": sorted(set(NODES) - pages), "no such node": sorted(pages - set(NODES))}


@pytest.mark.parametrize("node", sorted(NODES))
def test_page_is_titled_with_the_display_name(node):
    first = (DOCS / f"{node}.md").read_text(encoding="utf-8").splitlines()[0]
    assert first == f"# {NODES[node]}"


@pytest.mark.parametrize("node", sorted(NODES))
def test_page_names_exactly_the_nodes_inputs(node):
    text = (DOCS / f"{node}.md").read_text(encoding="utf-8")
    inputs, outputs = _schema(node)
    named = set(BOLD_NAME.findall(text)) | set(CODE_NAME.findall(text))
    assert inputs <= named, f"{node}.md does not mention {sorted(inputs - named)}"
    explained = set(BOLD_NAME.findall(text))
    assert explained <= inputs | outputs, f"{node}.md explains {sorted(explained - inputs - outputs)}, not inputs of {node}"


def test_pages_are_packaged():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^includes\s*=\s*\[[^\]]*"web"', pyproject, re.M)
    init = (ROOT / "__init__.py").read_text(encoding="utf-8")
    assert 'WEB_DIRECTORY = "./web"' in init
