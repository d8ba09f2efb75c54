"""Writes the template-browser thumbnails ../<name>.jpg: each example workflow as the ComfyUI frontend draws it.

ComfyUI shows ``<name>.jpg`` beside ``<name>.json`` as the card image under Custom Nodes in its template browser
(a square card, the image cropped to cover it). This script starts the real ComfyUI server with this repository
as its pack (tiny random weights, so the model lists hold the official names), opens the frontend in headless
Chromium (the setup of tests/host/test_workflows_browser.py), loads each workflow, frames its nodes and saves a
JPEG. Run it with ComfyUI's Python after changing a workflow:

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-python workflows/tools/thumbnails.py [name ...]

Needs Playwright (``pip install playwright``) and a Chromium (INFINITYSTAR_CHROMIUM or chromium on PATH).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from comfy_server import find_chromium, frontend_page, running_server, write_workflow_inputs  # noqa: E402
from workflow_graph import workflow_files  # noqa: E402

SIZE = 512  # square, as the template cards are
VIEWPORT = 1400  # CSS pixels
REGION = (80, 80, 1240)  # left, top, side of the square shot: clear of the tab bar and the zoom buttons
MARGIN = 30  # canvas units around the framed nodes
QUALITY = 80
MAX_BYTES = 100_000
SETTINGS = {"Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
            "LiteGraph.Canvas.MinFontSizeForLOD": 0}  # draw full detail however small the nodes get
HIDE = ".workflow-tabs, .comfy-menu-hamburger, .p-buttongroup { visibility: hidden !important; }"

# The square shows at least WIDTH_SHARE of the graph's width, centred on the sampler (the heart of every
# workflow), and the full height of the nodes in that span, so that the nodes stay legible on a card.
WIDTH_SHARE = 0.55
FRAME = """([margin, share, [left, top, side]]) => {
    const canvas = window.app.canvas, nodes = window.app.graph._nodes;
    const boxes = nodes.map(n => n.getBounding()).concat((window.app.graph._groups || []).map(g => g._bounding));
    const x0 = Math.min(...boxes.map(b => b[0])) - margin, y0 = Math.min(...boxes.map(b => b[1])) - margin;
    const x1 = Math.max(...boxes.map(b => b[0] + b[2])) + margin;
    const y1 = Math.max(...boxes.map(b => b[1] + b[3])) + margin;
    const span = Math.min(Math.max(y1 - y0, share * (x1 - x0)), x1 - x0);
    const heart = nodes.find(n => n.type === "InfinityStarSampler") || nodes.find(n => n.type === "InfinityStarExtend");
    const hb = heart ? heart.getBounding() : [x0, 0, x1 - x0, 0];
    const cx = Math.min(Math.max(hb[0] + hb[2] / 2, x0 + span / 2), x1 - span / 2);
    const seen = boxes.filter(b => b[0] < cx + span / 2 && b[0] + b[2] > cx - span / 2);
    const v0 = Math.min(...seen.map(b => b[1])) - margin, v1 = Math.max(...seen.map(b => b[1] + b[3])) + margin;
    const scale = side / Math.max(span, v1 - v0);
    canvas.ds.scale = scale;
    canvas.ds.offset = [(left + side / 2) / scale - cx, (top + side / 2) / scale - (v0 + v1) / 2];
    canvas.setDirty(true, true);
    canvas.draw(true, true);
}"""


def _jpeg(png: bytes) -> bytes:
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB").resize((SIZE, SIZE), Image.LANCZOS)
    for quality in range(QUALITY, 40, -10):
        out = io.BytesIO()
        image.save(out, "JPEG", quality=quality, optimize=True, progressive=True)
        if out.tell() < MAX_BYTES:
            break
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="workflow names (default: all workflows/*.json)")
    args = parser.parse_args(argv)
    paths = [p for p in workflow_files() if not args.names or p.stem in args.names]
    chromium = find_chromium()
    if chromium is None:
        sys.exit("no Chromium found: set INFINITYSTAR_CHROMIUM or put chromium on PATH")

    from infinitystar.tiny import write_tiny_models

    with tempfile.TemporaryDirectory(prefix="infinitystar_thumbs_") as tmp:
        base = Path(tmp) / "comfy"
        base.mkdir()
        write_workflow_inputs(base)
        models = write_tiny_models(Path(tmp) / "models", seed=0)
        with running_server(base, models["root"]) as server, \
                frontend_page(server, chromium, (VIEWPORT, VIEWPORT), SETTINGS) as front:
            front.command("Workspace.ToggleFocusMode")  # canvas only: no menus or side bars
            front.page.add_style_tag(content=HIDE)
            left, top, side = REGION
            for path in paths:
                front.load(json.loads(path.read_text(encoding="utf-8")))
                front.page.wait_for_timeout(800)  # image and video previews
                front.page.evaluate(FRAME, [MARGIN, WIDTH_SHARE, list(REGION)])
                front.page.wait_for_timeout(300)  # DOM widgets follow the canvas on the next frame
                data = _jpeg(front.page.screenshot(clip={"x": left, "y": top, "width": side, "height": side}))
                out = path.with_suffix(".jpg")
                out.write_bytes(data)
                print(f"{out.relative_to(REPO)} ({len(data) // 1024} KB)")


if __name__ == "__main__":
    main()
