"""Writes the example workflows in ../ (UI format 0.4, as the ComfyUI frontend saves them).

The JSON files are what ships; this script only keeps them consistent. Widgets are given by name and laid out in
the frontend's order from the saved object_info snapshot (tests/data/object_info.json), so refresh that snapshot
first when a node changes (see tests/host/test_workflows_run.py), then run:

    python workflows/tools/build_workflows.py
"""
from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests"))

from workflow_graph import (  # noqa: E402
    VIRTUAL_NODES,
    input_type,
    is_widget,
    load_object_info,
    ordered_inputs,
    widget_slots,
)

PACK_ID = "infinitystar"  # registry id ([project] name)
PACK_VERSION = "0.1.0"
CORE_VERSION = "0.3.64"
FRONTEND_VERSION = "1.27.10"

MODEL_720P = "infinitystar_8b_720p_weights"
MODEL_480P = "infinitystar_8b_480p_weights"
MODEL_INTERACT = "InfinityStarInteract_24K_iters"
VAE = "infinitystar_videovae.pth"
TEXT_ENCODER = "text_encoder/flan-t5-xl-official"

FILES_NOTE = f"""### InfinityStar model files

Put the official files from [FoundationVision/InfinityStar](https://huggingface.co/FoundationVision/InfinityStar) in **`ComfyUI/models/infinitystar/`**, keeping the hub layout:

```
models/infinitystar/
  {MODEL_720P}/   6 shards + model.safetensors.index.json (720p, 5 s)
  {MODEL_480P}/   6 shards + index (480p, 5 s or 10 s)
  {MODEL_INTERACT}/   interact weights (only for InfinityStar Interact)
  {VAE}
  {TEXT_ENCODER}/   config, weights, spiece.model
```

No files yet? Queue the **InfinityStar Download Models** node once (then press **R** to refresh the lists), or, in a terminal inside the pack folder (custom_nodes/ComfyUI-InfinityStar; custom_nodes/infinitystar after a Manager install), run `python -m infinitystar download --variant 720p --dest ../../models/infinitystar` (Windows portable build, from the ComfyUI_windows_portable folder: `python_embeded\\python.exe ComfyUI\\custom_nodes\\ComfyUI-InfinityStar download --variant 720p --dest ComfyUI\\models\\infinitystar`). The transformer may also sit in `models/diffusion_models`, the tokenizer in `models/vae`, the text encoder folder in `models/text_encoders`.

Short on VRAM? weight_dtype **auto** already stores the blocks in fp8 on GPUs too small for bf16; set it to fp8_e4m3fn to force that, and **tiled** on the decoder (it also retries tiled by itself after running out of memory). Warnings show on the node that raised them."""

PROMPT_FOX = ("A red fox trots through a snowy birch forest at golden hour, its breath visible in the cold air, "
              "snowflakes drifting through warm backlight, the camera tracking smoothly alongside at eye level")
PROMPT_LIGHTHOUSE = ("Waves crash against a lighthouse on a rocky coast during a storm, dark clouds rolling "
                     "across the sky, spray glittering in the beam of light, slow aerial orbit around the tower")
PROMPT_I2V = ("The scene comes to life: leaves sway gently in the breeze, light flickers across the surfaces, "
              "the camera slowly pushes in")
PROMPT_IMAGE = ("A cozy reading nook by a rainy window, a cat asleep on a knitted blanket, warm lamp light, "
                "steam rising from a cup of tea, detailed photograph")
PROMPT_EXTEND = "The camera keeps moving forward as the scene continues naturally, same style and lighting"
PROMPT_STORY = ("A small sailboat glides out of the harbour at dawn, gulls circling above the mast, the calm water "
                "reflecting a pink sky",
                "The sailboat reaches the open sea as the wind picks up, waves slapping the hull, sunlight breaking "
                "through the clouds")

SIZES = {
    "InfinityStarModelLoader": [340, 154], "InfinityStarTextEncoderLoader": [340, 82],
    "InfinityStarVAELoader": [340, 82], "InfinityStarTextEncode": [420, 260], "InfinityStarSampler": [340, 382],
    "InfinityStarDecode": [250, 102], "InfinityStarEncode": [300, 150], "InfinityStarExtend": [320, 278],
    "InfinityStarInteractStart": [300, 150], "InfinityStarInteract": [320, 304],
    "CreateVideo": [220, 78], "SaveVideo": [420, 420], "SaveImage": [420, 420], "LoadImage": [300, 330],
    "LoadVideo": [300, 340], "ImageScaleBy": [280, 82],
    "UpscaleModelLoader": [300, 58], "ImageUpscaleWithModel": [240, 46], "MarkdownNote": [420, 420],
}


class Workflow:
    """A graph under construction; widgets by name, defaults from the node definitions."""

    def __init__(self, info: dict, seed: str):
        self.info = info
        self.id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"infinitystar/{seed}"))  # stable across rebuilds
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def node(self, node_type: str, pos, control: str = "fixed", **widgets) -> dict:
        node = {"id": len(self.nodes) + 1, "type": node_type, "pos": list(pos),
                "size": list(SIZES.get(node_type, [300, 100])), "flags": {}, "order": 0, "mode": 0,
                "inputs": [], "outputs": []}
        if node_type in VIRTUAL_NODES:
            node.update(properties={}, widgets_values=[widgets.pop("text")], color="#432", bgcolor="#653")
            self.nodes.append(node)
            return node
        info = self.info[node_type]
        for name, section, spec, opts in ordered_inputs(self.info, node_type):
            if not is_widget(spec, opts):
                entry = {"name": name, "type": spec[0], "link": None}
                if section == "optional":
                    entry["shape"] = 7
                node["inputs"].append(entry)
        for slot, (out_type, out_name) in enumerate(zip(info["output"], info["output_name"])):
            node["outputs"].append({"name": out_name, "type": out_type, "links": [], "slot_index": slot})
        values = []
        for name, kind in widget_slots(self.info, node_type):
            if kind == "control":
                values.append(control)
            elif kind == "upload":
                values.append("image")
            elif name in widgets:
                values.append(widgets.pop(name))
            else:
                values.append(self._default(node_type, name))
        if widgets:
            raise KeyError(f"{node_type} has no widgets {sorted(widgets)}")
        ours = node_type.startswith("InfinityStar")
        node["properties"] = {"Node name for S&R": node_type, "cnr_id": PACK_ID if ours else "comfy-core",
                              "ver": PACK_VERSION if ours else CORE_VERSION}
        node["widgets_values"] = values
        self.nodes.append(node)
        return node

    def _default(self, node_type: str, name: str):
        for n, _, spec, opts in ordered_inputs(self.info, node_type):
            if n == name:
                if "default" in opts:
                    return opts["default"]
                options = spec[0] if isinstance(spec[0], list) else opts.get("options", [])
                if options:
                    return options[0]
        raise KeyError(f"{node_type}.{name} has no default; give a value")

    def link(self, src: dict, out: int, dst: dict, name: str) -> None:
        link_id = len(self.links) + 1
        out_type = src["outputs"][out]["type"]
        slot = next((i for i, inp in enumerate(dst["inputs"]) if inp["name"] == name), None)
        if slot is None:  # a widget fed by a link: the frontend lists widget inputs after the sockets, in order
            widgets = [(n, spec) for n, _, spec, opts in ordered_inputs(self.info, dst["type"])
                       if is_widget(spec, opts)]
            for widget, spec in widgets[:[n for n, _ in widgets].index(name) + 1]:
                if not any(inp["name"] == widget for inp in dst["inputs"]):
                    kind = out_type if widget == name else input_type(spec)
                    dst["inputs"].append({"name": widget, "type": kind, "widget": {"name": widget}, "link": None})
            slot = next(i for i, inp in enumerate(dst["inputs"]) if inp["name"] == name)
        dst["inputs"][slot]["link"] = link_id
        src["outputs"][out]["links"].append(link_id)
        self.links.append([link_id, src["id"], out, dst["id"], slot, out_type])

    def group(self, title: str, bounding, color: str = "#3f789e") -> None:
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": list(bounding), "color": color,
                            "font_size": 24, "flags": {}})

    def _orders(self) -> None:
        """Execution order as the frontend stores it: a topological order, sources first."""
        deps = {n["id"]: {link[1] for link in self.links if link[3] == n["id"]} for n in self.nodes}
        done: list[int] = []
        while len(done) < len(self.nodes):
            ready = sorted(i for i, d in deps.items() if i not in done and d <= set(done))
            done.append(ready[0])
        for n in self.nodes:
            n["order"] = done.index(n["id"])

    def to_json(self) -> dict:
        self._orders()
        return {"id": self.id, "revision": 0, "last_node_id": len(self.nodes), "last_link_id": len(self.links),
                "nodes": self.nodes, "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": 0.75, "offset": [60, 80]}, "frontendVersion": FRONTEND_VERSION},
                "version": 0.4}


def _loaders(wf: Workflow, model_name: str, x: int = 0, y: int = 0):
    model = wf.node("InfinityStarModelLoader", (x, y), model_name=model_name)
    text_encoder = wf.node("InfinityStarTextEncoderLoader", (x, y + 190), encoder_name=TEXT_ENCODER)
    vae = wf.node("InfinityStarVAELoader", (x, y + 310), vae_name=VAE)
    wf.group("Models", (x - 20, y - 50, 380, 460))
    return model, text_encoder, vae


def _prompt(wf: Workflow, text_encoder: dict, prompt: str, pos=(400, 0), duration_tag: str = "auto") -> dict:
    enc = wf.node("InfinityStarTextEncode", pos, prompt=prompt, negative_prompt="", duration_tag=duration_tag)
    wf.link(text_encoder, 0, enc, "text_encoder")
    return enc


def _sampler(wf: Workflow, model: dict, cond: dict, vae: dict, pos=(860, 0), **widgets) -> dict:
    """The sampler, with the tokenizer connected: colour previews (and the start image's encode in I2V)."""
    sampler = wf.node("InfinityStarSampler", pos, control="randomize", **{"seed": 41, **widgets})  # a new video per queue
    wf.link(model, 0, sampler, "model")
    wf.link(cond, 0, sampler, "positive")
    wf.link(vae, 0, sampler, "vae")
    return sampler


def _decode(wf: Workflow, vae: dict, tokens: dict, x: int = 1240) -> dict:
    decode = wf.node("InfinityStarDecode", (x, 0), tiled=False)
    wf.link(vae, 0, decode, "vae")
    wf.link(tokens, 0, decode, "tokens")
    return decode


def _note(wf: Workflow, this_workflow: str) -> None:
    """The model-files note every workflow carries, plus what this one does."""
    wf.node("MarkdownNote", (0, 480), text=FILES_NOTE + "\n\n**This workflow:** " + this_workflow)


def _encoded_clip(wf: Workflow, vae: dict, node_type: str, **widgets) -> dict:
    """Load Video -> an encoding node (Encode, Interact Start) with the tokenizer. The VIDEO goes straight in: the
    node decodes only the frames it keeps, at the file's own rate (Get Video Components would decode every frame to
    float32 first)."""
    video = wf.node("LoadVideo", (440, 320), file="infinitystar_clip.mp4")
    encode = wf.node(node_type, (770, 460), resolution="480p", aspect_ratio="from input", seed=0, **widgets)
    wf.link(vae, 0, encode, "vae")
    wf.link(video, 0, encode, "video")
    return encode


def _save_video(wf: Workflow, vae: dict, tokens: dict, prefix: str, x: int = 1240, upscale=None) -> None:
    decode = _decode(wf, vae, tokens, x)
    frames, fx = (decode, 0), x + 290
    if upscale is not None:
        frames, fx = upscale(decode, fx)
    create = wf.node("CreateVideo", (fx, 0), fps=16.0)
    wf.link(frames[0], frames[1], create, "images")
    wf.link(decode, 1, create, "fps")
    save = wf.node("SaveVideo", (fx + 260, 0), filename_prefix=prefix, format="auto", codec="auto")
    wf.link(create, 0, save, "video")


def t2v(info: dict, variant: str, duration: str) -> dict:
    wf = Workflow(info, f"t2v-{variant}-{duration}")
    model, text_encoder, vae = _loaders(wf, MODEL_720P if variant == "720p" else MODEL_480P)
    cond = _prompt(wf, text_encoder, PROMPT_FOX if variant == "720p" else PROMPT_LIGHTHOUSE)
    sampler = _sampler(wf, model, cond, vae, duration=duration)
    _save_video(wf, vae, sampler, f"video/infinitystar_t2v_{variant}")
    _note(wf, "text-to-video, 5 s (81 frames, 16 fps) at 720p with the 720p weights. resolution=auto follows the "
              "weights; the 720p model makes 5 s only." if variant == "720p" else
              "text-to-video, 10 s (161 frames, 16 fps) at 480p; only the 480p weights make 10 s. Set duration to "
              "5 s for a quicker clip.")
    return wf.to_json()


def i2v(info: dict) -> dict:
    wf = Workflow(info, "i2v-720p")
    model, text_encoder, vae = _loaders(wf, MODEL_720P)
    cond = _prompt(wf, text_encoder, PROMPT_I2V)
    image = wf.node("LoadImage", (440, 320), image="infinitystar_start.png")
    sampler = _sampler(wf, model, cond, vae, duration="5 s", aspect_ratio="from start image")
    wf.link(image, 0, sampler, "start_image")
    _save_video(wf, vae, sampler, "video/infinitystar_i2v_720p")
    _note(wf, (
        "image-to-video at 720p, 5 s. Load your start frame in *Load Image*; aspect_ratio 'from start image' takes "
        "the model's aspect nearest to it (portrait photos stay portrait), the frame is resized to cover it and "
        "center-cropped, encoded by the video tokenizer and used as the first frame. To continue a clip from its "
        "end, give the Sampler its frames and set start_frame to last."))
    return wf.to_json()


def t2i(info: dict) -> dict:
    wf = Workflow(info, "t2i-720p")
    model, text_encoder, vae = _loaders(wf, MODEL_720P)
    cond = _prompt(wf, text_encoder, PROMPT_IMAGE)
    sampler = _sampler(wf, model, cond, vae, duration="image", aspect_ratio="4:3")
    decode = _decode(wf, vae, sampler)
    save = wf.node("SaveImage", (1530, 0), filename_prefix="infinitystar_t2i")
    wf.link(decode, 0, save, "images")
    _note(wf, (
        "one image (duration = image). The maintainers note that InfinityStar was "
        "trained on video after its image initialisation, so still images are weaker than a dedicated "
        "text-to-image model."))
    return wf.to_json()


def _continuation(wf: Workflow, **widgets):
    """The 480p loaders, the continuation prompt and an encoded clip: (model, prompt, tokenizer, Encode)."""
    model, text_encoder, vae = _loaders(wf, MODEL_480P)
    cond = _prompt(wf, text_encoder, PROMPT_EXTEND)
    return model, cond, vae, _encoded_clip(wf, vae, "InfinityStarEncode", **widgets)


def extend(info: dict) -> dict:
    wf = Workflow(info, "extend-480p")
    model, cond, vae, encode = _continuation(wf, keep="last 5 s")
    ext = wf.node("InfinityStarExtend", (860, 0), clips=1, seed=41)
    wf.link(model, 0, ext, "model")
    wf.link(cond, 0, ext, "positive")
    wf.link(encode, 0, ext, "tokens")
    wf.link(vae, 0, ext, "vae")  # colour previews
    _save_video(wf, vae, ext, "video/infinitystar_extended", x=1240)
    _note(wf, (
        "continues a clip by 5 s clips (set *clips*) with the 480p weights. Load a clip of at least 5 s at "
        "any frame rate (e.g. an InfinityStar video): Encode keeps its last 5 s (*keep*), 81 frames picked "
        "at 16 fps from the clip's own rate as the official reader picks them (only those frames are decoded), "
        "so the new clips start where the clip ends, whatever its length (*all whole clips* keeps every whole 5 s "
        "clip from the start instead, dropping up to 5 s at the end). The encoded clip stays bit for bit; Extend adds the new ones without replaying their "
        "draws, so a seed gives another clip than the official 5 s -> 10 s continuation (the *v2v* workflow)."))
    return wf.to_json()


def v2v(info: dict) -> dict:
    wf = Workflow(info, "v2v-480p-10s")
    model, cond, vae, encode = _continuation(wf)
    sampler = _sampler(wf, model, cond, vae, duration="10 s")
    wf.link(encode, 0, sampler, "start_tokens")
    _save_video(wf, vae, sampler, "video/infinitystar_v2v_480p")
    _note(wf, (
        "the official video continuation (480p script): the clip is encoded (81 frames per 5 s, picked at 16 fps "
        "from its own rate), its first 5 s are teacher-forced while every step still draws, and the 480p model "
        "adds the next 5 s: a 10 s video. Resolution and aspect ratio come from the encoded tokens. To continue "
        "by more clips, use the *extend* workflow."))
    return wf.to_json()


def interact(info: dict) -> dict:
    wf = Workflow(info, "interact-480p")
    model, text_encoder, vae = _loaders(wf, MODEL_INTERACT)
    tokens = _encoded_clip(wf, vae, "InfinityStarInteractStart")
    for text, pos, prompt_pos in zip(PROMPT_STORY, ((860, 0), (1360, 0)), ((400, 0), (1360, 360))):
        cond = _prompt(wf, text_encoder, text, pos=prompt_pos, duration_tag="interact")
        clip = wf.node("InfinityStarInteract", pos, seed=41)
        wf.link(model, 0, clip, "model")
        wf.link(cond, 0, clip, "positive")
        wf.link(tokens, 0, clip, "tokens")
        wf.link(vae, 0, clip, "vae")  # colour previews
        tokens = clip
    _save_video(wf, vae, tokens, "video/infinitystar_interact", x=1720)
    _note(wf, (
        "InfinityStar-Interact, 480p: a video continued 5 s at a time, each clip under its own prompt, with the "
        "interact weights (InfinityStarInteract_24K_iters). *Interact Start* encodes the last 5 s (81 frames "
        "picked at 16 fps from the clip's own rate) of the loaded clip; each *InfinityStar Interact* node adds 80 frames under its prompt (copy one "
        "with its Text Encode for every further prompt). Decode gives the whole story. Defaults are the official "
        "script's: plain CFG 3, tau 0.5, the same seed for every clip, prompts tagged 5 s without the closing "
        "phrase (Text Encode duration_tag = interact)."))
    return wf.to_json()


def upscale(info: dict) -> dict:
    wf = Workflow(info, "t2v-480p-upscale")
    model, text_encoder, vae = _loaders(wf, MODEL_480P)
    cond = _prompt(wf, text_encoder, PROMPT_FOX)
    sampler = _sampler(wf, model, cond, vae, duration="5 s")

    def chain(decode, x):
        loader = wf.node("UpscaleModelLoader", (x, 200), model_name="RealESRGAN_x2plus.pth")
        up = wf.node("ImageUpscaleWithModel", (x, 0))
        wf.link(loader, 0, up, "upscale_model")
        wf.link(decode, 0, up, "image")
        scale = wf.node("ImageScaleBy", (x + 260, 0), upscale_method="lanczos", scale_by=0.75)
        wf.link(up, 0, scale, "image")
        wf.group("Upscale 848x480 -> 1272x720", (x - 20, -50, 580, 330))
        return (scale, 0), x + 560

    _save_video(wf, vae, sampler, "video/infinitystar_t2v_480p_upscaled", upscale=chain)
    _note(wf, (
        "480p text-to-video, then every frame goes through a 2x upscale model "
        "(put e.g. `RealESRGAN_x2plus.pth` from github.com/xinntao/Real-ESRGAN/releases in `models/upscale_models`) and *Upscale Image By* 0.75, giving "
        "1272x720. Without an upscale model, delete the two model nodes and set *Upscale Image By* to 1.5."))
    return wf.to_json()


WORKFLOWS = {
    "infinitystar_t2v_720p_5s": lambda info: t2v(info, "720p", "5 s"),
    "infinitystar_t2v_480p_10s": lambda info: t2v(info, "480p", "10 s"),
    "infinitystar_i2v_720p": i2v,
    "infinitystar_t2i": t2i,
    "infinitystar_extend_video_480p": extend,
    "infinitystar_v2v_480p_10s": v2v,
    "infinitystar_interact_480p": interact,
    "infinitystar_t2v_480p_upscale": upscale,
}


def main() -> None:
    info = load_object_info()
    for name, build in WORKFLOWS.items():
        path = REPO / "workflows" / f"{name}.json"
        path.write_text(json.dumps(build(info), indent=2) + "\n", encoding="utf-8", newline="\n")
        print(path.relative_to(REPO))


if __name__ == "__main__":
    main()
