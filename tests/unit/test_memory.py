import pytest
import torch

from infinitystar.config import TRANSFORMER_PRESETS
from infinitystar.memory import estimate_sampling_memory, kv_peak_tokens
from infinitystar.sampler import TextCondition, sample
from infinitystar.schedule import build_schedule
from infinitystar.transformer import InfinityStarTransformer

BIG, TINY = TRANSFORMER_PRESETS["8b"], TRANSFORMER_PRESETS["tiny"]


def test_monotonic_and_plausible_for_8b():
    est = {key: estimate_sampling_memory(BIG, build_schedule(pn, "16:9", f))
           for key, (pn, f) in {"img480": ("480p", 1), "480": ("480p", 81), "480x2": ("480p", 161),
                                "720": ("720p", 81)}.items()}
    assert est["img480"] < est["480"] < est["480x2"] and est["480"] < est["720"]
    assert 2 * 2**30 < est["480"] < 40 * 2**30 and est["720"] < 80 * 2**30
    s = build_schedule("480p", "16:9", 81)
    assert estimate_sampling_memory(BIG, s, dtype=torch.float32) > estimate_sampling_memory(BIG, s)
    assert estimate_sampling_memory(BIG, s, batch=1) < estimate_sampling_memory(BIG, s)


def test_kv_part_matches_a_measured_run():
    torch.manual_seed(0)
    model = InfinityStarTransformer(TINY).eval()
    sched = build_schedule("0.06M", "1:1", 161, image_repetition=(1,) * 6, video_repetition=(1,) * 6, num_scales=6)
    L = 9
    out = sample(model, TextCondition(torch.randn(L, TINY.text_channels)), sched, seed=0)
    per_token = 2 * TINY.depth * 2 * TINY.num_kv_heads * TINY.head_dim * 4  # k+v, layers, CFG batch, fp32
    assert out.kv_peak_bytes == per_token * kv_peak_tokens(sched, text_tokens=L)
    assert estimate_sampling_memory(TINY, sched, dtype=torch.float32, text_tokens=L) > out.kv_peak_bytes


def test_offloaded_kv_run_is_identical_and_keeps_only_text_on_the_device():
    torch.manual_seed(0)
    model = InfinityStarTransformer(TINY).eval()
    sched = build_schedule("0.06M", "1:1", 161, image_repetition=(1,) * 6, video_repetition=(1,) * 6, num_scales=6)
    L = 9
    text = TextCondition(torch.randn(L, TINY.text_channels))
    runs = {}
    for offload in (False, True):
        logits = []
        out = sample(model, text, sched, seed=4, offload_kv=offload, step_hook=lambda r, out=logits: out.append(r.logits.clone()))
        runs[offload] = (out, logits)
    (a, la), (b, lb) = runs[False], runs[True]
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))
    assert all(torch.equal(x, y) for x, y in zip(la, lb))
    per_token = 2 * TINY.depth * 2 * TINY.num_kv_heads * TINY.head_dim * 4
    assert a.kv_offloaded_bytes == 0 and b.kv_peak_bytes == per_token * L
    assert b.kv_peak_bytes + b.kv_offloaded_bytes >= a.kv_peak_bytes > b.kv_peak_bytes
    assert sample(model, text, sched, seed=4, offload_kv="auto").kv_offloaded_bytes == 0  # CPU: never


def test_offload_estimate_and_choice():
    from infinitystar.memory import choose_kv_offload

    s10 = build_schedule("480p", "16:9", 161)
    full = estimate_sampling_memory(BIG, s10)
    off = estimate_sampling_memory(BIG, s10, offload_kv=True)
    ref = 2 * BIG.depth * 2 * BIG.num_kv_heads * BIG.head_dim * 2 * 31_800  # clip 1's last scale, bf16
    assert full - off >= ref  # at least the clip-1 reference is gone from the device
    assert not choose_kv_offload(BIG, s10, available=full + 1)
    assert choose_kv_offload(BIG, s10, available=full - 1)
    with pytest.raises(ValueError, match="offload_kv"):
        sample(InfinityStarTransformer(TINY).eval(), TextCondition(torch.randn(3, TINY.text_channels)),
               build_schedule("0.06M", "1:1", 1), seed=0, offload_kv="yes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offloaded_kv_on_cuda_is_identical_and_pinned():
    torch.manual_seed(0)
    model = InfinityStarTransformer(TINY).eval().cuda()
    sched = build_schedule("0.06M", "1:1", 161, image_repetition=(1,) * 6, video_repetition=(1,) * 6, num_scales=6)
    text = TextCondition(torch.randn(9, TINY.text_channels))
    a = sample(model, text, sched, seed=4, offload_kv=False, compute_dtype=torch.bfloat16, generator_device="cuda")
    b = sample(model, text, sched, seed=4, offload_kv=True, compute_dtype=torch.bfloat16, generator_device="cuda")
    assert b.kv_offloaded_bytes > 0 and b.kv_peak_bytes < a.kv_peak_bytes
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))
