"""benchmarks/fake_memory.py: peak device memory of a generation measured on fake tensors (issue 7 without a GPU).

The live-bytes tracker is checked against torch.profiler's allocation records on a real CPU run, then the
CUDA code path on fake tensors against the estimate."""
import pytest
import torch
from bench_loader import load_benchmark
from torch._subclasses.fake_tensor import FakeTensorMode

from infinitystar.config import TransformerConfig
from infinitystar.memory import estimate_sampling_memory, measure_peak_bytes
from infinitystar.sampler import TextCondition, sample
from infinitystar.schedule import build_schedule
from infinitystar.transformer import InfinityStarTransformer

CFG = TransformerConfig(depth=2, block_chunks=1, width=256, num_heads=4, num_kv_heads=2, mlp_hidden=1024,
                        text_channels=32)
L = 7


@pytest.fixture(scope="module")
def fm():
    return load_benchmark("fake_memory")


def _schedule(frames=81):
    return build_schedule("0.06M", "16:9", frames, num_scales=8, image_repetition=(1,) * 8, video_repetition=(1,) * 8)


def test_tracker_counts_live_storages(fm):
    with FakeTensorMode(), fm.LiveDeviceBytes("cpu") as tracker:
        a = torch.empty(1000, dtype=torch.float32)
        b = a.view(10, 100)  # a view: no new storage, and it keeps a's storage alive
        c = torch.empty(500, dtype=torch.bfloat16)
        assert tracker.current == 5000
        del a, c
        assert tracker.current == 4000
        d = torch.empty(250, dtype=torch.float64)
        assert tracker.current == 6000 and tracker.peak == 6000
        del b
        assert tracker.current == 2000 and d.numel() == 250
        torch.empty(10, device="meta")  # another device: not counted
        assert tracker.current == 2000


@pytest.mark.parametrize("chunk", [None, 256])
def test_fake_run_matches_the_profiler_on_a_real_run(fm, chunk, single_thread):
    """Same op sequence (CPU path, fp32), real tensors under torch.profiler vs fake tensors under the tracker."""
    torch.manual_seed(0)
    model = InfinityStarTransformer(CFG).eval()
    text = TextCondition(torch.randn(L, CFG.text_channels))
    _, real = measure_peak_bytes(lambda: sample(model, text, _schedule(), seed=0, chunk_tokens=chunk))
    mode = FakeTensorMode()
    fake_model = fm.fake_model(CFG, mode, torch.float32)  # all fp32, like the real run
    with mode, fm.no_value_checks():
        fake_text = TextCondition(torch.empty(L, CFG.text_channels))
        with fm.LiveDeviceBytes("cpu") as tracker:
            sample(fake_model, fake_text, _schedule(), seed=0, chunk_tokens=chunk)
    assert tracker.peak == pytest.approx(real, rel=0.02)


def test_cuda_path_on_fake_tensors_against_the_estimate(fm, single_thread):
    """The CUDA code path (bf16, GQA-native attention, fused norm), two clips, without the K/V offload, with it
    for one layer of two, and for both."""
    sched = _schedule(161)
    peaks = {}
    for offload in (0, 1, 2):  # layers of two
        peak, weight_bytes = fm.measure(CFG, sched, torch.bfloat16, text_tokens=L, chunk_tokens=256,
                                        offload_kv=offload)
        est = estimate_sampling_memory(CFG, sched, dtype=torch.bfloat16, text_tokens=L, chunk_tokens=256,
                                       offload_kv=offload, native_gqa=True, weight_dtype=torch.bfloat16)
        assert 0.7 <= est / peak <= 1.4, (offload, est, peak)
        peaks[offload] = peak
    layout = InfinityStarTransformer(CFG, device="meta").apply_precision_layout(torch.bfloat16)
    assert weight_bytes == sum(p.numel() * p.element_size() for p in layout.parameters())
    assert peaks[2] < peaks[1] < peaks[0]  # the clip-1 reference left the device, half or whole


def test_fake_decode_matches_the_profiler_on_a_real_decode(fm, single_thread):
    from infinitystar.vae import VaeConfig, VideoTokenizer

    torch.manual_seed(0)
    tokenizer = VideoTokenizer(VaeConfig()).eval()
    codes = torch.randn(1, 64, 5, 2, 3) * 0.3
    with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=False):  # as the fake run does
        _, real = measure_peak_bytes(lambda: tokenizer.decode(codes))
    assert fm.measure_decode(codes.shape, torch.float32) == pytest.approx(real, rel=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("pn, frames, target, partial", [("720p", 81, 24e9, False), ("480p", 161, 16e9, True)],
                         ids=["720p5-fp8", "480p10-fp8"])
def test_full_size_meets_the_targets_on_fake_tensors(fm, pn, frames, target, partial):
    """Issue 7's targets, measured on the full 8.77B model (fake tensors, about a minute each): with fp8 blocks and
    the K/V offload "auto" would choose under the target (720p 5 s: none; 480p 10 s: part of the layers), peak
    device memory within the target, and the estimate the nodes ask ComfyUI for is not below the measurement."""
    from infinitystar.config import TRANSFORMER_PRESETS

    big = TRANSFORMER_PRESETS["8b"]
    schedule = build_schedule(pn, "16:9", frames)
    offload = fm.auto_offload_layers(big, schedule, torch.float8_e4m3fn, target)
    assert (0 < offload < big.depth) if partial else offload == 0, offload  # 720p 5 s fits; 480p 10 s needs some
    peak, weights = fm.measure(big, schedule, torch.float8_e4m3fn, offload_kv=offload)
    assert weights + peak <= target, (weights, peak)
    est = estimate_sampling_memory(big, schedule, offload_kv=offload, weight_dtype=torch.float8_e4m3fn)
    assert peak <= est <= 1.3 * peak, (est, peak)


@pytest.mark.parametrize("weights", ["gguf_q8_0", "gguf_q4_k"])
def test_gguf_blocks_on_fake_tensors_match_a_real_run_and_the_estimate(fm, weights, single_thread):
    """GGUF blocks (dequantized per call): the fake run counts what torch.profiler counts on a real run with the
    same quantized model, and the estimate for uint8 storage (with the dequantizing workspace) is not below it."""
    from infinitystar import gguf

    name = fm.GGUF[weights]
    torch.manual_seed(0)
    model = InfinityStarTransformer(CFG, ops=gguf.ops).eval().requires_grad_(False)
    model.apply_precision_layout(torch.bfloat16)
    stored = 0
    for module in model.block_stack.modules():
        if isinstance(module, gguf.GGUFLinear):
            module.weight = torch.nn.Parameter(gguf.quantize(module.weight.float(), name), requires_grad=False)
            module.gguf_type = gguf.QUANT_IDS[name]
            stored += module.weight.numel()
    text = TextCondition(torch.randn(L, CFG.text_channels))
    _, real = measure_peak_bytes(lambda: sample(model, text, _schedule(), seed=0, chunk_tokens=256))
    mode = FakeTensorMode()
    fake = fm.fake_model(CFG, mode, torch.uint8, name)
    assert stored == sum(m.weight.numel() for m in fake.block_stack.modules() if isinstance(m, gguf.GGUFLinear))
    with mode, fm.no_value_checks():
        fake_text = TextCondition(torch.empty(L, CFG.text_channels))
        with fm.LiveDeviceBytes("cpu", existing=[*fake.parameters(), *fake.buffers()]) as tracker:
            sample(fake, fake_text, _schedule(), seed=0, chunk_tokens=256)
    assert tracker.peak == pytest.approx(real, rel=0.02)
    peak, _ = fm.measure(CFG, _schedule(), torch.uint8, text_tokens=L, gguf_type=name, chunk_tokens=256)
    est = estimate_sampling_memory(CFG, _schedule(), dtype=torch.bfloat16, text_tokens=L, chunk_tokens=256,
                                   native_gqa=True, weight_dtype=torch.uint8)
    assert 1.0 <= est / peak <= 1.4, (est, peak)


def test_interact_clip_on_fake_tensors_and_its_estimate(fm, single_thread):
    """One interact clip with its two prefix conditions: the fake run counts what the profiler counts on a real
    CPU run (fp32), and on the CUDA path the estimate with the conditions counted as text is not below it."""
    from infinitystar import interact

    sched = interact.clip_schedule("0.06M", "16:9")
    _, H, W = sched.scales[-1]
    torch.manual_seed(0)
    model = InfinityStarTransformer(CFG).eval()
    text = TextCondition(torch.randn(L, CFG.text_channels))
    conds = interact.conditions(torch.randn(1, 64, 21, H, W), torch.randn(1, 64, 1, H, W), sched)
    _, real = measure_peak_bytes(lambda: sample(model, text, sched, seed=0, chunk_tokens=256, conditions=conds))
    mode = FakeTensorMode()
    fake_model = fm.fake_model(CFG, mode, torch.float32)
    with mode, fm.no_value_checks():
        fake_text = TextCondition(torch.empty(L, CFG.text_channels))
        fake_conds = interact.conditions(torch.empty(1, 64, 21, H, W), torch.empty(1, 64, 1, H, W), sched)
        with fm.LiveDeviceBytes("cpu") as tracker:
            sample(fake_model, fake_text, sched, seed=0, chunk_tokens=256, conditions=fake_conds)
    assert tracker.peak == pytest.approx(real, rel=0.02)

    peak, _ = fm.measure(CFG, sched, torch.bfloat16, text_tokens=L, chunk_tokens=256, interact_clip=True)
    plain, _ = fm.measure(CFG, sched, torch.bfloat16, text_tokens=L, chunk_tokens=256)
    extra = interact.condition_tokens(sched)
    assert extra == 20 * sched.scales[7][1] * sched.scales[7][2] + 3 * H * W
    est = estimate_sampling_memory(CFG, sched, dtype=torch.bfloat16, text_tokens=L + extra, chunk_tokens=256,
                                   native_gqa=True, weight_dtype=torch.bfloat16)
    assert peak > plain and 1.0 <= est / peak <= 1.4, (est, peak, plain)
