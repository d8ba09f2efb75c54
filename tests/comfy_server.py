"""A real ComfyUI server for the host tests: ``main.py --cpu`` on 127.0.0.1 (a free port), loading this
repository as its only custom-node pack through an extra-model-paths file. Needs COMFYUI_PATH.

``frontend_page`` opens the server's own web frontend in a headless Chromium driven by Playwright (the system
browser: INFINITYSTAR_CHROMIUM, else chromium / chromium-browser / google-chrome on PATH; Playwright's own
browser download is not needed)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACK_FOLDER = "ComfyUI-InfinityStar"
START_TIMEOUT = 240  # first start compiles bytecode and creates the database


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, base: Path, log: Path, http_timeout: float):
        self.url, self.proc, self.base, self.log = url, proc, base, log
        self.http_timeout = http_timeout

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=self.http_timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict | None = None):
        data = json.dumps(payload or {}).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.http_timeout) as r:
                body = r.read()
                return r.status, (json.loads(body) if body else {})
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]


@contextlib.contextmanager
def running_server(base: Path, models_root: Path, http_timeout: float = 60) -> Iterator[Server]:
    """Start ComfyUI with ``base`` as its base directory and ``models_root`` as the infinitystar model folder;
    wait until it answers, yield it, and stop it."""
    (base / "custom_nodes").mkdir(exist_ok=True)  # --base-directory expects it
    packs = base / "packs"
    packs.mkdir(exist_ok=True)
    (packs / PACK_FOLDER).symlink_to(REPO, target_is_directory=True)
    config = base / "extra_model_paths.yaml"
    config.write_text(f"infinitystar_tests:\n  base_path: {base}\n  custom_nodes: {packs}\n"
                      f"  infinitystar: {models_root}\n")
    port = free_port()
    log = base / "server.log"
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--extra-model-paths-config", str(config),
           "--database-url", "sqlite:///:memory:", "--disable-all-custom-nodes",
           "--whitelist-custom-nodes", PACK_FOLDER]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=os.environ["COMFYUI_PATH"], stdout=out, stderr=subprocess.STDOUT, env=env)
    srv = Server(f"http://127.0.0.1:{port}", proc, base, log, http_timeout)
    try:
        deadline = time.time() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode}:\n{srv.log_tail()}")
            try:
                srv.get("/system_stats")
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"ComfyUI did not start in {START_TIMEOUT} s:\n{srv.log_tail()}")
                time.sleep(1)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


START_IMAGE_H_DIV_W = 160 / 96  # infinitystar_start.png: 96 wide, 160 high


def write_workflow_inputs(base: Path, runnable: bool = False) -> None:
    """The files the workflows name (a start image, a clip to continue, an upscale model) under those names.

    Default: enough for the previews and the server's validation, which only checks that the files exist.
    ``runnable``: what running the workflows needs: a noisy 16 fps clip of 81 frames (one whole 5 s clip) and a
    tiny Real-ESRGAN-compact 2x model.
    """
    import numpy as np
    from PIL import Image

    from infinitystar.video_io import write_mp4

    (base / "input").mkdir(exist_ok=True)
    y, x = np.mgrid[0:96, 0:160]
    image = np.stack([x * 255 // 160, y * 255 // 96, np.full_like(x, 128)], -1).astype(np.uint8)
    # the start image is portrait (h/w 5/3), so the i2v template's 'from start image' aspect shows in the output
    Image.fromarray(np.ascontiguousarray(image.transpose(1, 0, 2))).save(base / "input" / "infinitystar_start.png")
    frames = np.stack([np.roll(image, 2 * t, axis=1) for t in range(81 if runnable else 9)])
    if runnable:
        rng = np.random.default_rng(0)
        frames = np.clip(frames.astype(int) + rng.integers(-8, 8, frames.shape), 0, 255).astype(np.uint8)
    write_mp4(base / "input" / "infinitystar_clip.mp4", frames, fps=16)
    (base / "models" / "upscale_models").mkdir(parents=True, exist_ok=True)
    model = base / "models" / "upscale_models" / "RealESRGAN_x2plus.pth"
    if not runnable:
        model.write_bytes(b"")  # validated, never loaded
        return
    import torch
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(0)
    torch.save(Compact(num_in_ch=3, num_out_ch=3, num_feat=4, num_conv=1, upscale=2).state_dict(), model)


CHROMIUM_ENV = "INFINITYSTAR_CHROMIUM"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
# Headless in a container as root, offline: no sandbox, GPU, QUIC or background traffic.
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update")
FRONTEND_SETTINGS = {"Comfy.TutorialCompleted": True}  # no first-run template dialog over the canvas
READY_TIMEOUT_MS = 60_000


def find_chromium() -> str | None:
    """The Chromium binary to drive: INFINITYSTAR_CHROMIUM if set (None when it is not a file), else the
    first of CHROMIUM_NAMES on PATH."""
    value = os.environ.get(CHROMIUM_ENV)
    if value:
        path = Path(value).expanduser()
        return str(path) if path.is_file() else None
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


class Frontend:
    """A loaded ComfyUI page and what it reported: ``events`` holds (kind, text) with kind one of console
    message types (error, warning, ...), "pageerror" (an uncaught exception) or "http" (a response >= 400)."""

    def __init__(self, page, server: Server):
        self.page, self.server = page, server
        self.events: list[tuple[str, str]] = []

    def load(self, workflow: dict) -> None:
        """Load a UI-format workflow as the frontend does when a file is dropped on it."""
        self.page.evaluate("async wf => { await window.app.loadGraphData(wf) }", workflow)

    def command(self, command_id: str) -> None:
        self.page.evaluate("id => window.app.extensionManager.command.execute(id)", command_id)


@contextlib.contextmanager
def frontend_page(server: Server, chromium: str, viewport: tuple[int, int] = (1600, 1000),
                  settings: dict | None = None) -> Iterator[Frontend]:
    """Open ``server``'s frontend in headless Chromium with ``settings`` saved first; yield it once ``app.graph``
    exists, and close the browser (and Playwright's driver) on exit, also after a failure."""
    from playwright.sync_api import sync_playwright

    status, body = server.post("/settings", {**FRONTEND_SETTINGS, **(settings or {})})
    assert status == 200, body
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            front = Frontend(page, server)
            page.on("console", lambda msg: front.events.append((msg.type, msg.text)))
            page.on("pageerror", lambda exc: front.events.append(("pageerror", f"{exc}\n{exc.stack or ''}")))
            page.on("response", lambda r: r.status >= 400 and front.events.append(("http", f"{r.status} {r.url}")))
            page.goto(server.url + "/")
            page.wait_for_function("window.app && window.app.graph && window.app.extensionManager",
                                   timeout=READY_TIMEOUT_MS)
            yield front
        finally:
            browser.close()
