"""The pack inside a real ComfyUI, in-process on the CPU: node schemas as /object_info serves them, and bad
input refused with a clear message before anything loads. Needs COMFYUI_PATH (see conftest.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from node_kit import SMALL, run

# ---------------------------------------------------------------------------------------------- schemas

def test_every_schema_converts_like_object_info(pack):
    import asyncio

    ext = asyncio.run(pack.comfy_entrypoint())
    node_list = asyncio.run(ext.get_node_list())
    assert {n.GET_SCHEMA().node_id for n in node_list} == {n.__name__ for n in node_list}
    listed = json.loads((Path(pack.__file__).parents[1] / "node_list.json").read_text())  # for ComfyUI-Manager
    assert listed == {n.GET_SCHEMA().node_id: n.GET_SCHEMA().display_name for n in node_list}
    for node in node_list:
        schema = node.GET_SCHEMA()
        info = node.GET_NODE_INFO_V1()  # what /object_info serves
        assert info["name"].startswith("InfinityStar") and info["category"].startswith("InfinityStar/")
        assert schema.description, node
        for inp in schema.inputs:
            assert inp.tooltip, f"{schema.node_id}.{inp.id} has no tooltip"
        assert len(info["output_tooltips"]) == len(schema.outputs) and all(info["output_tooltips"]), node
        sockets = {**info["input"]["required"], **info["input"].get("optional", {})}
        assert set(sockets) == {i.id for i in schema.inputs}


def test_custom_socket_types_link_by_name(pack):
    info = {n.__name__: n.GET_NODE_INFO_V1() for n in pack.NODES}
    assert info["InfinityStarModelLoader"]["output"] == ["INFINITYSTAR_MODEL"]
    assert info["InfinityStarSampler"]["input"]["required"]["model"][0] == "INFINITYSTAR_MODEL"
    assert info["InfinityStarSampler"]["output"] == ["INFINITYSTAR_TOKENS"]
    assert info["InfinityStarDecode"]["output"] == ["IMAGE", "FLOAT"]


def test_unsupported_duration_fails_before_loading(pack, comfy_dirs, core):
    CheckpointInfo = core("checkpoint").CheckpointInfo
    TRANSFORMER_PRESETS = core("config").TRANSFORMER_PRESETS

    sampler = pack.sampling.InfinityStarSampler
    assert isinstance(sampler.validate_inputs(resolution="720p", duration="10 s"), str)
    assert sampler.validate_inputs(resolution="480p", duration="10 s") is True

    class Untouchable:  # any use of the patcher would mean something started loading
        def __getattr__(self, name):
            raise AssertionError(f"patcher.{name} used before validation")

    info = CheckpointInfo("720p", TRANSFORMER_PRESETS["8b"], torch.bfloat16, Path("x"))
    model = pack.types.LoadedTransformer(Untouchable(), info, torch.float32, "sdpa")
    with pytest.raises(ValueError, match="trained for durations"):
        run(sampler, model=model, positive=None, duration="10 s", seed=0, **{**SMALL, "resolution": "auto"})


def test_sampler_checks_the_inputs_its_validation_takes_over(pack):
    """Naming resolution and duration in validate_inputs switches ComfyUI's own check of them off, so values that
    are not among the choices (an API prompt) must be refused there, not end in a KeyError inside execute."""
    sampler = pack.sampling.InfinityStarSampler
    assert "resolution is '1080p', which this node does not offer" in sampler.validate_inputs(resolution="1080p",
                                                                                              duration="5 s")
    assert "duration is '7 s', which this node does not offer" in sampler.validate_inputs(resolution="480p",
                                                                                          duration="7 s")
    assert "5 s clips only" in sampler.validate_inputs(resolution="720p", duration="10 s")


def test_a_guidance_schedule_is_checked_when_queued(pack):
    """Sampler, Extend and Interact refuse a typed schedule that is no list of numbers >= 0 in validate_inputs
    (before the models load), and take one that is, or none (a link: None)."""
    for node in (pack.sampling.InfinityStarSampler, pack.video.InfinityStarExtend, pack.interact.InfinityStarInteract):
        assert node.validate_inputs(guidance_schedule="34, 20; 10") is True, node
        assert node.validate_inputs(guidance_schedule="") is True and node.validate_inputs() is True, node
        assert "write numbers separated by commas" in node.validate_inputs(guidance_schedule="34, lots"), node
        assert "finite number >= 0" in node.validate_inputs(guidance_schedule="nan"), node


def test_every_dropdown_value_is_checked_when_queued(pack, comfy_dirs):
    """ComfyUI 0.3.x does not check a V3 dropdown's value, so an API prompt's typo reached execute as a KeyError or
    was taken silently as a default: every Combo of every node must be refused by its validate_inputs with a message
    that names the input, and every offered value accepted."""
    import inspect

    from comfy_api.latest import io

    checked = 0
    for node in pack.NODES:
        combos = {i.id: list(i.options) for i in node.define_schema().inputs if isinstance(i, io.Combo.Input)}
        if not combos:
            continue
        params = inspect.signature(node.validate_inputs).parameters
        assert set(combos) <= set(params), f"{node.__name__}.validate_inputs leaves {set(combos) - set(params)} out"
        required = {n: (combos[n] or ["no_such_choice"])[0] for n, p in params.items()
                    if p.default is inspect.Parameter.empty}  # file lists may be empty (no tokens saved yet)
        for name, options in combos.items():
            for value in options:
                assert node.validate_inputs(**{**required, name: value}) is True, (node.__name__, name, value)
            why = node.validate_inputs(**{**required, name: "no_such_choice"})
            assert isinstance(why, str) and (name in why or "no_such_choice" in why), (node.__name__, name, why)
            checked += 1
    assert checked >= 20


def test_frames_are_checked_and_encoded_within_a_memory_estimate(pack, loaded, monkeypatch):
    """Encode: under 5 s of frames (2-79 at 16 fps) is refused with what to do instead of silently becoming image
    tokens; grey frames are used as RGB; the tokenizer is loaded with an estimate of the encode's memory (as ComfyUI's VAE encode asks
    for), so ComfyUI can evict what it needs; Interact Start refuses a short reference before loading."""
    host = pack.host
    asked, real = [], host.loaded
    monkeypatch.setattr(host, "loaded", lambda patcher, memory_required=0, **kw: asked.append(memory_required)
                        or real(patcher, memory_required, **kw))
    encode = dict(vae=loaded["vae"], resolution="0.06M", aspect_ratio="16:9", seed=5)
    with pytest.raises(ValueError, match=r"Encode got 40 frames at 16 fps \(2.50 s\): give it one frame"):
        run(pack.video.InfinityStarEncode, images=torch.rand(40, 64, 96, 3), **encode)
    with pytest.raises(ValueError, match=r"Encode got 149 frames at 30 fps \(4.97 s\)"):  # 81 frames, < 5 s
        run(pack.video.InfinityStarEncode, images=torch.rand(149, 64, 96, 3), fps=30.0, **encode)
    with pytest.raises(ValueError, match="last 5 s of a video"):
        run(pack.interact.InfinityStarInteractStart, images=torch.rand(40, 64, 96, 3), **encode)
    assert asked == []
    grey = torch.rand(1, 64, 96, 1, generator=torch.Generator().manual_seed(3))
    a = run(pack.video.InfinityStarEncode, images=grey, **encode)[0]
    b = run(pack.video.InfinityStarEncode, images=grey.expand(-1, -1, -1, 3), **encode)[0]
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))
    assert len(asked) == 2 and all(m > 0 for m in asked)
    clip = run(pack.video.InfinityStarEncode, images=torch.rand(85, 64, 96, 3), **encode)[0]  # 81 used
    assert clip.frames == 81 and asked[-1] > asked[0]


def test_frames_at_another_rate_are_picked_as_the_official_reader_picks_them(pack, loaded, core):
    """Encode and Interact Start given the video's fps take 81 frames over 5 s at 16 fps as the official readers do
    (V2V: np.linspace(0, ceil(32 * 5) - 1, 81) over the first 5 s; interact: over the last 5 s), so a 32 fps video is
    not continued at half speed; equal to the core encode of exactly those frames."""
    pipeline, interact = core("pipeline"), core("interact")
    image_to_uint8 = pack.sampling.image_to_uint8
    video = torch.rand(170, 64, 96, 3, generator=torch.Generator().manual_seed(8))  # 5.3 s at 32 fps
    encode = dict(vae=loaded["vae"], resolution="0.06M", aspect_ratio="16:9", seed=5, fps=32.0)
    tokens = run(pack.video.InfinityStarEncode, images=video, **encode)[0]
    story = run(pack.interact.InfinityStarInteractStart, images=video, **encode)[0]
    first = torch.from_numpy(np.linspace(0, 159, 81, dtype=int))
    last = torch.from_numpy(np.linspace(10, 169, 81, dtype=int))  # ceil(32 * (5.3125 - 5)) = 10
    schedule = pipeline.resolve_schedule("0.06M", "16:9", frames=161)
    with pack.host.loaded(loaded["vae"].patcher) as tokenizer:
        expect = pipeline.encode_video(tokenizer, image_to_uint8(video[first]), schedule, seed=5, clips=1)
        expect_story = interact.start(tokenizer, image_to_uint8(video[last]), pn="0.06M", aspect="16:9", seed=5)
    assert tokens.frames == 81 and all(torch.equal(a, b) for a, b in zip(tokens.bits, expect.bits))
    assert torch.equal(story.summed_codes, expect_story.summed_codes)
    at16 = run(pack.video.InfinityStarEncode, images=video, **{**encode, "fps": 16.0})[0]  # read as 10.6 s: 2 clips
    assert at16.frames == 161


def test_extend_refuses_a_story_before_loading(pack, loaded, core):
    """Tokens Extend cannot continue (an interact story) are refused before the transformer loads."""
    tokens = core("pipeline").Tokens([], torch.zeros(1, 64, 21, 3, 5), "0.06M", 9 / 16, 81, 0, kind="interact")

    class Untouchable:  # any use of the patcher would mean something started loading
        def __getattr__(self, name):
            raise AssertionError(f"patcher.{name} used before the tokens were checked")

    model = pack.types.LoadedTransformer(Untouchable(), loaded["model"].info, torch.float32, "sdpa")
    with pytest.raises(ValueError, match="interact story"):
        run(pack.video.InfinityStarExtend, model=model, positive=loaded["cond"], tokens=tokens, clips=1, seed=1,
            guidance_scale=34.0, apg_threshold=0.05, use_plain_cfg=False, tau_video=0.4)
    for clips in (0, 9, 10**7):  # a linked clips value skips the widget's 1..8 (10^7 clips: ~140 GB of schedule)
        with pytest.raises(ValueError, match=f"clips {clips} is outside 1..8"):
            run(pack.video.InfinityStarExtend, model=model, positive=loaded["cond"], tokens=tokens, clips=clips,
                seed=1, guidance_scale=34.0, apg_threshold=0.05, use_plain_cfg=False, tau_video=0.4)


def test_tokenizer_auto_dtype_is_never_fp16(pack, comfy, monkeypatch):
    """auto: bf16 where the GPU has it (the official decode runs under bf16 autocast), else fp32, not fp16."""
    host = pack.host
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(comfy, "is_device_cpu", lambda device: False)
    monkeypatch.setattr(comfy, "should_use_fp16", lambda *a, **k: True)
    for bf16, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(comfy, "should_use_bf16", lambda *a, bf16=bf16, **k: bf16)
        assert host.resolve_compute_dtype("auto", gpu, fp16_fallback=False) == want
    assert host.resolve_compute_dtype("fp16", gpu, fp16_fallback=False) == torch.float16  # when chosen


def test_start_image_without_vae_is_refused(pack, loaded):
    with pytest.raises(ValueError, match="vae"):
        run(pack.sampling.InfinityStarSampler, model=loaded["model"], positive=loaded["cond"], duration="5 s",
            seed=0, start_image=torch.rand(1, 64, 64, 3), **SMALL)


def test_a_too_long_negative_prompt_is_refused_before_the_encoder_loads(pack, loaded, monkeypatch):
    """The tokenizer alone tells that a negative prompt is longer than the prompt: the node refuses it without
    loading T5 (an error after loading used to unload it as well, so the next queue loaded it again)."""
    loads = []
    monkeypatch.setattr(pack.host.mm, "load_models_gpu", lambda *a, **k: loads.append(a))
    with pytest.raises(ValueError, match="negative prompt is .* tokens but the .* prompt is only"):
        run(pack.conditioning.InfinityStarTextEncode, text_encoder=loaded["te"], prompt="a fox",
            negative_prompt=" ".join(["blurry, low quality"] * 20), duration_tag="auto")
    assert loads == []
