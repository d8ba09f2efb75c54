"""The CLI end to end on the tiny model set; outputs are read back with PyAV / Pillow."""
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from PIL import Image

from infinitystar.cli import main
from infinitystar.pipeline import Tokens, resolve_schedule
from infinitystar.video_io import write_png


def _probe(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = sum(1 for _ in c.decode(s))
        return frames, s.codec_context.height, s.codec_context.width, float(s.average_rate)


@pytest.fixture(scope="module")
def t2v(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    rc = main(["generate", "--models", str(tiny_models["root"]), "--resolution", "0.06M", "--duration", "5",
               "--prompt", "a red fox running through snow", "--seed", "3", "--out", str(out / "t2v.mp4"),
               "--save-tokens", str(out / "t2v.safetensors")])
    assert rc == 0
    return out


@pytest.mark.slow
def test_t2v_writes_a_playable_mp4(t2v):
    assert _probe(t2v / "t2v.mp4") == (81, 192, 336, 16.0)


@pytest.mark.slow
def test_extend_adds_one_clip(t2v, tiny_models):
    rc = main(["extend", "--models", str(tiny_models["root"]), "--tokens", str(t2v / "t2v.safetensors"),
               "--clips", "1", "--seed", "4", "--out", str(t2v / "longer.mp4")])
    assert rc == 0
    assert _probe(t2v / "longer.mp4") == (161, 192, 336, 16.0)
    rc = main(["extend", "--models", str(tiny_models["root"]), "--tokens", str(t2v / "t2v.safetensors"),
               "--clips", "1", "--seed", "4", "--out", str(t2v / "added.mp4"), "--new-only",
               "--save-tokens", str(t2v / "longer.safetensors")])
    assert rc == 0 and _probe(t2v / "added.mp4") == (80, 192, 336, 16.0)  # only the new clip
    longer = Tokens.load(t2v / "longer.safetensors")
    assert longer.frames == 161 and longer.kept_frames == 81  # the tokens keep every clip


def test_t2i_writes_a_png(tiny_models, tmp_path):
    rc = main(["generate", "--models", str(tiny_models["root"]), "--resolution", "0.06M", "--aspect", "1:1",
               "--duration", "0", "--prompt", "a tulip", "--out", str(tmp_path / "img"),  # the suffixes are added
               "--save-tokens", str(tmp_path / "tok")])
    assert Tokens.load(tmp_path / "tok.safetensors").frames == 1
    assert rc == 0
    schedule = resolve_schedule("0.06M", "1:1", 0)
    with Image.open(tmp_path / "img.png") as img:
        assert img.size == (schedule.width, schedule.height) and img.mode == "RGB"
    assert schedule.width == schedule.height


@pytest.mark.slow
def test_i2v_from_a_png(tiny_models, tmp_path):
    image = (np.random.default_rng(0).random((150, 250, 3)) * 255).astype(np.uint8)
    write_png(tmp_path / "in.png", image)
    rc = main(["generate", "--models", str(tiny_models["root"]), "--resolution", "0.06M", "--duration", "5",
               "--image", str(tmp_path / "in.png"), "--seed", "1", "--out", str(tmp_path / "i2v.mp4")])
    assert rc == 0
    assert _probe(tmp_path / "i2v.mp4") == (81, 192, 336, 16.0)


def test_duration_rules_and_preview(tiny_models, capsys):
    assert main(["generate", "--models", str(tiny_models["root"]), "--resolution", "0.06M", "--duration", "7"]) == 2
    assert "multiple of 5" in capsys.readouterr().err
    assert main(["generate", "--models", str(tiny_models["root"]), "--resolution", "0.06M", "--duration", "5",
                 "--steps-preview"]) == 0
    out = capsys.readouterr().out
    assert "61 steps" in out and out.count("  step ") == 61


def test_preview_before_a_download_shows_the_released_model(tmp_path, capsys):
    """--steps-preview answers "will it fit?" before 35 GB are downloaded: without files it shows the released 8B
    model's schedule, weights and sampling memory (from the same estimate the nodes use), and says so."""
    from infinitystar.config import TRANSFORMER_PRESETS
    from infinitystar.memory import estimate_sampling_memory, weight_bytes

    assert main(["generate", "--models", str(tmp_path / "none"), "--variant", "480p", "--duration", "10",
                 "--steps-preview"]) == 0
    captured = capsys.readouterr()
    assert "no 480p transformer under" in captured.err and "released 8B 480p model's figures" in captured.err
    big = TRANSFORMER_PRESETS["8b"]
    schedule = resolve_schedule("480p", "16:9", 10)
    need = estimate_sampling_memory(big, schedule, weight_dtype=torch.float32) / 1e9
    assert f"{schedule.num_steps} steps" in captured.out and f"sampling needs ≈{need:.2f} GB" in captured.out
    assert f"≈{weight_bytes(big, torch.bfloat16) / 1e9:.1f} GB in bf16" in captured.out
    assert main(["generate", "--models", str(tmp_path / "none"), "--duration", "10", "--steps-preview"]) == 2
    assert "720p model was trained for durations" in capsys.readouterr().err  # the 720p model's rules hold too


def test_download_from_local_source(tiny_models, tmp_path, capsys):
    rc = main(["download", "--variant", "480p", "--dest", str(tmp_path), "--local-source", str(tiny_models["root"])])
    assert rc == 0 and "transformer" in capsys.readouterr().out
    assert (tmp_path / "infinitystar_8b_480p_weights").is_dir()


def test_missing_weights_say_how_to_get_them(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "infinitystar", "generate", "--models", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "python -m infinitystar download --variant 720p" in proc.stderr


def test_demo_runs_offline_from_the_cache(tiny_models, tmp_path, monkeypatch):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(tiny_models["root"], cache / "tiny-seed0")
    (cache / "tiny-seed0" / ".complete").write_text("ok\n")
    monkeypatch.setenv("INFINITYSTAR_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["demo", "--duration", "0", "--out", str(tmp_path / "demo.png")]) == 0
    with Image.open(tmp_path / "demo.png") as img:
        assert img.size == (336, 192)


def test_video_input_uses_whole_5s_clips(tmp_path, monkeypatch):
    from infinitystar import cli
    from infinitystar.video_io import write_mp4

    class Session:
        def tokenizer(self):
            return "tokenizer"

    seen = {}

    def fake_encode_video(tokenizer, frames, schedule, *, seed, clips):
        seen.update(frames=len(frames), clips=clips, seed=seed, first=int(frames[0, 0, 0, 0]), size=frames.shape[1:3])
        return "tokens"

    frames = np.zeros((100, 32, 48, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(100)[:, None, None] * 2
    write_mp4(tmp_path / "in.mp4", frames, fps=16)
    monkeypatch.setattr(cli.P, "encode_video", fake_encode_video)
    schedule = resolve_schedule("0.06M", "16:9", 10)
    assert cli._encode_video_file(Session(), str(tmp_path / "in.mp4"), schedule, 5) == "tokens"
    assert seen["frames"] == 81 and seen["clips"] == 1 and seen["seed"] == 5 and seen["first"] < 8
    assert seen["size"] == (schedule.height, schedule.width)  # fitted as read (tests/unit/test_frame_fit.py)
    with pytest.raises(ValueError, match="a 5 s output leaves nothing to generate .* --duration 10"):
        cli._encode_video_file(Session(), str(tmp_path / "in.mp4"), resolve_schedule("0.06M", "16:9", 5), 5)
    write_mp4(tmp_path / "short.mp4", frames[:40], fps=16)
    with pytest.raises(ValueError, match=r"short.mp4: 2.50 s; continuing a video needs at least 5 s of it"):
        cli._encode_video_file(Session(), str(tmp_path / "short.mp4"), resolve_schedule("0.06M", "16:9", 10), 5)


def test_last_encodes_the_end_of_the_video(tmp_path, monkeypatch):
    """--last 5 / 10: the video's last whole clips, ending at its last frame, for extend (every clip otherwise) and
    generate (the first 5 s otherwise); --last without --video is refused."""
    from infinitystar import cli, cli_args
    from infinitystar.video_io import write_mp4

    class Session:
        def tokenizer(self):
            return "tokenizer"

    seen = {}

    def fake_encode_video(tokenizer, frames, schedule, *, seed, clips):
        seen.update(frames=len(frames), clips=clips, first=int(frames[0, 0, 0, 0]), last=int(frames[-1, 0, 0, 0]))
        return "tokens"

    frames = np.zeros((200, 32, 48, 3), np.uint8)  # 12.5 s at 16 fps; red = the frame's index
    frames[:, :, :, 0] = np.arange(200)[:, None, None]
    write_mp4(tmp_path / "in.mp4", frames, fps=16)
    monkeypatch.setattr(cli.P, "encode_video", fake_encode_video)
    video, image = str(tmp_path / "in.mp4"), resolve_schedule("0.06M", "16:9", frames=1)
    cli._encode_video_file(Session(), video, image, 0, clips=-1)
    assert seen["clips"] == 2 and seen["frames"] == 161 and seen["first"] < 6 and abs(seen["last"] - 159) < 6
    for last, clips in ((5, 1), (10, 2)):
        cli._encode_video_file(Session(), video, image, 0, clips=-1, last=last)
        assert seen["clips"] == clips and seen["frames"] == 1 + 80 * clips and abs(seen["last"] - 199) < 6
        assert abs(seen["first"] - (200 - 80 * clips)) < 6
    cli._encode_video_file(Session(), video, resolve_schedule("0.06M", "16:9", 10), 0, last=10)  # leaves a clip
    assert seen["clips"] == 1 and abs(seen["first"] - 120) < 6 and abs(seen["last"] - 199) < 6
    with pytest.raises(ValueError, match="--last 5 picks the end of --video; give --video"):
        cli_args.check_sources(cli_args.build_parser().parse_args(["extend", "--tokens", "t.safetensors", "--last", "5"]))
    assert cli_args.build_parser().parse_args(["generate", "--video", video, "--last", "10"]).last == 10
    with pytest.raises(SystemExit):
        cli_args.build_parser().parse_args(["extend", "--video", video, "--last", "7"])


def test_last_reaches_the_video_s_encode_from_the_command_line(tiny_models, tmp_path, monkeypatch):
    """generate --video V --last 5 and extend --video V --last 10 hand --last to the encode of the video (its end,
    not its start), through main() as a user runs them."""
    from infinitystar import cli
    from infinitystar.video_io import write_mp4

    write_mp4(tmp_path / "in.mp4", np.zeros((200, 32, 48, 3), np.uint8), fps=16)
    asked = []

    def spy(s, path, schedule, seed, clips=None, last=None):
        asked.append((path, last))
        raise RuntimeError("stopped by the test after the encode was asked for")

    monkeypatch.setattr(cli, "_encode_video_file", spy)
    common = ["--models", str(tiny_models["root"]), "--video", str(tmp_path / "in.mp4"), "--out",
              str(tmp_path / "out.mp4"), "--resolution", "0.06M"]
    assert main(["generate", *common, "--duration", "10", "--prompt", "a fox", "--last", "5"]) == 2
    assert main(["extend", *common, "--last", "10"]) == 2
    assert main(["extend", *common]) == 2
    assert asked == [(str(tmp_path / "in.mp4"), 5), (str(tmp_path / "in.mp4"), 10), (str(tmp_path / "in.mp4"), None)]


@pytest.mark.parametrize("option, value, bad", [("generator", "cpu", "tpu"), ("offload_kv", "on", "maybe")])
def test_sampling_options_on_every_sampling_command(option, value, bad):
    from infinitystar.cli import build_parser

    parser = build_parser()
    flag = "--" + option.replace("_", "-")
    for command in ("generate", "demo", "extend"):
        assert getattr(parser.parse_args([command]), option) == "auto"
        assert getattr(parser.parse_args([command, flag, value]), option) == value
        with pytest.raises(SystemExit):
            parser.parse_args([command, flag, bad])


def test_cfg_schedule_reaches_the_sampler_and_is_checked_first(tiny_models, tmp_path, monkeypatch, capsys):
    from infinitystar import cli
    from infinitystar.guidance import GuidanceConfig

    seen = {}
    real = cli.P.generate

    def spy(*a, guidance=None, **k):
        seen["guidance"] = guidance
        return real(*a, guidance=guidance, **k)

    monkeypatch.setattr(cli.P, "generate", spy)
    root = str(tiny_models["root"])
    assert main(["generate", "--models", root, "--resolution", "0.06M", "--duration", "0", "--cfg-schedule",
                 "34, 20, 1", "--out", str(tmp_path / "a.png")]) == 0
    assert seen["guidance"] == GuidanceConfig(scale=34.0, per_scale=(34.0, 20.0, 1.0))
    seen.clear()
    assert main(["generate", "--models", root, "--resolution", "0.06M", "--duration", "0", "--cfg-schedule",
                 "34, hi", "--out", str(tmp_path / "b.png")]) == 2
    assert "--cfg-schedule" in capsys.readouterr().err and not seen  # refused before sampling


@pytest.mark.slow
def test_offload_kv_gives_the_same_tokens(t2v, tiny_models):
    from infinitystar.pipeline import Tokens

    out = t2v / "offload.safetensors"
    rc = main(["generate", "--models", str(tiny_models["root"]), "--resolution", "0.06M", "--duration", "5",
               "--prompt", "a red fox running through snow", "--seed", "3", "--out", str(t2v / "offload.mp4"),
               "--save-tokens", str(out), "--offload-kv", "on"])
    assert rc == 0
    a, b = Tokens.load(t2v / "t2v.safetensors"), Tokens.load(out)
    assert len(a.bits) == len(b.bits) and all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))


def test_compile_without_a_compiler_is_a_clear_error(tiny_models, tmp_path, monkeypatch, capsys):
    import shutil

    from infinitystar.cli import build_parser

    assert build_parser().parse_args(["generate", "--compile"]).compile is True
    assert build_parser().parse_args(["generate"]).compile is False
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no C++ compiler on PATH
    rc = main(["generate", "--models", str(tiny_models["root"]), "--resolution", "0.06M", "--duration", "0",
               "--device", "cpu", "--compile", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc != 0 and "--compile" in err and "C++ compiler" in err
    assert not (tmp_path / "x.png").exists()


def test_default_dtype_follows_the_free_gpu_memory(tiny_models, monkeypatch, capsys):
    """Without --dtype: fp32 on the CPU; on a GPU (its memory query patched: none here) bf16 for the 8B model at
    720p when 80 GB are free, fp8 with a note on 24 GB of which 20 are free."""
    import types

    from infinitystar.cli import Session, build_parser
    from infinitystar.config import TRANSFORMER_PRESETS
    from infinitystar.schedule import build_schedule

    def session(device, *extra):
        s = Session(build_parser().parse_args(["generate", "--models", str(tiny_models["root"]), "--device", device,
                                               *extra]))
        monkeypatch.setattr(s, "model_info", lambda: types.SimpleNamespace(config=TRANSFORMER_PRESETS["8b"]))
        return s

    schedule = build_schedule("720p", "16:9", 81)
    assert session("cpu").auto_dtype(schedule) == torch.float32
    for query in ("memory_allocated", "memory_reserved"):  # nothing allocated yet
        monkeypatch.setattr(torch.cuda, query, lambda device=None: 0)
    # raising=False: absent before torch 2.6
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 1.0, raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU, as far as the session's checks go
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    gpu = session("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 10**9, 80 * 10**9))
    assert gpu.auto_dtype(schedule) == torch.bfloat16 and "fp8" not in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * 10**9, 24 * 10**9))
    assert gpu.auto_dtype(schedule) == torch.float8_e4m3fn
    assert "storing the blocks in fp8" in capsys.readouterr().err
    # --cfg 1 runs one branch: bf16 fits where the guided run's two branches would not
    from infinitystar.memory import estimate_sampling_memory, weight_bytes
    from infinitystar.sampler import AUTO_HEADROOM

    big, bf16 = TRANSFORMER_PRESETS["8b"], torch.bfloat16
    one, two = (estimate_sampling_memory(big, schedule, batch=b, offload_kv=True, weight_dtype=bf16) for b in (1, 2))
    free = weight_bytes(big, bf16) + (one + two) // 2 + AUTO_HEADROOM
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 10**9))
    assert gpu.auto_dtype(schedule) == torch.float8_e4m3fn
    assert session("cuda", "--cfg", "1").auto_dtype(schedule) == torch.bfloat16
    # an RTX 20xx has no native bf16: fp16 blocks, the same size
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 10**9, 80 * 10**9))
    assert gpu.auto_dtype(schedule) == torch.float16
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * 10**9, 24 * 10**9))
    assert gpu.auto_dtype(schedule) == torch.float8_e4m3fn
    err = capsys.readouterr().err
    assert "fp16 weights" in err and "do not fit either" not in err  # 720p 5 s in fp8: about 13 GB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 10**9, 12 * 10**9))
    assert gpu.auto_dtype(schedule) == torch.float8_e4m3fn
    err = capsys.readouterr().err
    assert "fp8 blocks do not fit either" in err and "convert-gguf" in err


def test_norms_option_reaches_the_model(tiny_models):
    from infinitystar.cli import Session, build_parser
    from infinitystar.transformer import RMSNorm

    base = ["generate", "--models", str(tiny_models["root"]), "--resolution", "0.06M", "--device", "cpu"]
    for flag, fused in ((["--norms", "composite"], False), ([], True)):
        model = Session(build_parser().parse_args(base + flag)).transformer()
        norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
        assert norms and all(m.fused is fused for m in norms)


def test_attention_backend_option(tiny_models, tmp_path, capsys):
    from infinitystar.attention import available_backends

    args = ["generate", "--models", str(tiny_models["root"]), "--resolution", "0.06M", "--duration", "0",
            "--device", "cpu", "--seed", "3"]
    for backend in ("cudnn", "sdpa_flash"):  # one SDPA kernel each on CUDA; plain SDPA on the CPU
        assert main(args + ["--attention", backend, "--out", str(tmp_path / f"{backend}.png")]) == 0
        assert (tmp_path / f"{backend}.png").exists()
    if "sage" not in available_backends():  # a backend that is not installed is refused before anything loads
        assert main(args + ["--attention", "sage", "--out", str(tmp_path / "s.png")]) != 0
        err = capsys.readouterr().err
        assert "--attention sage" in err and "sageattention" in err and not (tmp_path / "s.png").exists()


@pytest.mark.slow
def test_interact_continues_a_video_one_clip_per_prompt(t2v, tiny_models):
    """interact: the reference video's last 5 s start the story, each prompt adds 80 frames; the saved story is
    the core's (same start, same clips) and can be continued again from its tokens file."""
    from infinitystar import interact as I
    from infinitystar.checkpoint import load_tokenizer, load_transformer
    from infinitystar.pipeline import Tokens
    from infinitystar.text import TextEncoder
    from infinitystar.video_io import read_video

    root = str(tiny_models["root"])
    story_file = t2v / "story.safetensors"
    rc = main(["interact", "--models", root, "--resolution", "0.06M", "--video", str(t2v / "t2v.mp4"), "--prompts",
               "a red fox", "a blue bird", "--seed", "5", "--out", str(t2v / "story.mp4"), "--save-tokens",
               str(story_file)])
    assert rc == 0
    assert _probe(t2v / "story.mp4") == (81 + 2 * 80, 192, 336, 16.0)
    story = Tokens.load(story_file)
    assert story.kind == "interact" and story.frames == 241 and story.kept_frames == 81  # both clips are new

    frames, _ = read_video(t2v / "t2v.mp4")  # 81 frames at 16 fps; the interact script's reader picks from its
    tail = frames[np.linspace(1, 80, 81, dtype=int)]  # last 5 s: ceil(16 * (81 / 16 - 5)) = 1 .. 80, truncated
    start = I.start(load_tokenizer(tiny_models["vae"]), tail, pn="0.06M", seed=5)
    assert torch.equal(story.summed_codes[:, :, :21], start.summed_codes)
    model, info = load_transformer(tiny_models["transformer_interact"])
    assert info.variant == "interact"
    te = TextEncoder.from_folder(tiny_models["text_encoder"], dtype=torch.float32)
    one = I.continue_story(model, te.encode("a red fox", duration_s=5, closing=False), start, seed=5)
    assert torch.equal(story.summed_codes[:, :, :41], one.summed_codes)

    prompts = t2v / "prompts.txt"  # a clip per line
    prompts.write_text("a green frog\n\n  a grey heron \n", encoding="utf-8")
    rc = main(["interact", "--models", root, "--tokens", str(story_file), "--prompts-file", str(prompts),
               "--seed", "6", "--out", str(t2v / "story4.mp4")])
    assert rc == 0 and _probe(t2v / "story4.mp4")[0] == 241 + 2 * 80
    rc = main(["interact", "--models", root, "--tokens", str(story_file), "--prompts-file", str(prompts),
               "--seed", "6", "--new-only", "--out", str(t2v / "story4new.mp4")])
    assert rc == 0 and _probe(t2v / "story4new.mp4")[0] == 2 * 80  # the two clips of this run only
    # the official prompt.txt: line 1 captions the reference video, the other lines are the clips
    official = t2v / "prompt.txt"
    official.write_text("a fox in the snow\na green frog\n", encoding="utf-8")
    rc = main(["interact", "--models", root, "--tokens", str(story_file), "--prompts-file", str(official),
               "--skip-first-line", "--seed", "6", "--save-tokens", str(t2v / "story5.safetensors"),
               "--out", str(t2v / "story5.mp4")])
    first = I.continue_story(model, te.encode("a green frog", duration_s=5, closing=False), story, seed=6)
    assert rc == 0 and torch.equal(Tokens.load(t2v / "story5.safetensors").summed_codes, first.summed_codes)
    official.write_text("a fox in the snow\n", encoding="utf-8")  # the caption alone: no clip to make
    assert main(["interact", "--models", root, "--tokens", str(story_file), "--prompts-file", str(official),
                 "--skip-first-line"]) == 2
    assert main(["interact", "--models", root, "--tokens", str(story_file), "--skip-first-line"]) == 2
    prompts.write_text("\n  \n", encoding="utf-8")
    assert main(["interact", "--models", root, "--tokens", str(story_file), "--prompts-file", str(prompts)]) == 2
    assert main(["interact", "--models", root, "--tokens", str(story_file), "--prompts-file", str(prompts),
                 "--prompts", "a", "b"]) == 2
    assert main(["interact", "--models", root, "--resolution", "0.06M"]) == 2  # neither --video nor --tokens


def test_weights_and_resolution_follow_each_other(tmp_path, monkeypatch):
    """--variant 480p alone renders at 480p (not 720p on the 480p weights); extend --tokens takes the resolution,
    and so the weights, from the tokens, whatever --resolution says."""
    import argparse

    import infinitystar.cli as cli
    from infinitystar.pipeline import Tokens

    args = argparse.Namespace(resolution=None, variant="480p", tiny=False)
    assert cli._variant(args) == "480p" and args.resolution == "480p"
    args = argparse.Namespace(resolution=None, variant=None, tiny=False)
    assert cli._variant(args) == "720p" and args.resolution == "720p"

    path = tmp_path / "t480.safetensors"
    Tokens([], torch.zeros(1, 64, 1, 30, 53), "0.40M", 9 / 16, 1, 0).save(path)  # 480p image tokens, no steps
    seen = {}

    class Stop(Exception):
        pass

    def session(a):
        seen["variant"] = cli._variant(a)
        raise Stop

    monkeypatch.setattr(cli, "Session", session)
    with pytest.raises(Stop):
        cli._run_extend(argparse.Namespace(tokens=str(path), video=None, resolution="720p", variant=None, tiny=False))
    assert seen["variant"] == "480p"


def test_transformer_is_freed_before_the_decode(t2v, tiny_models, tmp_path, monkeypatch):
    """The CLI frees the transformer before decoding (no reference left anywhere), so the decode has the device to
    itself as the nodes do; on the CPU the decode keeps the official chunks (no budget)."""
    import gc
    import weakref

    import infinitystar.checkpoint as checkpoint
    import infinitystar.pipeline as P

    loaded, seen = [], []
    real_load, real_decode = checkpoint.load_transformer, P.decode

    def load(*args, **kwargs):
        model, info = real_load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model, info

    def decode(*args, **kwargs):
        gc.collect()
        seen.append(([r() is None for r in loaded], kwargs.get("memory_budget")))
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "load_transformer", load)
    monkeypatch.setattr(P, "decode", decode)
    root = str(tiny_models["root"])
    assert main(["generate", "--models", root, "--resolution", "0.06M", "--duration", "0", "--out",
                 str(tmp_path / "a.png")]) == 0
    assert main(["extend", "--models", root, "--tokens", str(t2v / "t2v.safetensors"), "--clips", "1",
                 "--out", str(tmp_path / "b.mp4")]) == 0
    assert len(loaded) == 2 and seen == [([True], None), ([True, True], None)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decode_runs_in_bf16_within_the_free_memory(tiny_models, tmp_path, monkeypatch):
    """On a GPU the CLI decodes in bf16 where the GPU has it natively, in chunks sized to the free memory, and the
    start image is encoded in fp32 (as the official scripts do)."""
    import infinitystar.pipeline as P

    seen = {}
    real_decode, real_encode = P.decode, P.encode_image

    def decode(tokenizer, tokens, **kw):
        seen.update(decode=tokenizer.compute_dtype, budget=kw.get("memory_budget"))
        return real_decode(tokenizer, tokens, **kw)

    def encode_image(tokenizer, *args, **kw):
        seen.update(encode=tokenizer.compute_dtype)
        return real_encode(tokenizer, *args, **kw)

    monkeypatch.setattr(P, "decode", decode)
    monkeypatch.setattr(P, "encode_image", encode_image)
    image = tmp_path / "start.png"
    write_png(image, torch.rand(1, 40, 60, 3))
    assert main(["generate", "--models", str(tiny_models["root"]), "--device", "cuda", "--resolution", "0.06M",
                 "--duration", "5", "--image", str(image), "--out", str(tmp_path / "a.mp4")]) == 0
    native_bf16 = torch.cuda.get_device_capability()[0] >= 8
    assert seen["encode"] is None and seen["decode"] == (torch.bfloat16 if native_bf16 else None)
    assert seen["budget"] > 0 and (tmp_path / "a.mp4").is_file()


def test_the_output_size_is_printed_and_far_snaps_and_crops_are_said(tmp_path, capsys, caplog):
    import infinitystar.cli as cli

    Image.new("RGB", (40, 2000)).save(tmp_path / "tall.png")
    schedule = resolve_schedule("0.06M", "100:1", 5)
    with caplog.at_level("WARNING", logger="infinitystar.cli"):
        cli._say_size(schedule, "100:1", str(tmp_path / "tall.png"))
    assert f"output: {schedule.width}x{schedule.height}, 81 frames at 16 fps" in capsys.readouterr().err
    assert "--aspect 100:1 (h/w 0.010) is snapped" in caplog.text and "tall.png is 40x2000" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="infinitystar.cli"):
        cli._say_size(resolve_schedule("0.06M", "16:9", 0), "16:9", None)
    assert not caplog.text and "1 frame (0.06M" in capsys.readouterr().err


def test_names_seeds_and_previews_that_are_fine_pass(tiny_models, tmp_path, capsys):
    """What the checks must let through: dotted names get the suffix, a zero-padded seed is decimal, a preview
    writes nothing so its --out is not checked; missing inputs and --clips 0 are refused before loading."""
    from infinitystar import cli_args as C

    assert C.output_path("take1.0", False, False) == "take1.0.mp4" and C.output_path("a.MP4", False, False) == "a.MP4"
    assert C.seed("010") == 10 and C.seed("0x10") == 16
    root = str(tiny_models["root"])
    assert main(["generate", "--models", root, "--resolution", "0.06M", "--steps-preview", "--out", "x.avi"]) == 0
    capsys.readouterr()
    assert main(["generate", "--models", root, "--image", str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")]) == 2
    assert "--image " + str(tmp_path / "missing.png") + ": no such file" in capsys.readouterr().err
    assert main(["extend", "--models", root, "--video", str(tmp_path / "missing.mp4"), "--clips", "0"]) == 2
    assert "--clips 0: give 1 or more" in capsys.readouterr().err


def test_tokens_that_cannot_be_saved_do_not_cost_the_video(tiny_models, tmp_path, monkeypatch, capsys):
    """--save-tokens on a full disk: the run's image or video is still decoded and written, and the exit status and
    message say that the tokens are not saved."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    rc = main(["generate", "--models", str(tiny_models["root"]), "--resolution", "0.06M", "--duration", "0",
               "--prompt", "a tulip", "--out", str(tmp_path / "img.png"), "--save-tokens", str(tmp_path / "t.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert (tmp_path / "img.png").is_file() and not (tmp_path / "t.safetensors").exists()
    assert "No space left on device" in err and "img.png is written, but the tokens are not" in err
    assert "Traceback" not in err


def _pixels(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.mark.slow
def test_decode_writes_saved_tokens_with_the_tokenizer_alone(t2v, tiny_models, tmp_path, monkeypatch, capsys):
    """`decode` turns a tokens file into the video the run that saved it wrote, from a folder holding only the
    video tokenizer (no transformer, no text encoder); --last-clip / --new-only cut as the Decode node does, and an
    image's tokens give a PNG."""
    import dataclasses
    import shutil

    from infinitystar.download import VAE_FILE

    only_vae = tmp_path / "models"
    only_vae.mkdir()
    shutil.copy(tiny_models["vae"], only_vae / VAE_FILE)
    tokens = t2v / "t2v.safetensors"
    assert main(["decode", str(tokens), "--models", str(only_vae), "--out", str(tmp_path / "all")]) == 0
    whole = _pixels(t2v / "t2v.mp4")
    assert capsys.readouterr().out.strip().endswith("all.mp4")
    assert np.array_equal(_pixels(tmp_path / "all.mp4"), whole)  # the same frames, encoded the same way
    import infinitystar.pipeline as P

    asked, real_decode = [], P.decode
    monkeypatch.setattr(P, "decode", lambda *a, **kw: asked.append(kw) or real_decode(*a, **kw))
    assert main(["decode", str(tokens), "--vae", str(tiny_models["vae"]), "--last-clip", "--out",
                 str(tmp_path / "last.mp4")]) == 0
    assert asked[-1]["last_clip"] and not asked[-1]["new_clips"] and not asked[-1]["tiled"]
    assert np.array_equal(_pixels(tmp_path / "last.mp4"), whole)  # a 5 s video's last clip is the whole video
    assert main(["decode", str(tokens), "--models", str(only_vae), "--new-only", "--out",
                 str(tmp_path / "same.mp4")]) == 0
    assert "continues nothing" in capsys.readouterr().err
    assert np.array_equal(_pixels(tmp_path / "same.mp4"), whole)
    # 10 s: the last clip and the clip the extend added are its last 80 frames
    assert main(["extend", "--models", str(tiny_models["root"]), "--tokens", str(tokens), "--clips", "1", "--seed",
                 "4", "--out", str(tmp_path / "longer.mp4"), "--save-tokens", str(tmp_path / "longer")]) == 0
    for option in ("--last-clip", "--new-only"):
        assert main(["decode", str(tmp_path / "longer.safetensors"), "--models", str(only_vae), option, "--out",
                     str(tmp_path / f"{option}.mp4")]) == 0
    from infinitystar.checkpoint import load_tokenizer
    from infinitystar.video_io import write_mp4

    tokenizer = load_tokenizer(tiny_models["vae"])
    tail = real_decode(tokenizer, Tokens.load(tmp_path / "longer.safetensors"))[81:]  # of the whole decode
    expected = _pixels(write_mp4(tmp_path / "expected.mp4", tail))
    last, new = _pixels(tmp_path / "--last-clip.mp4"), _pixels(tmp_path / "--new-only.mp4")
    assert last.shape[0] == 80 and np.array_equal(last, expected) and np.array_equal(new, expected)
    # as an image-to-video run saves them: the start image's frame is not new
    i2v = dataclasses.replace(Tokens.load(tokens), kept_frames=1)
    i2v.save(tmp_path / "i2v.safetensors")
    assert main(["decode", str(tmp_path / "i2v.safetensors"), "--models", str(only_vae), "--new-only", "--out",
                 str(tmp_path / "new.mp4")]) == 0
    assert _probe(tmp_path / "new.mp4") == (80, 192, 336, 16.0)
    image = Tokens.load(tokens).leading_clips(0)
    image.save(tmp_path / "image.safetensors")
    monkeypatch.chdir(tmp_path)
    assert main(["decode", "image.safetensors", "--models", str(only_vae)]) == 0  # default name: out.png
    from infinitystar.video_io import to_uint8

    expected = to_uint8(real_decode(tokenizer, image))[0]
    with Image.open(tmp_path / "out.png") as img:
        assert img.size == (336, 192) and np.array_equal(np.asarray(img), expected)  # PNG: lossless


def test_decode_errors_say_what_to_do(t2v, tiny_models, tmp_path, capsys):
    tokens = str(t2v / "t2v.safetensors")
    assert main(["decode", tokens, "--models", str(tmp_path)]) == 2
    assert "--components vae" in capsys.readouterr().err  # a folder without the tokenizer
    assert main(["decode", tokens, "--vae", str(tmp_path / "nothing.pth")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["decode", str(tiny_models["vae"]), "--models", str(tmp_path)]) == 2  # weights, not tokens
    assert "not a readable .safetensors tokens file" in capsys.readouterr().err
    assert main(["decode", tokens, "--vae", tokens]) == 2  # tokens given as the tokenizer
    assert "is not the InfinityStar video tokenizer" in capsys.readouterr().err
    assert main(["decode", tokens, "--vae", str(tiny_models["vae"]), "--out", str(tmp_path / "a.png")]) == 2
    assert "writes a video's tokens as .mp4; name the file" in capsys.readouterr().err
    Tokens.load(tokens).leading_clips(0).save(tmp_path / "image.safetensors")
    assert main(["decode", str(tmp_path / "image.safetensors"), "--tiny", "--out", str(tmp_path / "a.mp4")]) == 2
    err = capsys.readouterr().err
    assert "writes an image's tokens as .png; name the file" in err and "--duration" not in err
    assert main(["decode", tokens, "--vae", str(tmp_path)]) == 2
    assert "is a folder; give the tokenizer file" in capsys.readouterr().err
    for both in (["--new-only", "--last-clip"], ["--tiny", "--vae", str(tiny_models["vae"])]):
        with pytest.raises(SystemExit):
            main(["decode", tokens, *both])
    assert not list(tmp_path.glob("*.mp4"))


def test_decode_out_of_gpu_memory_is_retried_in_tiles(t2v, tiny_models, tmp_path, monkeypatch, capsys):
    """A decode that runs out of memory runs again tiled (as the Decode node does); --tiled goes there first, and a
    tiled decode that still runs out is an error."""
    import infinitystar.pipeline as P

    calls, real_decode = [], P.decode

    def decode(tokenizer, tokens, **kw):
        calls.append(kw["tiled"])
        if not kw["tiled"] or fail_tiled:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_decode(tokenizer, tokens, **kw)

    monkeypatch.setattr(P, "decode", decode)
    args = ["decode", str(t2v / "t2v.safetensors"), "--vae", str(tiny_models["vae"]), "--last-clip"]
    fail_tiled = False
    assert main([*args, "--out", str(tmp_path / "a.mp4")]) == 0
    assert calls == [False, True] and "decoding again in spatial tiles" in capsys.readouterr().err
    assert _probe(tmp_path / "a.mp4")[0] == 81
    calls.clear()
    assert main([*args, "--tiled", "--out", str(tmp_path / "b.mp4")]) == 0 and calls == [True]
    calls.clear()
    fail_tiled = True
    assert main([*args, "--out", str(tmp_path / "c.mp4")]) == 2 and calls == [False, True]
    assert "in spatial tiles too: close other programs" in capsys.readouterr().err
    assert not (tmp_path / "c.mp4").exists()
    # a generate whose decode fails: the sampled tokens are kept, and the error says how to decode them
    root = str(tiny_models["root"])
    assert main(["generate", "--models", root, "--resolution", "0.06M", "--duration", "0", "--out",
                 str(tmp_path / "d.png"), "--save-tokens", str(tmp_path / "d.safetensors")]) == 2
    err = capsys.readouterr().err
    hint = f"decode {tmp_path / 'd.safetensors'} --models {root} --out {tmp_path / 'd.png'}"
    assert hint in err and not (tmp_path / "d.png").exists()
    fail_tiled = False
    assert main(hint.split()) == 0 and (tmp_path / "d.png").is_file()  # the command it gives works
