"""Every shipped example workflow in the real ComfyUI web frontend, driven in headless Chromium.

For each workflows/*.json the page loads it the way a dropped file is loaded, and the test checks what a user would
see or hit: no "missing nodes" dialog or error toast, no uncaught exception, console error or failed request that
mentions our nodes, every node type registered in LiteGraph, each widget holding the saved value under the name
the frontend gives it, the links kept, and the frontend's own UI -> API conversion (``app.graphToPrompt()``)
equal to our offline one (tests/workflow_graph.py, which the other tests rely on). The API prompt is then posted
to the server, whose validation must find nothing (the run itself is interrupted at once: running the workflows
is tests/host/test_workflows_run.py's job). Seeds: the frontend applies control_after_generate after queueing,
so graphToPrompt() carries the saved seed and the comparison is exact.

The template browser must list the pack with every workflow and its thumbnail (<name>.jpg, written by
workflows/tools/thumbnails.py) and load one on click.

Needs COMFYUI_PATH, Playwright (``pip install playwright``; its browser download is not needed) and a Chromium
(INFINITYSTAR_CHROMIUM, or chromium / chromium-browser / google-chrome on PATH, e.g. Debian's ``chromium``).
"""
from __future__ import annotations

import json
import os
import time

import pytest
from comfy_server import (
    CHROMIUM_ENV,
    PACK_FOLDER,
    Frontend,
    Server,
    find_chromium,
    frontend_page,
    running_server,
    write_workflow_inputs,
)
from workflow_graph import VIRTUAL_NODES, WORKFLOWS_DIR, load_object_info, to_api, widget_slots, workflow_files

try:
    import playwright.sync_api  # noqa: F401
except ImportError:
    _PLAYWRIGHT = False
else:
    _PLAYWRIGHT = True

CHROMIUM = find_chromium()
WORKFLOWS = workflow_files()
CLIENT_ID = "infinitystar-browser-test"  # not the page's id: the page gets no execution messages of ours
SETTLE_MS = 400  # dialogs, toasts and image previews appear asynchronously after loadGraphData
RUN_STOP_TIMEOUT = 300  # a run between interrupt checks (a tokenizer encode or decode) can take minutes on 2 busy cores
# Widgets the frontend adds to show a loaded image/video; not inputs of the node. graphToPrompt() sends the video
# one along as an input (frontend 1.27), which the server ignores as it is not declared.
PREVIEW_WIDGETS = {"$$canvas-image-preview", "video-preview"}

if not _PLAYWRIGHT:
    pytestmark = pytest.mark.skip(reason="playwright is not installed (pip install playwright)")
elif CHROMIUM is None:
    pytestmark = pytest.mark.skip(reason=f"{CHROMIUM_ENV}={os.environ[CHROMIUM_ENV]} is not a file"
                                  if os.environ.get(CHROMIUM_ENV) else
                                  f"no Chromium found (set {CHROMIUM_ENV} or put chromium on PATH)")

# Everything the page shows or knows after a load, in one round trip.
PAGE_STATE = """async () => {
    const visible = e => !!(e.offsetWidth || e.offsetHeight || e.getClientRects().length);
    const graph = window.app.graph.serialize();
    return {
        dialogs: [...document.querySelectorAll('[role=dialog]')].filter(visible).map(d => d.innerText),
        toasts: [...document.querySelectorAll('.p-toast-message-error')].filter(visible).map(t => t.innerText),
        registered: Object.keys(LiteGraph.registered_node_types),
        nodes: window.app.graph._nodes.map(n => ({
            id: n.id, type: n.type,
            widgets: (n.widgets || []).map(w => [w.name, w.value]),
        })),
        saved: graph.nodes.map(n => ({id: n.id, widgets_values: n.widgets_values ?? []})),
        links: graph.links,
        prompt: (await window.app.graphToPrompt()).output,
    };
}"""


@pytest.fixture(scope="module")
def server(comfy, tiny_models, tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_browser")
    write_workflow_inputs(base)
    with running_server(base, tiny_models["root"], http_timeout=60) as srv:
        yield srv


@pytest.fixture(scope="module")
def frontend(server):
    with frontend_page(server, CHROMIUM) as front:
        yield front


@pytest.fixture(scope="module")
def info():
    return load_object_info()


def _close_dialogs(front: Frontend) -> None:
    for _ in range(3):
        if not front.page.locator("[role=dialog]").count():
            return
        front.page.keyboard.press("Escape")
        front.page.wait_for_timeout(100)


def _stop_run(server: Server, prompt_id: str) -> None:
    """Interrupt the queued run until it shows up in the history (an interrupt that lands before the run starts
    is reset by the executor, hence the repeats)."""
    server.post("/queue", {"clear": True})
    deadline = time.time() + RUN_STOP_TIMEOUT
    while not server.get(f"/history/{prompt_id}"):
        if time.time() > deadline:
            pytest.fail(f"the queued validation run did not stop in {RUN_STOP_TIMEOUT} s:\n{server.log_tail()}")
        server.post("/interrupt")
        time.sleep(0.2)


def check_workflow(front: Frontend, workflow: dict, info: dict) -> list[str]:
    """Load ``workflow`` in the page and list every problem found (empty: the workflow is fine)."""
    _close_dialogs(front)
    mark = len(front.events)
    front.load(workflow)
    front.page.wait_for_timeout(SETTLE_MS)
    state = front.page.evaluate(PAGE_STATE)
    problems = [f"dialog: {text[:400]}" for text in state["dialogs"]]
    problems += [f"error toast: {text[:400]}" for text in state["toasts"]]

    types = {node["type"] for node in workflow["nodes"]}
    words = {t.lower() for t in types} | {"infinitystar"}
    for kind, text in front.events[mark:]:
        if kind == "pageerror":
            problems.append(f"uncaught exception: {text[:600]}")
        elif kind == "http" and text.split()[1].startswith(front.server.url):
            problems.append(f"failed request: {text}")
        elif kind in ("error", "warning") and any(word in text.lower() for word in words):
            problems.append(f"console {kind}: {text[:600]}")

    problems += [f"node type {t} is not registered in LiteGraph" for t in sorted(types - set(state["registered"]))]
    browser_nodes = {str(n["id"]): n for n in state["nodes"]}
    saved = {str(n["id"]): n["widgets_values"] for n in state["saved"]}
    for node in workflow["nodes"]:
        nid, where = str(node["id"]), f"node {node['id']} ({node['type']})"
        got = browser_nodes.get(nid)
        if got is None or got["type"] != node["type"]:
            problems.append(f"{where}: the page holds {got and got['type']}")
            continue
        values = node.get("widgets_values", [])
        if saved[nid] != values:
            problems.append(f"{where}: saves widgets_values {saved[nid]}, the file has {values}")
        if node["type"] in VIRTUAL_NODES or node["type"] not in info:
            names = [name for name, _ in got["widgets"]]
        else:  # the frontend names a seed's extra widget control_after_generate and an upload button "upload"
            names = [name if kind == "value" else {"control": "control_after_generate", "upload": "upload"}[kind]
                     for name, kind in widget_slots(info, node["type"])]
        expected = list(zip(names, values))
        if [tuple(w) for w in got["widgets"] if w[0] not in PREVIEW_WIDGETS] != expected:
            problems.append(f"{where}: widgets {got['widgets']}, expected {expected}")

    if sorted(map(tuple, state["links"])) != sorted(map(tuple, workflow["links"])):
        problems.append(f"links changed on load: {state['links']} vs {workflow['links']}")

    prompt = state["prompt"]
    if types <= set(info) | VIRTUAL_NODES:
        offline = to_api(workflow, info)
        for node in prompt.values():
            declared = info.get(node["class_type"], {}).get("input", {})
            for name in PREVIEW_WIDGETS & set(node["inputs"]):
                if not any(name in declared.get(section, {}) for section in ("required", "optional")):
                    del node["inputs"][name]
        if set(prompt) != set(offline):
            problems.append(f"graphToPrompt() has nodes {sorted(prompt)}, the offline conversion {sorted(offline)}")
        for nid in sorted(set(prompt) & set(offline)):
            for key in ("class_type", "inputs"):
                if prompt[nid][key] != offline[nid][key]:
                    problems.append(f"graphToPrompt() node {nid} {key}: {prompt[nid][key]} != offline "
                                    f"{offline[nid][key]}")
    else:
        problems.append(f"node types unknown to the object_info snapshot: {sorted(types - set(info))}")

    if not problems:  # the server's validation of what the frontend would queue
        status, body = front.server.post("/prompt", {"prompt": prompt, "client_id": CLIENT_ID})
        if status == 200 and body.get("prompt_id"):
            _stop_run(front.server, body["prompt_id"])
        if status != 200 or body.get("node_errors"):
            problems.append(f"server refused the prompt ({status}): {json.dumps(body)[:1500]}")
    return problems


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_loads_and_converts_in_the_frontend(frontend, info, path):
    problems = check_workflow(frontend, json.loads(path.read_text()), info)
    assert not problems, "\n".join(problems)


def test_all_pack_nodes_are_registered_in_the_frontend(frontend, server):
    ours = {name for name, entry in server.get("/object_info").items()
            if entry.get("python_module") == f"custom_nodes.{PACK_FOLDER}"}
    assert ours and all(name.startswith("InfinityStar") for name in ours)
    registered = set(frontend.page.evaluate("() => Object.keys(LiteGraph.registered_node_types)"))
    assert ours <= registered, sorted(ours - registered)


def test_only_sampling_seeds_change_after_a_queue(frontend):
    """A node added by hand gets a seed control only where a new draw each queue is wanted (Sampler, Extend,
    Interact): the frontend gives any INT named seed a 'randomize' control unless the schema says otherwise, which
    re-encoded the video at Encode / Interact Start (and re-ran everything after) on every queue."""
    controls = frontend.page.evaluate("""() => Object.fromEntries(
        ["InfinityStarSampler", "InfinityStarExtend", "InfinityStarInteract", "InfinityStarEncode",
         "InfinityStarInteractStart"].map(type => {
            const node = LiteGraph.createNode(type);
            const control = node.widgets.find(w => w.name === "control_after_generate");
            return [type, control ? control.value : null];
        }))""")
    assert controls == {"InfinityStarSampler": "randomize", "InfinityStarExtend": "randomize",
                        "InfinityStarInteract": "randomize", "InfinityStarEncode": None,
                        "InfinityStarInteractStart": None}


@pytest.mark.parametrize("before_keep", [False, True])
def test_workflows_saved_with_the_old_encode_seed_control_still_load(frontend, before_keep):
    """Encode and Interact Start once had a seed control widget, so workflows saved then hold one more value after
    the seed; the pack's frontend extension (web/infinitystar.js) drops it, or 'fixed' would land in fps. Such a
    workflow also predates Encode's keep (added last): it loads with keep's default."""
    for stem in ("infinitystar_v2v_480p_10s", "infinitystar_interact_480p"):  # Encode, Interact Start
        workflow = json.loads(next(p for p in WORKFLOWS if p.stem == stem).read_text())
        expect = {}
        for node in workflow["nodes"]:
            if node["type"] in ("InfinityStarEncode", "InfinityStarInteractStart"):
                values = node["widgets_values"]
                expect[node["id"]] = list(values)
                if before_keep and node["type"] == "InfinityStarEncode":
                    assert values.pop() == "all whole clips"  # saved before keep existed
                values.insert(3, "fixed")  # resolution, aspect_ratio, seed, [control], fps
        assert expect
        _close_dialogs(frontend)
        frontend.load(workflow)
        frontend.page.wait_for_timeout(SETTLE_MS)
        loaded = frontend.page.evaluate("""() => Object.fromEntries(window.app.graph._nodes
            .filter(n => n.type === "InfinityStarEncode" || n.type === "InfinityStarInteractStart")
            .map(n => [n.id, n.widgets.map(w => w.value)]))""")
        assert {int(k): v for k, v in loaded.items()} == expect, stem


def test_a_missing_node_type_is_caught(frontend, info):
    workflow = json.loads(WORKFLOWS[0].read_text())
    workflow["nodes"][0]["type"] = "InfinityStarNoSuchNode"
    problems = check_workflow(frontend, workflow, info)
    _close_dialogs(frontend)
    assert any(p.startswith("dialog:") and "InfinityStarNoSuchNode" in p for p in problems), problems
    assert any("InfinityStarNoSuchNode is not registered" in p for p in problems), problems


def test_a_stale_widget_layout_is_caught(frontend, info):
    """A workflow saved before the sampler gained a widget: its values no longer line up with the widgets."""
    path = next(p for p in WORKFLOWS if '"InfinityStarSampler"' in p.read_text())
    workflow = json.loads(path.read_text())
    sampler = next(n for n in workflow["nodes"] if n["type"] == "InfinityStarSampler")
    del sampler["widgets_values"][1]
    problems = check_workflow(frontend, workflow, info)
    where = f"node {sampler['id']} (InfinityStarSampler)"
    assert any(p.startswith(f"{where}: widgets ") for p in problems), problems
    assert any(p.startswith(f"{where}: saves widgets_values") for p in problems), problems


def test_a_value_the_server_refuses_is_caught(frontend, info):
    """A value that the offline model accepts (file combos take any name) but the server does not."""
    path = next(p for p in WORKFLOWS if '"InfinityStarModelLoader"' in p.read_text())
    workflow = json.loads(path.read_text())
    loader = next(n for n in workflow["nodes"] if n["type"] == "InfinityStarModelLoader")
    loader["widgets_values"][0] = "no_such_weights"
    problems = check_workflow(frontend, workflow, info)
    assert len(problems) == 1 and problems[0].startswith("server refused") and "no_such_weights" in problems[0], problems


def test_template_browser_lists_and_opens_the_workflows(frontend, server):
    names = sorted(p.stem for p in WORKFLOWS)
    assert sorted(server.get("/workflow_templates").get(PACK_FOLDER, [])) == names
    missing = [n for n in names if not (WORKFLOWS_DIR / f"{n}.jpg").is_file()]
    assert not missing, f"no thumbnail for {missing}: run workflows/tools/thumbnails.py"
    page = frontend.page
    _close_dialogs(frontend)
    mark = len(frontend.events)
    frontend.command("Comfy.BrowseTemplates")
    page.get_by_text(PACK_FOLDER, exact=True).first.click()
    # the card grid is virtual and loads images lazily: scroll the cards still waiting (or, when none of them is
    # rendered, the last rendered card) into view, and remember every card seen with its image decoded
    cards_loaded = """names => {
        const loaded = [], waiting = [];
        const card = name => document.querySelector(`[data-testid="template-workflow-${name}"]`);
        for (const name of names) {
            const c = card(name);
            const ok = c && [...c.querySelectorAll('img')].some(i => i.complete && i.naturalWidth > 0);
            (ok ? loaded : waiting).push(name);
        }
        const shown = waiting.map(card).filter(Boolean);
        if (shown.length) shown[0].scrollIntoView({block: "center"});
        else if (waiting.length) {
            const all = document.querySelectorAll('[data-testid^="template-workflow-"]');
            if (all.length) all[all.length - 1].scrollIntoView({block: "start"});
        }
        return loaded;
    }"""
    seen: set[str] = set()
    deadline = time.time() + 20
    while (pending := [n for n in names if n not in seen]) and time.time() < deadline:
        seen.update(page.evaluate(cards_loaded, pending))
        page.wait_for_timeout(200)
    assert not pending, f"no card or no decoded thumbnail for {pending}"
    failed = [text for kind, text in frontend.events[mark:] if kind == "http" and PACK_FOLDER in text]
    assert not failed, failed
    pick = names[0]
    page.get_by_test_id(f"template-workflow-{pick}").click()
    page.wait_for_function("() => !document.querySelector('[role=dialog]')", timeout=15_000)
    loaded = page.evaluate("() => window.app.graph._nodes.map(n => n.type)")
    expected = [n["type"] for n in json.loads((WORKFLOWS_DIR / f"{pick}.json").read_text())["nodes"]]
    assert sorted(loaded) == sorted(expected)
