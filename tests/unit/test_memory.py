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
