"""The pack inside a real ComfyUI, in-process on the CPU: every node run on the tiny checkpoints, chained into core
nodes, previews and interrupts (partial loads and memory plans: test_nodes_memory.py). Needs COMFYUI_PATH (see
conftest.py)."""
from __future__ import annotations

import gc
import os
import shutil
import types
from pathlib import Path

import pytest
import torch
from node_kit import SMALL, run


def _kv_caches_alive(ScaleKVCache):
    return [c for c in gc.get_objects() if type(c) is ScaleKVCache and c.keys()]  # type(): isinstance trips lazy modules


def _stray_tensors(module: torch.nn.Module) -> list[str]:
    """Tensor-valued attributes that are neither parameters nor buffers (a cache left on the module)."""
    found = []
    for name, sub in module.named_modules():
        for attr, value in vars(sub).items():
            if attr.startswith("_"):
                continue
            if isinstance(value, torch.Tensor) or (isinstance(value, (list, tuple, dict)) and any(
                    isinstance(v, torch.Tensor) for v in (value.values() if isinstance(value, dict) else value))):
                found.append(f"{name}.{attr}")
    return found


# ---------------------------------------------------------------------------------------------- execution

def test_download_node_copies_from_local_source(pack, comfy_dirs, tmp_path, monkeypatch):
    import folder_paths

    registered = folder_paths.folder_names_and_paths["infinitystar"][0]
    folder_paths.add_model_folder_path("infinitystar", str(tmp_path), is_default=True)
    try:
        node = pack.loaders.InfinityStarDownloadModels
        before = node.fingerprint_inputs(variant="480p", components="vae", local_source="")
        # pasted with quotes ("Copy as path") and a ~ for the home folder, as a shell would have taken them
        monkeypatch.setenv("HOME", str(comfy_dirs["models"].parent))
        quoted = f' "~/{comfy_dirs["models"].name}" '
        folder = run(node, variant="480p", components="vae", local_source=quoted)[0]
        assert folder == str(tmp_path) and (tmp_path / "infinitystar_videovae.pth").is_file()
        after = node.fingerprint_inputs(variant="480p", components="vae", local_source="")
        assert after != before  # the files on disk are part of the cache key: deleting them makes it run again
        (tmp_path / "infinitystar_videovae.pth").rename(tmp_path / "moved.pth")
        assert node.fingerprint_inputs(variant="480p", components="vae", local_source="") == before
        partial = tmp_path.parent / f"{tmp_path.name}_partial_source"  # everything but the text encoder
        shutil.copytree(comfy_dirs["models"], partial, ignore=shutil.ignore_patterns("text_encoder"))
        with pytest.raises(FileNotFoundError, match=r"holds no text_encoder .*nothing copied"):
            run(node, variant="480p", components="all", local_source=str(partial))
        assert not (tmp_path / "infinitystar_8b_480p_weights").exists()  # the transformer was not copied first
        # a shared workflow names local_source: no network share, no relative path, nothing ComfyUI clients upload
        for source, why in (("\\\\host\\share\\models", "network path"), ("input/models", "not a full path"),
                            (folder_paths.get_input_directory(), "input, output or temp folder"),
                            (str(Path(folder_paths.get_output_directory()) / "x"), "input, output or temp folder")):
            with pytest.raises(ValueError, match=why):
                run(node, variant="480p", components="vae", local_source=source)
        with pytest.raises(RuntimeError, match="could not fetch the InfinityStar transformer") as offline:
            os.environ["HF_HUB_OFFLINE"] = "1"
            try:
                run(pack.loaders.InfinityStarDownloadModels, variant="480p", components="transformer",
                    local_source="")
            finally:
                del os.environ["HF_HUB_OFFLINE"]
        said = str(offline.value)  # one way out, said once, one full stop
        assert said.count("local_source") == 1 and ".." not in said and said.endswith("."), said
    finally:
        registered.remove(str(tmp_path))


def test_an_extra_model_paths_folder_is_where_downloads_go(pack, tmp_path, monkeypatch):
    """ComfyUI reads extra_model_paths.yaml before it imports packs: an ``infinitystar:`` folder given there (a larger
    disk) comes before models/infinitystar, which the pack adds, so the Download node writes there (as its help
    page says), and the loaders list both."""
    import folder_paths
    from utils.extra_config import load_extra_path_config

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "infinitystar", ([], set()))
    del folder_paths.folder_names_and_paths["infinitystar"]  # as before the yaml and the pack registered it
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(f"big_disk:\n  base_path: {tmp_path.as_posix()}\n  infinitystar: models/infinitystar\n")
    load_extra_path_config(str(config))
    pack.paths.register()
    registered = folder_paths.get_folder_paths("infinitystar")
    assert pack.paths.default_dir() == tmp_path / "models" / "infinitystar"
    assert registered[1:] == [os.path.join(folder_paths.models_dir, "infinitystar")]


def test_text_to_image_chains_into_core_nodes(pack, loaded, comfy):
    from comfy_extras.nodes_video import CreateVideo

    import nodes as comfy_nodes

    te = loaded["te"]
    assert pack.host.is_loaded(te.patcher)  # T5 stays loaded after encoding, as core text encoders (until evicted)
    assert set(loaded["cond"].texts) == {0, 5, 10}
    tokens = run(pack.sampling.InfinityStarSampler, model=loaded["model"], positive=loaded["cond"],
                 duration="image", seed=3, **SMALL)[0]
    schedule = tokens.schedule()
    assert tokens.frames == 1 and len(tokens.bits) == schedule.num_steps
    images, fps = run(pack.video.InfinityStarDecode, vae=loaded["vae"], tokens=tokens, tiled=False)
    assert images.shape == (1, schedule.height, schedule.width, 3) and images.dtype == torch.float32
    assert images.device.type == "cpu" and 0 <= images.min() and images.max() <= 1 and fps == 16.0
    scaled = comfy_nodes.ImageScale().upscale(images, "nearest-exact", 64, 48, "disabled")[0]
    assert scaled.shape == (1, 48, 64, 3)
    video = run(CreateVideo, images=images, fps=fps)[0]
    assert video.get_dimensions() == (schedule.width, schedule.height)
    # same seed -> same tokens (the model stayed resident; the second run reuses it)
    again = run(pack.sampling.InfinityStarSampler, model=loaded["model"], positive=loaded["cond"],
                duration="image", seed=3, **SMALL)[0]
    assert all(torch.equal(a, b) for a, b in zip(tokens.bits, again.bits))


def test_heavy_crops_of_input_frames_are_said(pack, loaded, caplog):
    """Encode, Interact Start and the Sampler's start_image warn when fitting the frames to the output cuts more
    than a tenth of them, with what keeps more; a frame near the output's aspect is not mentioned."""
    square = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    encode = dict(vae=loaded["vae"], resolution="0.06M", seed=5)
    with caplog.at_level("WARNING", logger=pack.sampling.__name__):
        out = run(pack.video.InfinityStarEncode, images=square, aspect_ratio="16:9", **encode)[0].schedule()
        assert f"Encode: the 64x64 input is resized to cover {out.width}x{out.height}" in caplog.text
        cut = round(100 * (1 - out.height / out.width))  # a square keeps height/width of itself
        assert f"cutting {cut}% of it; set aspect_ratio to 'from input'" in caplog.text and cut > 40
        caplog.clear()
        run(pack.video.InfinityStarEncode, images=square, aspect_ratio="from input", **encode)
        run(pack.video.InfinityStarEncode, images=torch.rand(1, 36, 64, 3), aspect_ratio="16:9", **encode)
        assert caplog.text == ""
        run(pack.video.InfinityStarEncode, images=torch.rand(1, 16, 160, 3), aspect_ratio="from input", **encode)
        assert "of it; the nearest of the model's aspect templates is h/w 0.3" in caplog.text  # h/w 0.1 into 1/3
        caplog.clear()
        run(pack.interact.InfinityStarInteractStart, images=square.expand(81, -1, -1, -1), aspect_ratio="16:9",
            **encode)
        assert "Interact Start: the 64x64 input" in caplog.text
        caplog.clear()
        run(pack.sampling.InfinityStarSampler, model=loaded["model"], positive=loaded["cond"], duration="5 s",
            seed=5, start_image=square, vae=loaded["vae"], **SMALL)
        assert "Sampler: the 64x64 input is resized" in caplog.text
        assert "set aspect_ratio to 'from start image'" in caplog.text
        caplog.clear()
        run(pack.sampling.InfinityStarSampler, model=loaded["model"], positive=loaded["cond"], duration="5 s",
            seed=5, start_image=torch.rand(1, 16, 160, 3), vae=loaded["vae"],
            **{**SMALL, "aspect_ratio": "from start image"})  # h/w 0.1: even the widest template cuts much
        assert "of it; the nearest of the model's aspect templates is h/w 0.3" in caplog.text
        assert "set aspect_ratio to" not in caplog.text


def test_image_to_video_encode_extend_save_load(pack, loaded, comfy_dirs):
    start = torch.rand(1, 200, 360, 3, generator=torch.Generator().manual_seed(0))
    i2v = run(pack.sampling.InfinityStarSampler, model=loaded["model"], positive=loaded["cond"], duration="5 s",
              seed=5, start_image=start, vae=loaded["vae"], **SMALL)[0]
    assert i2v.frames == 81 and len(i2v.bits) == i2v.schedule().num_steps
    image_tokens = run(pack.video.InfinityStarEncode, vae=loaded["vae"], images=start, resolution="0.06M",
                       aspect_ratio="16:9", seed=5)[0]
    n_image = image_tokens.schedule().num_steps
    # teacher forcing: the I2V image steps are the encoded start image
    assert all(torch.equal(a.reshape(b.shape), b) for a, b in zip(i2v.bits[:n_image], image_tokens.bits))

    saved = comfy_dirs["input"] / "tok.safetensors"
    out = pack.tokens_io.InfinityStarSaveTokens.PREPARE_CLASS_CLONE({}).EXECUTE_NORMALIZED(
        tokens=image_tokens, filename_prefix="infinitystar/t")
    assert "saved infinitystar/t_" in out.ui.as_dict()["text"][0]
    written = sorted((comfy_dirs["output"] / "infinitystar").glob("t_*.safetensors"))
    assert written
    saved.write_bytes(written[-1].read_bytes())
    assert "tok.safetensors" in pack.paths.input_files(".safetensors")
    back = run(pack.tokens_io.InfinityStarLoadTokens, tokens_file="tok.safetensors")[0]
    assert all(torch.equal(a, b) for a, b in zip(back.bits, image_tokens.bits))
    # without the copy: Load Tokens lists what Save Tokens wrote, as ComfyUI annotates output files
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(comfy_dirs["output"] / "infinitystar" / "not_tokens.safetensors"))
    load = pack.tokens_io.InfinityStarLoadTokens
    listed = [c for c in load.choices() if c.endswith(" [output]")]
    name = f"infinitystar/{written[-1].name} [output]"
    assert name in listed and not any("not_tokens" in c for c in listed)
    assert load.validate_inputs(tokens_file=name) is True
    direct = run(load, tokens_file=name)[0]
    assert all(torch.equal(a, b) for a, b in zip(direct.bits, image_tokens.bits))
    assert "not found in ComfyUI's output folder" in load.validate_inputs(tokens_file="../input/tok.safetensors [output]")

    longer = run(pack.video.InfinityStarExtend, model=loaded["model"], positive=loaded["cond"], tokens=back,
                 clips=1, seed=1, guidance_scale=34.0, apg_threshold=0.05, use_plain_cfg=False, tau_video=0.4)[0]
    assert longer.frames == 81 and len(longer.bits) == longer.schedule().num_steps
    assert all(torch.equal(a.reshape(b.shape), b) for a, b in zip(longer.bits[:n_image], back.bits))


def test_start_tokens_continue_a_video_as_the_official_v2v(pack, loaded, core, caplog):
    """Encode (5 s) -> Sampler (10 s, start_tokens) is the official video continuation: the encoded steps are
    teacher-forced while every step draws, as pipeline.generate with the condition (the CLI's generate --video);
    resolution and aspect come from the tokens; Extend, which draws nothing for the encoded clip, gives another
    clip. Tokens that leave nothing to generate, or a second start, are refused before anything loads."""
    pipeline = core("pipeline")
    video = torch.rand(81, 64, 96, 3, generator=torch.Generator().manual_seed(4))
    tokens = run(pack.video.InfinityStarEncode, vae=loaded["vae"], images=video, resolution="0.06M",
                 aspect_ratio="16:9", seed=2)[0]
    assert tokens.frames == 81
    settings = {**SMALL, "aspect_ratio": "1:1"}  # ignored: the tokens are 16:9
    with caplog.at_level("INFO", logger=pack.sampling.__name__):
        v2v = run(pack.sampling.InfinityStarSampler, model=loaded["model"], positive=loaded["cond"],
                  duration="10 s", seed=6, start_tokens=tokens, **settings)[0]
    assert "aspect_ratio 1:1 ignored" in caplog.text
    assert v2v.frames == 161 and abs(v2v.h_div_w - tokens.h_div_w) < 1e-9
    assert all(torch.equal(a.reshape(b.shape), b) for a, b in zip(v2v.bits, tokens.bits))
    schedule = pipeline.resolve_schedule("0.06M", "16:9", 10)
    with pack.host.loaded(loaded["model"].patcher) as module:
        expect = pipeline.generate(module, loaded["cond"].select(10), schedule, seed=6, condition=tokens,
                                   compute_dtype=loaded["model"].compute_dtype)
    assert all(torch.equal(a, b) for a, b in zip(v2v.bits, expect.bits))
    extended = run(pack.video.InfinityStarExtend, model=loaded["model"], positive=loaded["cond"], tokens=tokens,
                   clips=1, seed=6, guidance_scale=34.0, apg_threshold=0.05, use_plain_cfg=False, tau_video=0.4)[0]
    new = len(tokens.bits)
    assert not all(torch.equal(a, b) for a, b in zip(v2v.bits[new:], extended.bits[new:]))
    assert v2v.kept_frames == extended.kept_frames == 81 and tokens.kept_frames == 0
    whole, _ = run(pack.video.InfinityStarDecode, vae=loaded["vae"], tokens=v2v, tiled=False)
    added, _ = run(pack.video.InfinityStarDecode, vae=loaded["vae"], tokens=v2v, tiled=False, frames="new clips")
    assert added.shape[0] == 80 and torch.equal(added, whole[81:])
    assert torch.equal(run(pack.video.InfinityStarDecode, vae=loaded["vae"], tokens=tokens, tiled=False,
                           frames="new clips")[0], run(pack.video.InfinityStarDecode, vae=loaded["vae"],
                                                       tokens=tokens, tiled=False)[0])  # continues nothing: all

    class Untouchable:  # any use of the patcher would mean something started loading
        def __getattr__(self, name):
            raise AssertionError(f"the transformer was touched ({name})")

    model = types.SimpleNamespace(**{**vars(loaded["model"]), "patcher": Untouchable()})
    refuse = dict(model=model, positive=loaded["cond"], seed=6, **SMALL)
    with pytest.raises(ValueError, match="hold 5 s of video; a 5 s generation leaves nothing to add"):
        run(pack.sampling.InfinityStarSampler, duration="5 s", start_tokens=tokens, **refuse)
    with pytest.raises(ValueError, match="both connected"):
        run(pack.sampling.InfinityStarSampler, duration="10 s", start_tokens=tokens,
            start_image=torch.rand(1, 64, 64, 3), vae=loaded["vae"], **refuse)
    image = run(pack.video.InfinityStarEncode, vae=loaded["vae"], images=video[:1], resolution="0.06M",
                aspect_ratio="16:9", seed=2)[0]
    with pytest.raises(ValueError, match="hold an image; an image generation would add nothing"):
        run(pack.sampling.InfinityStarSampler, duration="image", start_tokens=image, **refuse)
    with pytest.raises(ValueError, match="hold a video; an image cannot continue it"):
        run(pack.sampling.InfinityStarSampler, duration="image", start_tokens=tokens, **refuse)
    sched720 = pipeline.resolve_schedule("720p", "16:9", 5)
    big = pipeline.Tokens([torch.zeros(1, s.t, s.h, s.w, s.d, dtype=torch.uint8) for s in sched720.steps],
                          torch.zeros(1, 64, 21, *sched720.scales[-1][1:]), "0.90M", sched720.h_div_w, 81)
    with pytest.raises(ValueError, match="start_tokens are 720p tokens, and 720p makes 5 s videos only"):
        run(pack.sampling.InfinityStarSampler, duration="10 s", start_tokens=big, **refuse)
    with pytest.raises(ValueError, match="Encode: fps 0 is not a video's frame rate"):
        run(pack.video.InfinityStarEncode, vae=loaded["vae"], images=video, resolution="0.06M", aspect_ratio="16:9",
            seed=2, fps=0.0)
    image = run(pack.video.InfinityStarEncode, vae=loaded["vae"], images=video[:1], resolution="0.06M",
                aspect_ratio="16:9", seed=2, fps=0.0)[0]  # one frame is an image: its linked rate is not used
    assert image.frames == 1


def test_start_tokens_of_a_longer_video_continue_its_first_clips(pack, loaded, core, caplog):
    """Encode keeps every whole 5 s clip: 10 s of video at 10 s continue from its first 5 s (as the official
    continuation, and the CLI's generate --video), not a refusal."""
    pipeline = core("pipeline")
    video = torch.rand(161, 64, 96, 3, generator=torch.Generator().manual_seed(9))
    tokens = run(pack.video.InfinityStarEncode, vae=loaded["vae"], images=video, resolution="0.06M",
                 aspect_ratio="16:9", seed=2)[0]
    assert tokens.frames == 161
    with caplog.at_level("WARNING", logger=pack.sampling.__name__):
        out = run(pack.sampling.InfinityStarSampler, model=loaded["model"], positive=loaded["cond"],
                  duration="10 s", seed=6, start_tokens=tokens, **SMALL)[0]
    assert "start_tokens hold 10 s of video; only the first 5 s start the 10 s output" in caplog.text
    assert "To continue the video from its end, set Encode's keep to 'last 5 s'" in caplog.text
    first = tokens.leading_clips(1)
    with pack.host.loaded(loaded["model"].patcher) as module:
        expect = pipeline.generate(module, loaded["cond"].select(10), pipeline.resolve_schedule("0.06M", "16:9", 10),
                                   seed=6, condition=first, compute_dtype=loaded["model"].compute_dtype)
    assert out.frames == 161 and all(torch.equal(a, b) for a, b in zip(out.bits, expect.bits))


def test_fixed_duration_tag_of_another_length_warns(pack, loaded, caplog):
    """A Text Encode with a fixed duration_tag used for another length says so (the tag of the output's length is
    what the models were trained with); the matching length, and the deliberate 'off', say nothing."""
    def encode(tag):
        return run(pack.conditioning.InfinityStarTextEncode, text_encoder=loaded["te"], prompt="a red fox",
                   negative_prompt="", duration_tag=tag)[0]

    five = encode("5s")
    with caplog.at_level("WARNING", logger=pack.types.__name__):
        five.select(0)
        five.select(10)
    assert "duration_tag=5s for an image" in caplog.text and "duration_tag=5s for a 10 s video" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger=pack.types.__name__):
        five.select(5)
        encode("off").select(5)
        encode("auto").select(10)
    assert "duration_tag" not in caplog.text


def test_interrupt_leaves_nothing_loaded(pack, comfy, loaded, core):
    import comfy.utils as comfy_utils

    host = pack.host
    model = loaded["model"]
    calls, alive_mid_run = [], []
    cache_cls = core("kv_cache").ScaleKVCache

    def hook(value, total, preview, node_id=None):
        calls.append(value)
        if len(calls) == 3:
            alive_mid_run.extend(_kv_caches_alive(cache_cls))  # proves the check below can see a live cache
            comfy.interrupt_current_processing(True)

    comfy_utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.InterruptProcessingException):
            run(pack.sampling.InfinityStarSampler, model=model, positive=loaded["cond"], duration="5 s", seed=0,
                **SMALL)
    finally:
        comfy_utils.set_progress_bar_global_hook(None)
        comfy.interrupt_current_processing(False)
    assert len(calls) == 3  # stopped at the next step after the flag was raised
    assert alive_mid_run
    alive_mid_run.clear()
    assert not host.is_loaded(model.patcher)
    assert not any(getattr(lm.model, "model", None) is model.module for lm in comfy.current_loaded_models)
    gc.collect()
    assert _kv_caches_alive(cache_cls) == []
    assert _stray_tensors(model.module) == []
    # the model is usable again afterwards
    again = run(pack.sampling.InfinityStarSampler, model=model, positive=loaded["cond"], duration="image", seed=0,
                **SMALL)[0]
    assert len(again.bits) == again.schedule().num_steps


@pytest.fixture
def progress_updates(comfy, monkeypatch):
    """Every ComfyUI progress update (value, total, preview) during the test, with previews switched on."""
    import comfy.utils as comfy_utils
    from comfy.cli_args import LatentPreviewMethod, args

    seen = []
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.Latent2RGB)
    comfy_utils.set_progress_bar_global_hook(lambda v, t, p, node_id=None: seen.append((v, t, p)))
    yield seen
    comfy_utils.set_progress_bar_global_hook(None)


def test_step_progress_sends_previews(pack, loaded, progress_updates):
    seen = progress_updates
    tokens = run(pack.sampling.InfinityStarSampler, model=loaded["model"], positive=loaded["cond"],
                 duration="image", seed=0, **SMALL)[0]
    total = tokens.schedule().num_steps
    assert [v for v, _, _ in seen] == list(range(1, total + 1)) and all(t == total for _, t, _ in seen)
    previews = [p for _, _, p in seen if p is not None]
    assert previews and previews[0][0] == "JPEG" and previews[-1][1].size[0] > 0


def test_previews_show_colours_when_the_tokenizer_is_connected(pack, loaded, core, monkeypatch, progress_updates):
    """With 'vae' connected, the Sampler's previews use the colour map fitted to that tokenizer (fitted once per
    loaded tokenizer, not per run): the last preview is the final codes through that map, not the layout-only
    projection. A failing fit leaves previews layout-only and sampling unharmed."""
    host, preview = pack.host, core("preview")
    fits = []
    real_fit = preview.fit_rgb_projection
    monkeypatch.setattr(preview, "fit_rgb_projection", lambda tok, **kw: fits.append(1) or real_fit(tok, **kw))
    host._PROJECTIONS.clear()
    for _ in range(2):
        progress_updates.clear()
        tokens = run(pack.sampling.InfinityStarSampler, model=loaded["model"], positive=loaded["cond"],
                     duration="image", seed=0, vae=loaded["vae"], **SMALL)[0]
    assert fits == [1]
    projection = host._PROJECTIONS[loaded["vae"].patcher]
    last = [p for _, _, p in progress_updates if p is not None][-1][1]
    assert last.tobytes() == host.accumulator_preview(tokens.summed_codes, projection=projection).tobytes()
    assert last.tobytes() != host.accumulator_preview(tokens.summed_codes).tobytes()

    host._PROJECTIONS.clear()
    def failing_fit(tokenizer, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(preview, "fit_rgb_projection", failing_fit)
    again = run(pack.sampling.InfinityStarSampler, model=loaded["model"], positive=loaded["cond"],
                duration="image", seed=0, vae=loaded["vae"], **SMALL)[0]
    assert all(torch.equal(a, b) for a, b in zip(tokens.bits, again.bits))
    assert loaded["vae"].patcher not in host._PROJECTIONS


# ---------------------------------------------------------------------------------------------- interact

def test_interact_nodes_make_a_story_and_decode_it(pack, loaded, core, comfy_dirs):
    """Start (reference video) -> Interact x2 with two prompts -> Decode, on the tiny interact weights (found by
    their official folder name); equal to the core calls; the T2V weights are refused with what to do."""
    interact, pipeline = core("interact"), core("pipeline")
    model = run(pack.loaders.InfinityStarModelLoader, model_name="InfinityStarInteract_24K_iters",
                weight_dtype="default", compute_dtype="auto", attention="auto")[0]
    assert model.info.variant == "interact"
    video = torch.rand(90, 100, 170, 3, generator=torch.Generator().manual_seed(0))
    story = run(pack.interact.InfinityStarInteractStart, vae=loaded["vae"], images=video, resolution="0.06M",
                aspect_ratio="from input", seed=1)[0]
    assert story.kind == "interact" and story.frames == 81
    other = run(pack.conditioning.InfinityStarTextEncode, text_encoder=loaded["te"], prompt="a blue bird",
                negative_prompt="", duration_tag="interact")[0]
    official_text = loaded["te"].encoder.encode("a blue bird", duration_s=5, closing=False)
    assert list(other.texts) == [5] and torch.equal(other.select(5).cond, official_text.cond)
    assert not torch.equal(other.select(5).cond, loaded["te"].encoder.encode("a blue bird", duration_s=5).cond)
    settings = dict(seed=3, guidance_scale=3.0, apg_threshold=0.05, use_plain_cfg=True, tau=0.5)
    one = run(pack.interact.InfinityStarInteract, model=model, positive=loaded["cond"], tokens=story, **settings)[0]
    two = run(pack.interact.InfinityStarInteract, model=model, positive=other, tokens=one, vae=loaded["vae"],
              **settings)[0]
    assert two.frames == 241 and two.summed_codes.shape[2] == 61

    with pack.host.loaded(model.patcher) as module:
        expect = interact.continue_story(module, other.select(5), one, seed=3, generator="cpu")
    assert torch.equal(expect.summed_codes, two.summed_codes)

    images, fps = run(pack.video.InfinityStarDecode, vae=loaded["vae"], tokens=two, tiled=False)
    assert images.shape == (241, story.summed_codes.shape[3] * 16, story.summed_codes.shape[4] * 16, 3)
    with pack.host.loaded(loaded["vae"].patcher) as tokenizer:
        direct = pipeline.decode(tokenizer, two).float()  # one chunk per window; the node's chunks round apart
    torch.testing.assert_close(images, direct, atol=1e-5, rtol=0)
    newest, _ = run(pack.video.InfinityStarDecode, vae=loaded["vae"], tokens=two, tiled=False, frames="last clip")
    torch.testing.assert_close(newest, direct[-80:], atol=1e-5, rtol=0)
    added, _ = run(pack.video.InfinityStarDecode, vae=loaded["vae"], tokens=two, tiled=False, frames="new clips")
    torch.testing.assert_close(added, direct[-80:], atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match="needs the interact weights"):
        run(pack.interact.InfinityStarInteract, model=loaded["model"], positive=loaded["cond"], tokens=story,
            **settings)
    with pytest.raises(ValueError, match="at least 80 frames at 16 fps"):
        run(pack.interact.InfinityStarInteractStart, vae=loaded["vae"], images=video[:40], resolution="0.06M",
            aspect_ratio="16:9", seed=1)
    with pytest.raises(ValueError, match="continue them with InfinityStar Interact"):
        run(pack.video.InfinityStarExtend, model=loaded["model"], positive=loaded["cond"], tokens=two, clips=1, seed=1,
            guidance_scale=34.0, apg_threshold=0.05, use_plain_cfg=False, tau_video=0.4)


def test_interact_takes_one_clip_per_prompt_line(pack, loaded, core):
    """duration_tag interact: each line of the prompt is one clip's prompt, as the official script's prompt.txt
    (blank lines skipped); one Interact node adds a clip per line, equal to the core's clips one after the other;
    the Sampler and Extend refuse such a prompt with what to do."""
    interact = core("interact")
    model = run(pack.loaders.InfinityStarModelLoader, model_name="InfinityStarInteract_24K_iters",
                weight_dtype="default", compute_dtype="auto", attention="auto")[0]
    video = torch.rand(81, 100, 170, 3, generator=torch.Generator().manual_seed(4))
    story = run(pack.interact.InfinityStarInteractStart, vae=loaded["vae"], images=video, resolution="0.06M",
                aspect_ratio="from input", seed=1)[0]
    cond = run(pack.conditioning.InfinityStarTextEncode, text_encoder=loaded["te"], duration_tag="interact",
               prompt="a red fox\n\n   a blue bird  \n", negative_prompt="")[0]
    lines = [loaded["te"].encoder.encode(p, duration_s=5, closing=False) for p in ("a red fox", "a blue bird")]
    assert [t.cond.shape for t in cond.clip_texts] == [t.cond.shape for t in lines]
    assert all(torch.equal(a.cond, b.cond) for a, b in zip(cond.clip_texts, lines))
    settings = dict(seed=3, guidance_scale=3.0, apg_threshold=0.05, use_plain_cfg=True, tau=0.5)
    both = run(pack.interact.InfinityStarInteract, model=model, positive=cond, tokens=story, **settings)[0]
    assert both.frames == 81 + 2 * 80
    with pack.host.loaded(model.patcher) as module:
        expect = story
        for text in lines:
            expect = interact.continue_story(module, text, expect, seed=3, generator="cpu")
    assert torch.equal(expect.summed_codes, both.summed_codes)
    assert expect.kept_frames == 161 and both.kept_frames == 81  # both of this node's clips are new

    with pytest.raises(ValueError, match="2 clip prompts .* InfinityStar Interact"):
        run(pack.sampling.InfinityStarSampler, model=loaded["model"], positive=cond, duration="5 s", seed=0,
            **SMALL)
    image = run(pack.sampling.InfinityStarSampler, model=loaded["model"], positive=loaded["cond"], duration="image",
                seed=0, **SMALL)[0]
    with pytest.raises(ValueError, match="2 clip prompts"):
        run(pack.video.InfinityStarExtend, model=loaded["model"], positive=cond, tokens=image, clips=1, seed=1,
            guidance_scale=34.0, apg_threshold=0.05, use_plain_cfg=False, tau_video=0.4)
    one_line = run(pack.conditioning.InfinityStarTextEncode, text_encoder=loaded["te"], duration_tag="5s",
                   prompt="a red fox\na blue bird", negative_prompt="")[0]
    assert one_line.clip_texts == ()  # other tags keep a multi-line prompt whole


def test_guidance_schedule_reaches_the_sampler(pack, loaded, core):
    """The optional guidance_schedule: the node's tokens equal the core's with the same per-scale list; a malformed
    list fails with what to write, before anything loads."""
    pipeline, guidance = core("pipeline"), core("guidance")
    inputs = dict(SMALL, guidance_scale=34.0)
    tokens = run(pack.sampling.InfinityStarSampler, model=loaded["model"], positive=loaded["cond"], duration="image",
                 seed=4, guidance_schedule="34, 20, 1", **inputs)[0]
    schedule = pipeline.resolve_schedule("0.06M", "16:9", 0)
    config = guidance.GuidanceConfig(scale=34.0, per_scale=(34.0, 20.0, 1.0))
    with pack.host.loaded(loaded["model"].patcher) as module:
        expect = pipeline.generate(module, loaded["cond"].select(0), schedule, seed=4, guidance=config,
                                   generator="cpu")
        plain = pipeline.generate(module, loaded["cond"].select(0), schedule, seed=4, generator="cpu")
    assert all(torch.equal(a, b) for a, b in zip(tokens.bits, expect.bits))
    assert not all(torch.equal(a, b) for a, b in zip(tokens.bits, plain.bits))
    pack.host.release(loaded["model"].patcher)
    with pytest.raises(ValueError, match="numbers separated by commas"):
        run(pack.sampling.InfinityStarSampler, model=loaded["model"], positive=loaded["cond"], duration="image",
            seed=4, guidance_schedule="34, lots", **inputs)
    assert not pack.host.is_loaded(loaded["model"].patcher)


def test_cudnn_attention_off_cuda_says_what_runs(pack, caplog):
    with caplog.at_level("WARNING", logger=pack.loaders.__name__):
        assert pack.loaders._pick_attention("sdpa", torch.device("cpu")) == "sdpa"
    assert not caplog.text
    with caplog.at_level("WARNING", logger=pack.loaders.__name__):
        assert pack.loaders._pick_attention("cudnn", torch.device("cpu")) == "cudnn"
    assert "attention cudnn is a CUDA kernel; on cpu" in caplog.text
