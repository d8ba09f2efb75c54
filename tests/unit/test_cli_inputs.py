"""The CLI refusing what it cannot run (bad numbers, options that cannot apply together, wrong or damaged files),
with a message saying what to do, before anything loads; on the tiny model set."""
from pathlib import Path

import pytest
import torch
from PIL import Image

from infinitystar.cli import main


def test_weight_options_that_cannot_apply_are_refused_before_anything_loads(tmp_path, capsys):
    """--fp8-matmul with --dtype bf16, and --dtype / --fp8-matmul with a GGUF transformer, are refused at the start:
    with no weights at all in --models the refusal, not a missing file, is what is said."""
    empty = tmp_path / "empty"
    empty.mkdir()
    common = ["generate", "--models", str(empty), "--duration", "0", "--device", "cpu", "--out", str(tmp_path / "x.png")]
    assert main([*common, "--dtype", "bf16", "--fp8-matmul"]) == 2
    assert "--fp8-matmul multiplies fp8 e4m3fn weights; drop --dtype bf16" in capsys.readouterr().err
    for extra in (["--dtype", "fp8"], ["--fp8-matmul"]):
        assert main([*common, "--transformer", str(tmp_path / "q.GGUF"), *extra]) == 2
        assert "is a GGUF file, already quantized" in capsys.readouterr().err
    mps = [a if a != "cpu" else "mps" for a in common]
    assert main([*mps, "--dtype", "fp8_e5m2"]) == 2
    assert "Apple's MPS has no fp8 tensors" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_fp8_matmul_needs_fp8_weights(tiny_models, tmp_path, capsys):
    from infinitystar.cli import build_parser

    assert build_parser().parse_args(["generate", "--fp8-matmul"]).fp8_matmul is True
    rc = main(["generate", "--models", str(tiny_models["root"]), "--resolution", "0.06M", "--duration", "0",
               "--device", "cpu", "--dtype", "bf16", "--fp8-matmul", "--out", str(tmp_path / "x.png")])
    assert rc != 0 and "--fp8-matmul multiplies fp8 e4m3fn weights" in capsys.readouterr().err
    rc = main(["generate", "--models", str(tiny_models["root"]), "--resolution", "0.06M", "--duration", "0",
               "--device", "cpu", "--fp8-matmul", "--seed", "2", "--out", str(tmp_path / "y.png")])
    assert rc == 0 and (tmp_path / "y.png").exists()


def test_interact_refuses_t2v_weights_before_loading(tiny_models, capsys, tmp_path):
    """The T2V weights were not trained with interact's prefix conditions: the CLI refuses them, as the node does,
    and says what to use instead, before it reads a video or loads a model."""
    (tmp_path / "junk.mp4").write_bytes(b"not a video: reading it would fail and name it")
    rc = main(["interact", "--models", str(tiny_models["root"]), "--variant", "480p", "--resolution", "0.06M",
               "--video", str(tmp_path / "junk.mp4"), "--out", str(tmp_path / "s.mp4")])
    err = capsys.readouterr().err
    assert rc == 2 and "--variant interact" in err and "extend" in err and "junk.mp4" not in err
    assert not (tmp_path / "s.mp4").exists()


def test_bad_image_inputs_are_clear_errors(tiny_models, tmp_path, capsys):
    """--image with --video, and an --image that is no image: exit 2 with what is wrong, nothing written."""
    root = str(tiny_models["root"])
    (tmp_path / "clip.png").write_bytes(b"\x00\x00\x00 an mp4 renamed")
    base = ["generate", "--models", root, "--resolution", "0.06M", "--out", str(tmp_path / "x.mp4")]
    assert main([*base, "--image", str(tmp_path / "clip.png"), "--video", "v.mp4"]) == 2
    assert "--image and --video both given" in capsys.readouterr().err
    assert main([*base, "--image", str(tmp_path / "clip.png")]) == 2
    assert "clip.png is not an image" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_outputs_and_device_are_checked_before_anything_loads(tiny_models, tmp_path, monkeypatch, capsys):
    """An output that cannot be written, or a CUDA device a CPU-only PyTorch lacks, is one error line before any
    weights load (it used to be a traceback after the whole run, or from deep inside the text encoder)."""
    import infinitystar.cli as cli

    monkeypatch.setattr(cli, "find_models", lambda *a, **k: pytest.fail("models looked up before the outputs"))
    root = str(tiny_models["root"])
    base = ["generate", "--models", root, "--resolution", "0.06M", "--duration", "0"]
    assert main([*base, "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a folder" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main([*base, "--out", str(tmp_path / "file" / "x.png")]) == 2
    assert "file is a file, not a folder" in capsys.readouterr().err
    assert main([*base, "--save-tokens", str(tmp_path / "file" / "t.safetensors")]) == 2
    assert "--save-tokens" in capsys.readouterr().err
    if Path("/sys").is_dir():  # a folder no one may write to, root included (os.access says yes to root)
        assert main([*base, "--out", "/sys/x.png"]) == 2
        assert "the folder /sys is not writable" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*base, "--device", "cuda", "--out", str(tmp_path / "x.png")]) == 2
    assert "sees no CUDA GPU; use --device cpu" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, says", [
    ("--tau-video", "-1", "is not above 0"), ("--tau-image", "0", "is not above 0"), ("--cfg", "-5", "is below 0"),
    ("--cfg", "nan", "not a finite number"), ("--seed", "99999999999999999999999", "outside 0"),
    ("--seed", "-1", "outside 0"), ("--seed", "x", "not a whole number")])
def test_numbers_out_of_range_are_refused_by_the_parser(option, value, says, capsys):
    """Values the sampler cannot use (a division by tau, a generator seed) were accepted and failed after the
    models loaded, or ran with a negative temperature."""
    with pytest.raises(SystemExit) as exit_:
        main(["generate", option, value])
    assert exit_.value.code == 2 and says in capsys.readouterr().err


def test_combinations_and_outputs_are_refused_before_anything_is_made(tiny_models, tmp_path, monkeypatch, capsys):
    """Inputs that cannot go together, an output suffix the run does not write, one file for the video and the
    tokens, and a device PyTorch does not know: one error line, before the models are looked up, and no folder
    made for the output."""
    import infinitystar.cli as cli

    monkeypatch.setattr(cli, "find_models", lambda *a, **k: pytest.fail("models looked up before the checks"))
    root = str(tiny_models["root"])
    out = tmp_path / "new" / "deeper" / "x.mp4"
    cases = [
        (["generate", "--image", "a.png", "--duration", "0"], "would only give the image back"),
        (["extend", "--tokens", "t.safetensors", "--video", "v.mp4"], "--tokens and --video both given"),
        (["interact", "--tokens", "t.safetensors", "--video", "v.mp4"], "--tokens and --video both given"),
        (["generate", "--video", "v.mp4"], "--video with --duration 5: a continuation keeps 5 s of the video (its "
                                           "first 5 s) and generates what follows, so it needs --duration 10"),
        (["generate", "--video", "v.mp4", "--last", "5", "--duration", "0"], "(its last 5 s)"),
        (["extend", "--tokens", "t.safetensors", "--last", "10"], "--last 10 picks the end of --video"),
        (["generate", "--last", "5"], "--last 5 picks the end of --video"),  # text to video: not ignored silently
        (["generate", "--out", str(tmp_path / "x.avi")], "writes a video as .mp4; name the file"),
        (["generate", "--duration", "0", "--out", str(tmp_path / "x.mp4")], "writes an image (--duration 0) as .png"),
        (["generate", "--out", str(out), "--save-tokens", str(out)], "tokens are written as a .safetensors file"),
        (["generate", "--save-tokens", str(tmp_path / "t.gguf")], "name it " + str(tmp_path / "t.safetensors")),
        (["generate", "--out", str(tmp_path / "new") + "/"], "names a folder; give a file name"),
        (["generate", "--save-tokens", str(tmp_path / "new") + "/"], "names a folder; give a file name"),
    ]
    for args, says in cases:
        assert main([*args, "--models", root]) == 2, args
        assert says in capsys.readouterr().err, args
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    assert main(["generate", "--models", root, "--device", "banana", "--out", str(out)]) == 2
    assert "--device banana: not a device name PyTorch knows" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_wrong_tokenizer_file_is_found_before_sampling(tiny_models, tmp_path, monkeypatch, capsys):
    """A tokenizer that is another checkpoint or no checkpoint at all is refused when the session starts, not at the
    decode after the whole sampling run."""
    import shutil

    import infinitystar.cli as cli

    models = tmp_path / "models"
    shutil.copytree(tiny_models["root"], models)
    (models / "infinitystar_videovae.pth").write_text("REAL\n")
    monkeypatch.setattr(cli.Session, "texts", lambda *a, **k: pytest.fail("the run went on to the text encoder"))
    assert main(["generate", "--models", str(models), "--resolution", "0.06M", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "infinitystar_videovae.pth (5 bytes) is not a PyTorch checkpoint" in err
    monkeypatch.setattr(cli, "_run_generate", lambda args: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["generate", "--models", str(models), "--out", str(tmp_path / "y")]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_a_prompts_file_that_is_not_utf8_names_the_file(tiny_models, tmp_path, capsys):
    (tmp_path / "p.txt").write_bytes(b"\xff\xfe a fox")
    (tmp_path / "t").write_bytes(b"")
    rc = main(["interact", "--models", str(tiny_models["root"]), "--resolution", "0.06M", "--tokens", str(tmp_path / "t"),
               "--prompts-file", str(tmp_path / "p.txt")])
    assert rc == 2 and f"--prompts-file {tmp_path / 'p.txt'}: not UTF-8 text" in capsys.readouterr().err


def test_a_file_that_is_not_a_video_says_so(tiny_models, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    Image.new("RGB", (101, 57)).save(tmp_path / "still.png")
    root = str(tiny_models["root"])
    assert main(["extend", "--models", root, "--resolution", "0.06M", "--video", str(tmp_path / "notes.txt")]) == 2
    assert "not a video FFmpeg can read" in capsys.readouterr().err
    assert main(["extend", "--models", root, "--resolution", "0.06M", "--video", str(tmp_path / "still.png")]) == 2
    assert "is a still image, not a video" in capsys.readouterr().err


def test_interact_refuses_the_two_temperatures_it_does_not_use(tiny_models, capsys):
    """interact samples at one --tau; --tau-image/--tau-video (shared with generate) were accepted and ignored."""
    rc = main(["interact", "--models", str(tiny_models["root"]), "--tau-video", "0.7", "--video", "none.mp4"])
    assert rc == 2 and "give --tau" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["interact", "--help"])
    assert "--tau-video" not in capsys.readouterr().out


def test_help_and_previews_print_where_the_console_cannot_encode_them(tmp_path):
    """A redirected stdout on Windows is cp1252 and strict, without ≈ (the help of convert-gguf, --steps-preview);
    unencodable characters print as escapes instead of a UnicodeEncodeError."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONIOENCODING": "cp1252"}
    for argv in (["-m", "infinitystar", "convert-gguf", "--help"], ["-m", "infinitystar.tiny", "--help"]):
        done = subprocess.run([sys.executable, *argv], capture_output=True, env=env, cwd=Path(__file__).parents[2],
                              timeout=120)
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert b"\\u2248" in subprocess.run([sys.executable, "-m", "infinitystar", "convert-gguf", "--help"],
                                         capture_output=True, env=env, cwd=Path(__file__).parents[2]).stdout


@pytest.mark.parametrize("command", ["convert", "convert-gguf", "convert-text-encoder"])
def test_a_converter_output_under_a_file_is_said_before_reading(tiny_models, tmp_path, command, capsys):
    (tmp_path / "afile").write_text("x")
    source = tiny_models["text_encoder" if command == "convert-text-encoder" else "transformer_720p"]
    assert main([command, str(source), str(tmp_path / "afile" / "x")]) == 2
    err = capsys.readouterr().err
    assert "afile is a file, not a folder" in err and "File exists" not in err


def test_an_unreadable_start_image_or_video_is_said_before_the_text_encoder_loads(tiny_models, tmp_path, monkeypatch,
                                                                                  capsys):
    import infinitystar.cli as cli

    monkeypatch.setattr(cli.Session, "text", lambda *a, **k: pytest.fail("the run went on to the text encoder"))
    monkeypatch.setattr(cli.Session, "texts", lambda *a, **k: pytest.fail("the run went on to the text encoder"))
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom cut short")
    root = str(tiny_models["root"])
    runs = [(["generate", "--variant", "720p", "--image", str(tmp_path / "photo.png")], "photo.png"),
            (["generate", "--variant", "480p", "--duration", "10", "--video", str(tmp_path / "clip.mp4")], "clip.mp4"),
            (["interact", "--video", str(tmp_path / "clip.mp4")], "clip.mp4")]
    for args, name in runs:
        assert main([*args, "--models", root, "--resolution", "0.06M", "--out", str(tmp_path / "o.mp4")]) == 2, args
        err = capsys.readouterr().err
        assert name in err and "Traceback" not in err, err
    assert not (tmp_path / "o.mp4").exists()
