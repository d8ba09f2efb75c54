"""Smoke runs of the benchmark scripts' main() in CPU mode with tiny settings (no timing assertions)."""
import os

import pytest
from bench_loader import load_benchmark


def _table(text):
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    return header, rows


def test_bench_generate_cpu_mid_smoke():
    bench = load_benchmark("bench_generate")
    text = bench.main(["--device", "cpu", "--config", "mid", "--cases", "480p5,mid5", "--num-scales", "2",
                       "--threads", "1"])
    header, rows = _table(text)
    assert header == bench.COLUMNS
    assert [(r[0], r[1]) for r in rows] == [("480p5", "ours"), ("mid5", "ours")]
    for r in rows:
        assert int(r[2]) > 0 and float(r[3]) > 0 and float(r[6]) > 0 and float(r[7]) > 0


@pytest.mark.parametrize("weights", ["gguf_q8_0", "gguf_q4_k"])
def test_bench_generate_runs_gguf_blocks(weights):
    """--weights gguf_*: the random model's block weights quantized as a converted file loads them (K-quants where
    rows have 256 values, Q8_0 elsewhere), dequantized per call; the official code does not take them."""
    bench = load_benchmark("bench_generate")
    text = bench.main(["--device", "cpu", "--config", "tiny", "--cases", "mid5", "--num-scales", "2",
                       "--threads", "1", "--weights", weights])
    _, rows = _table(text)
    assert [r[1] for r in rows] == ["ours"] and float(rows[0][3]) > 0 and f"weights {weights}" in text
    from infinitystar import gguf

    model = bench.build_model(bench.TRANSFORMER_PRESETS["tiny"], bench.torch.device("cpu"), bench.torch.uint8, 0,
                              gguf_type=bench.GGUF_TYPES[weights])
    kinds = {gguf.type_name(m.gguf_type) for n, m in model.named_modules()
             if n.startswith("block_chunks.") and isinstance(m, gguf.GGUFLinear)}
    assert kinds == ({"Q8_0"} if weights == "gguf_q8_0" else {"Q4_K", "Q8_0"})
    assert {gguf.type_name(m.gguf_type) for n, m in model.named_modules()
            if isinstance(m, gguf.GGUFLinear) and not n.startswith("block_chunks.")} == {"type None"}
    with pytest.raises(SystemExit, match="GGUF weights are ours alone"):
        bench.main(["--device", "cpu", "--config", "tiny", "--cases", "mid5", "--weights", weights, "--official", "x"])


def test_bench_generate_times_an_interact_clip():
    """interact_mid: one InfinityStar-Interact clip (the clip schedule, its prefix conditions counted in the
    estimate)."""
    bench = load_benchmark("bench_generate")
    from infinitystar import interact

    text = bench.main(["--device", "cpu", "--config", "tiny", "--cases", "interact_mid", "--threads", "1"])
    _, rows = _table(text)
    sched = interact.clip_schedule("0.06M", "16:9")
    assert [(r[0], r[1]) for r in rows] == [("interact_mid", "ours")] and int(rows[0][2]) == sched.num_steps
    assert float(rows[0][6]) > 0 and float(rows[0][7]) >= float(rows[0][6])  # the estimate covers the peak


def test_bench_generate_interact_clip_against_the_official_code(official_path, single_thread):
    bench = load_benchmark("bench_generate")
    text = bench.main(["--device", "cpu", "--config", "tiny", "--cases", "interact_mid", "--official", official_path,
                       "--threads", "1"])
    _, rows = _table(text)
    assert [r[1] for r in rows] == ["ours", "official"] and rows[0][-1] == "yes", text
    text = bench.main(["--device", "cpu", "--config", "tiny", "--cases", "interact_mid", "--official", official_path,
                       "--threads", "1", "--cpu-bf16"])  # ours bf16, the official code at the script's precision
    _, rows = _table(text)
    assert [r[1] for r in rows] == ["ours", "official"] and rows[0][-1] == "yes", text
    with pytest.raises(SystemExit, match="interact clips are compared"):
        bench.main(["--device", "cpu", "--config", "tiny", "--cases", "interact_mid", "--parity", "--official",
                    official_path])


def test_bench_generate_warmup_reports_the_first_run_too():
    """--warmup times the second run in the table and keeps the first (cold) run's time in the notes."""
    import re

    bench = load_benchmark("bench_generate")
    text = bench.main(["--device", "cpu", "--config", "tiny", "--cases", "mid5", "--num-scales", "2",
                       "--threads", "1", "--warmup", "--no-memory"])
    _, rows = _table(text)
    found = re.findall(r"mid5 ours: first run ([0-9.]+) s, the table's \(second\) run ([0-9.]+) s", text)
    assert len(found) == 1, text
    first, second = map(float, found[0])
    assert first > 0 and second == float(rows[0][3])


def test_profile_busy_and_span_merges_overlaps():
    """The profile's GPU idle time: kernels on other streams overlap and count once; gaps are idle."""
    bench = load_benchmark("step_timing")
    assert bench.busy_and_span([]) == (0.0, 0.0)
    assert bench.busy_and_span([(10, 20), (0, 5)]) == (15, 20)
    assert bench.busy_and_span([(0, 10), (2, 4), (8, 15), (20, 21)]) == (16, 21)


def test_profile_splits_kernels_into_steps_at_the_markers():
    """The profile's per-step split: windows end at each marker kernel (the head call's end), the first starts at
    the first kernel, the next at the previous marker's end; overlaps count once; kernels after the last marker
    are left out."""
    bench = load_benchmark("step_timing")
    mark = bench.KernelMarker.name
    kernels = [(0, 4, "gemm"), (2, 6, "gemm"), (10, 11, mark), (11, 12, "attn"), (20, 21, "gemm"),
               (30, 31, f"void {mark}(long)"), (40, 45, "after")]
    windows = bench.split_at_markers(kernels, lambda name: mark in name)
    assert windows == [(6, 10), (2, 19)]
    assert bench.split_at_markers([(5, 6, mark)], lambda name: mark in name) == [(0, 0)]
    assert bench.split_at_markers([(0, 1, "gemm")], lambda name: mark in name) == []


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_profile_on_cuda_reports_busy_time_by_step_size():
    """On a GPU, --profile's kernel list splits at the step markers into one window per step (the kit's
    profile_720p5 relies on it; this runs in the kit's gpu_tests step first, with the tiny model)."""
    import re

    bench = load_benchmark("bench_generate")
    text = bench.main(["--device", "cuda", "--config", "tiny", "--cases", "mid5", "--num-scales", "3", "--profile"])
    assert "GPU busy by step size (" in text and "not available" not in text, text
    busy, span = map(float, re.search(r"tokens ([0-9.]+) s of ([0-9.]+) s", text).groups())
    assert 0 < busy <= span * 1.01, text


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_on_cuda_replay_every_small_step_of_the_timed_run():
    """--cuda-graphs with --warmup: the warm-up generation captures, the timed one replays every step that can be
    graphed (the kit's official_720p5_graphs relies on it; this runs in gpu_tests first, with the tiny model)."""
    import re

    bench = load_benchmark("bench_generate")
    text = bench.main(["--device", "cuda", "--config", "tiny", "--cases", "mid5", "--num-scales", "5",
                       "--warmup", "--cuda-graphs"])
    replayed, steps, captured = map(int, re.search(r"(\d+) of (\d+) steps replayed \((\d+) captured", text).groups())
    assert captured == 0 and replayed >= steps - 2, text


def test_cuda_graphs_flag_and_report():
    import torch
    from graph_emulation import EmulatedGraphBackend

    from infinitystar.config import TRANSFORMER_PRESETS
    from infinitystar.cuda_graphs import GRAPH_MAX_TOKENS, StepGraphs
    from infinitystar.sampler import TextCondition, sample
    from infinitystar.schedule import build_schedule
    from infinitystar.transformer import InfinityStarTransformer

    bench = load_benchmark("bench_generate")
    assert bench.parse_args(["--cuda-graphs"]).cuda_graphs == GRAPH_MAX_TOKENS
    assert bench.parse_args(["--cuda-graphs", "512"]).cuda_graphs == 512 and not bench.parse_args([]).cuda_graphs
    with pytest.raises(SystemExit, match="needs --device cuda"):
        bench.main(["--device", "cpu", "--config", "tiny", "--cuda-graphs"])
    cfg = TRANSFORMER_PRESETS["tiny"]
    model = InfinityStarTransformer(cfg).eval()
    sched = build_schedule("0.06M", "1:1", 1, num_scales=4)
    graphs = StepGraphs(backend=EmulatedGraphBackend())
    for seed in (0, 1):
        sample(model, TextCondition(torch.randn(4, cfg.text_channels)), sched, seed=seed, cuda_graphs=graphs)
    line = bench.graphs_line(graphs, sched)
    assert line.startswith(f"{sched.num_steps} of {sched.num_steps} steps replayed (0 captured in this run), 0 eager")


def test_bench_run_case_times_a_replaying_generation_with_cuda_graphs(monkeypatch):
    """The bench's wiring on the CPU, the CUDA graphs emulated: the warm-up generation captures, the timed one
    replays every step but the one storing the clip reference, and the notes say so."""
    import re

    import torch
    from graph_emulation import EmulatedGraphBackend

    from infinitystar.cuda_graphs import StepGraphs

    bench = load_benchmark("bench_generate")
    made = {}
    monkeypatch.setattr(bench, "step_graphs", lambda model, n: made.setdefault(
        id(model), StepGraphs(n, backend=EmulatedGraphBackend())))
    args = bench.parse_args(["--device", "cpu", "--config", "tiny", "--num-scales", "4", "--warmup", "--no-memory",
                             "--cuda-graphs", "4096"])
    args.weights, args.attention = "fp32", "sdpa"  # what _setup resolves (it refuses --cuda-graphs on a CPU)
    rows = bench.run_case(args, bench.CONFIGS["tiny"], torch.device("cpu"), "mid5", "0.06M", 81, None)
    (graphs,) = made.values()
    replayed, steps, captured, eager = map(int, re.match(
        r"(\d+) of (\d+) steps replayed \((\d+) captured in this run\), (\d+) eager; up to 4096 tokens",
        rows[0].extra["cuda graphs"]).groups())
    assert (replayed, captured, eager) == (steps - 1, 0, 1) and graphs.counts["replayed"] == replayed


def test_bench_generate_refuses_full_on_cpu():
    bench = load_benchmark("bench_generate")
    with pytest.raises(SystemExit, match="needs a GPU"):
        bench.main(["--device", "cpu", "--config", "full"])


def test_bench_decode_cpu_smoke():
    bench = load_benchmark("bench_decode")
    text = bench.main(["--device", "cpu", "--config", "mid", "--cells", "1x2", "--latents", "3",
                       "--chunks", "official,all", "--threads", "1"])
    header, rows = _table(text)
    assert header == bench.COLUMNS
    assert [r[3] for r in rows] == ["official", "all"] and all(r[1] == "9" for r in rows)
    assert all(float(r[5]) > 0 for r in rows)


def test_official_cuda_runs_get_expandable_segments_before_cuda_starts(monkeypatch):
    """--official on CUDA: PyTorch's allocator is set to expandable segments before the official code is imported
    or CUDA starts (the official 720p run ran out of memory on an H100 with 12.5 GiB reserved but unused); a
    setting the user made is kept; the settings line names it."""
    import torch

    bench = load_benchmark("bench_generate")
    import official

    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "_init_cuda", lambda device: seen.append(("cuda", os.environ.get(ALLOC))))
    monkeypatch.setattr(official, "import_official", lambda path: seen.append(("import", os.environ.get(ALLOC))))
    monkeypatch.setattr(bench, "machine_line", lambda device: "a GPU")
    import infinitystar.attention as attention

    # resolving attention "auto" asks the GPU for its capability, which starts CUDA: after the setting too
    monkeypatch.setattr(attention, "auto_backend", lambda device: seen.append(("auto", os.environ.get(ALLOC))) or "sdpa")
    monkeypatch.delenv(ALLOC, raising=False)
    args, device, config, _ = bench._setup(["--device", "cuda", "--config", "tiny", "--official", "somewhere"])
    assert seen == [("auto", "expandable_segments:True"), ("import", "expandable_segments:True"),
                    ("cuda", "expandable_segments:True")]
    assert f"{ALLOC}=expandable_segments:True" in bench._settings_line(args, config, device)
    monkeypatch.setenv(ALLOC, "max_split_size_mb:512")
    bench._setup(["--device", "cuda", "--config", "tiny", "--official", "somewhere"])
    assert seen[-1] == ("cuda", "max_split_size_mb:512")
    monkeypatch.delenv(ALLOC)
    bench._setup(["--device", "cuda", "--config", "tiny"])  # ours alone: the allocator is left as it is
    assert seen[-1] == ("cuda", None)


ALLOC = "PYTORCH_CUDA_ALLOC_CONF"


def _standin(kernel):
    official = load_benchmark("official")
    official.STANDIN_KERNEL = kernel  # the stub reads the kernel from the module that made it
    return official._flash_attn_stub().flash_attn_func


@pytest.mark.parametrize("kernel", ["flash", "sdpa", "cudnn"])
def test_official_standin_is_unmasked_attention_in_the_flash_attn_layout(kernel):
    """The flash_attn stand-in takes and returns (B, L, H, D) like flash-attn; on a CPU every kernel choice computes
    the same fp32 attention."""
    import torch

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 4, 16, generator=g) for n in (5, 7, 7))
    got = _standin(kernel)(q, k, v, softmax_scale=0.3)
    want = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q, k) * 0.3, -1)
    assert got.shape == (2, 5, 4, 16) and got.dtype == torch.float32
    assert torch.allclose(got, torch.einsum("bhlm,bmhd->blhd", want, v), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kernel, name, not_name", [("flash", "flash_fwd", "cudnn"), ("cudnn", "cudnn", "flash_fwd")])
def test_official_standin_runs_the_named_kernel_on_cuda(kernel, name, not_name):
    """--official-attention / --parity-floor: the stand-in runs the kernel it names on the official code's layout
    (bf16 (B, L, H, D) under autocast), so a kernel floor of 0 cannot come from a silent fall-back."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 1500, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    attn = _standin(kernel)
    with torch.autocast("cuda", torch.bfloat16):
        attn(q, k, v)  # plan built outside the profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = attn(q, k, v)
            torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages()]
    assert [n for n in names if name in n] and not [n for n in names if not_name in n], names
    assert out.dtype == torch.bfloat16 and out.shape == q.shape


@pytest.mark.parametrize("script", ["parity", "bench_generate", "bench_decode", "fake_memory", "load_memory",
                                    "encode_frames_memory", "read_tail_speed"])
def test_benchmark_scripts_run_from_a_checkout_without_installing(script, tmp_path):
    """The README's commands (``python benchmarks/X.py ...``) from any folder, with nothing installed or on
    PYTHONPATH: each script finds the package itself."""
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{script}.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(path), "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_encode_frames_memory_runs_at_a_small_size(tmp_path):
    """The frame-memory benchmark end to end on a small source (a smoke run, not a measurement): both rows, the
    tensors the size they must be (81 frames of 0.06M 16:9: uint8 fitted, float32 at the source's pick)."""
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "encode_frames_memory.py"
    done = subprocess.run([sys.executable, str(path), "--height", "144", "--width", "256", "--resolution", "0.06M",
                           "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[2:]}
    assert set(rows) == {"fitted", "source"} and rows["fitted"][1] == rows["source"][1] == "336x192"
    assert float(rows["fitted"][2]) == round(81 * 192 * 336 * 3 / 2**20)
    assert float(rows["source"][2]) == round(81 * 192 * 336 * 3 * 4 / 2**20)


def test_read_tail_speed_runs_at_a_small_size(tmp_path):
    """The tail-read benchmark end to end on a small source (a smoke run, not a measurement): its three rows, the
    window of the last 5 s of an 8 s 30 fps video (frames 90..239), the seek's frames equal to the full decode's."""
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "read_tail_speed.py"
    done = subprocess.run([sys.executable, str(path), "--seconds", "8", "--height", "96", "--width", "128",
                           "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "240 frames at 30 fps" in done.stdout and "frames 90..239" in done.stdout
    rows = {line.split()[0]: float(line.split()[-1]) for line in done.stdout.splitlines()[2:]}
    assert set(rows) == {"count", "seek", "from"} and all(v >= 0 for v in rows.values())
