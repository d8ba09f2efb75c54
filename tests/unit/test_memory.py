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
    runs = []
    for offload in (False, 1, True):  # none, the first of the two layers, both
        logits = []
        out = sample(model, text, sched, seed=4, offload_kv=offload, step_hook=lambda r, out=logits: out.append(r.logits.clone()))
        runs.append((out, logits))
    (a, la), (h, lh), (b, lb) = runs
    for other, lother in ((h, lh), (b, lb)):
        assert all(torch.equal(x, y) for x, y in zip(a.bits, other.bits))
        assert all(torch.equal(x, y) for x, y in zip(la, lother))
    per_token = 2 * TINY.depth * 2 * TINY.num_kv_heads * TINY.head_dim * 4
    assert a.kv_offloaded_bytes == 0 and b.kv_peak_bytes == per_token * L
    assert b.kv_peak_bytes + b.kv_offloaded_bytes >= a.kv_peak_bytes > b.kv_peak_bytes
    assert (a.kv_offloaded_layers, h.kv_offloaded_layers, b.kv_offloaded_layers) == (0, 1, TINY.depth)
    assert h.kv_offloaded_bytes * 2 == b.kv_offloaded_bytes  # one layer of two
    assert b.kv_peak_bytes < h.kv_peak_bytes < a.kv_peak_bytes
    assert sample(model, text, sched, seed=4, offload_kv="auto").kv_offloaded_bytes == 0  # CPU: never


def test_offload_estimate_and_choice():
    from infinitystar.memory import choose_kv_offload

    s10 = build_schedule("480p", "16:9", 161)
    full = estimate_sampling_memory(BIG, s10)
    off = estimate_sampling_memory(BIG, s10, offload_kv=True)
    ref = 2 * BIG.depth * 2 * BIG.num_kv_heads * BIG.head_dim * 2 * 31_800  # clip 1's last scale, bf16
    assert full - off >= ref  # at least the clip-1 reference is gone from the device
    assert choose_kv_offload(BIG, s10, available=full) == 0
    assert choose_kv_offload(BIG, s10, available=full - 1) == 1
    assert choose_kv_offload(BIG, s10, available=off) == BIG.depth
    assert choose_kv_offload(BIG, s10, available=off // 2) == BIG.depth  # best effort when nothing fits
    for available in (int(off + 0.3 * (full - off)), int(off + 0.7 * (full - off))):
        n = choose_kv_offload(BIG, s10, available=available)  # the fewest layers that fit
        assert 0 < n < BIG.depth
        assert estimate_sampling_memory(BIG, s10, offload_kv=n) <= available
        assert estimate_sampling_memory(BIG, s10, offload_kv=n - 1) > available
    halves = [estimate_sampling_memory(BIG, s10, offload_kv=n) for n in (0, BIG.depth // 2, BIG.depth)]
    assert halves[0] - halves[1] == halves[1] - halves[2] > 0  # each layer's reference weighs the same
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
    for offload in (1, True):  # one layer of two, both
        b = sample(model, text, sched, seed=4, offload_kv=offload, compute_dtype=torch.bfloat16, generator_device="cuda")
        assert b.kv_offloaded_bytes > 0 and b.kv_peak_bytes < a.kv_peak_bytes
        assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))


def test_auto_offload_on_cuda_takes_the_fewest_layers_that_fit_the_free_memory(monkeypatch):
    """``offload_kv="auto"`` on a CUDA device (its memory queries patched: no GPU here) for the 8B model at
    480p 10 s with fp8 blocks: nothing on a free 80 GB card, part of the layers under a 16 GB per-process cap
    (the fraction a host or benchmark sets), all of them when even that does not fit."""
    import types

    from infinitystar import sampler as sampler_mod
    from infinitystar.memory import choose_kv_offload

    s10 = build_schedule("480p", "16:9", 161)
    model = types.SimpleNamespace(config=BIG, block_dtype=lambda: torch.float8_e4m3fn)
    text = TextCondition(torch.empty(512, 1))
    weights = 8_768_382_112
    total, fraction = 80e9, [1.0]
    monkeypatch.setattr(sampler_mod, "model_device", lambda m: torch.device("cuda", 0))
    from infinitystar import attention

    monkeypatch.setattr(attention, "_capability", lambda index: (9, 0))  # a Hopper GPU: GQA K/V read as they are
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (int(total - weights), int(total)))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: weights)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: weights)
    # raising=False: absent before torch 2.6
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d=None: fraction[0], raising=False)

    def auto(cap_gb):
        fraction[0] = cap_gb * 1e9 / total
        return sampler_mod.resolve_offload_kv("auto", model, s10, text, torch.bfloat16, 5120)

    assert auto(80) == 0
    layers = auto(16)
    room = int(16e9) - weights - sampler_mod.AUTO_HEADROOM
    fp8 = dict(chunk_tokens=5120, weight_dtype=torch.float8_e4m3fn)
    assert layers == choose_kv_offload(BIG, s10, room, **fp8) and 0 < layers < BIG.depth
    assert estimate_sampling_memory(BIG, s10, offload_kv=layers, **fp8) <= room
    assert auto(11) == BIG.depth
    assert sampler_mod.resolve_offload_kv(3, model, s10, text, torch.bfloat16, 5120) == 3  # a count passes through


def test_block_dtype_choice_by_device_memory():
    from infinitystar.memory import choose_block_dtype, weight_bytes

    assert weight_bytes(BIG, torch.bfloat16) == pytest.approx(17.56e9, rel=0.01)  # the official layout's size
    assert weight_bytes(BIG, torch.float8_e4m3fn) == pytest.approx(8.80e9, rel=0.01)
    s720 = build_schedule("720p", "16:9", 81)
    bf16_need = weight_bytes(BIG, torch.bfloat16) + estimate_sampling_memory(BIG, s720, offload_kv=True)
    assert choose_block_dtype(BIG, s720, 80 * 2**30) == torch.bfloat16
    assert choose_block_dtype(BIG, s720, bf16_need) == torch.bfloat16
    assert choose_block_dtype(BIG, s720, bf16_need - 1) == torch.float8_e4m3fn
    assert choose_block_dtype(BIG, s720, 4 * 2**30) == torch.float8_e4m3fn  # nothing fits: the narrowest


def test_automatic_storage_fits_the_weights_largest_runs():
    """fit_block_dtype (the CLI's auto and the Model Loader's auto): the wide storage only when every given run
    fits with it, else fp8 e4m3fn; weights of unknown variant must fit each released variant's largest run."""
    from infinitystar.memory import choose_block_dtype, fit_block_dtype, largest_runs, weight_bytes

    runs = {v: largest_runs(v) for v in ("720p", "480p", "interact", "unknown")}
    assert [(n, s.pn, s.frames) for n, s in runs["720p"]] == [("720p 5 s", "0.90M", 81)]
    assert [(n, s.pn, s.frames) for n, s in runs["480p"]] == [("480p 10 s", "0.40M", 161)]
    assert [n for n, _ in runs["interact"]] == ["480p 10 s"] and [n for n, _ in runs["unknown"]] == ["720p 5 s",
                                                                                                     "480p 10 s"]
    big, gib = TRANSFORMER_PRESETS["8b"], 1 << 30
    need = {v: weight_bytes(big, torch.bfloat16) + estimate_sampling_memory(
        big, s, offload_kv=True, weight_dtype=torch.bfloat16, native_gqa=True) for v, ((_, s),) in
        (("720p", runs["720p"]), ("480p", runs["480p"]))}
    assert 16 * gib < need["480p"] < need["720p"] < 24 * gib
    between = (need["480p"] + need["720p"]) // 2
    pick = {v: fit_block_dtype(big, [s for _, s in runs[v]], between, native_gqa=True) for v in runs}
    assert pick == {"720p": torch.float8_e4m3fn, "480p": torch.bfloat16, "interact": torch.bfloat16,
                    "unknown": torch.float8_e4m3fn}
    (_, s720), = runs["720p"]
    for budget in (16 * gib, 80 * gib):
        assert fit_block_dtype(big, [s720], budget, native_gqa=True) == choose_block_dtype(big, s720, budget,
                                                                                          native_gqa=True)
    assert fit_block_dtype(big, [s720], 80 * gib, torch.float16, native_gqa=True) == torch.float16
