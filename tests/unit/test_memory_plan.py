"""The memory plan: exact token-block chunking, fp8 weight storage with on-the-fly upcast, and the
estimate against a measured CPU run."""
import pytest
import torch

from infinitystar.config import TRANSFORMER_PRESETS, TransformerConfig
from infinitystar.memory import auto_chunk_tokens, estimate_sampling_memory, measure_peak_bytes
from infinitystar.ops import CastLinear, cast, store_weights
from infinitystar.sampler import TextCondition, sample
from infinitystar.schedule import build_schedule
from infinitystar.transformer import InfinityStarTransformer, token_spans

GQA = TransformerConfig(depth=2, block_chunks=1, width=128, num_heads=4, num_kv_heads=2, mlp_hidden=256,
                        text_channels=32)


def _model(cfg=GQA, seed=0, ops=torch.nn):
    torch.manual_seed(seed)
    model = InfinityStarTransformer(cfg, ops=ops).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def _run(model, sched, text, **kw):
    logits = []
    out = sample(model, text, sched, seed=3, step_hook=lambda r: logits.append(r.logits.clone()), **kw)
    return out, logits


@pytest.mark.parametrize("round_qkv", [True, False])
def test_chunked_steps_equal_unchunked(round_qkv):
    model = _model()
    sched = build_schedule("0.06M", "16:9", 81, num_scales=6)  # video steps attend to a cached reference
    text = TextCondition(torch.randn(7, GQA.text_channels))
    ref, ref_logits = _run(model, sched, text, chunk_tokens=None, round_qkv_bf16=round_qkv)
    out, logits = _run(model, sched, text, chunk_tokens=7, round_qkv_bf16=round_qkv)  # uneven blocks
    assert max(s.num_tokens for s in sched.steps) > 7
    diff = max((a - b).abs().max().item() for a, b in zip(ref_logits, logits))
    assert diff <= 1e-6
    assert all(torch.equal(a, b) for a, b in zip(ref.bits, out.bits))
    assert torch.allclose(ref.summed_codes, out.summed_codes, atol=1e-6)


def test_chunked_head_logits_equal():
    model = _model()
    hidden = torch.randn(2, 50, GQA.width)
    for semantic in (True, False):
        whole = model.head_logits(hidden, semantic)
        assert (whole - model.head_logits(hidden, semantic, chunk_tokens=16)).abs().max() <= 1e-6


@pytest.mark.parametrize("tokens,n", [(20640, 5120), (72000, 5120), (31800, 5120), (5121, 5120), (100000, 1024),
                                      (1025, 1024), (130, 64), (10, 3), (7, 1), (5, 5), (4, 9)])
def test_token_spans_are_few_balanced_blocks(tokens, n):
    spans = token_spans(tokens, n)
    sizes = [e - s for s, e in spans]
    assert spans[0][0] == 0 and spans[-1][1] == tokens and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert len(spans) == -(-tokens // n) and max(sizes) <= n
    if tokens > n:  # no short last block (a call shape the unchunked forward never makes)
        assert min(sizes) >= n // 2


def test_token_spans_of_the_full_model_steps():
    """Every step of the full-size cases splits into blocks of at least half the auto block (the 480p step of
    20,640 tokens was 4 x 5,120 + 160 before), 128-aligned except the last."""
    n = auto_chunk_tokens(TRANSFORMER_PRESETS["8b"])
    for pn, frames in (("480p", 81), ("720p", 81), ("480p", 161)):
        for step in build_schedule(pn, "16:9", frames).steps:
            sizes = [e - s for s, e in token_spans(step.num_tokens, n)]
            assert max(sizes) <= n and (len(sizes) == 1 or min(sizes) >= n // 2), (pn, step.num_tokens, sizes)
            assert all(size % 128 == 0 for size in sizes[:-1]), (pn, step.num_tokens, sizes)
    assert [e - s for s, e in token_spans(20640, n)][-1] > 160


def test_auto_chunk_tokens():
    big = TRANSFORMER_PRESETS["8b"]
    n = auto_chunk_tokens(big)
    from infinitystar.memory import CHUNK_BUDGET

    assert n % 1024 == 0 and 2 * 2 * big.mlp_hidden * 2 * n <= CHUNK_BUDGET  # gate and up, CFG batch 2, bf16
    assert auto_chunk_tokens(big, dtype=torch.float32) < n
    assert auto_chunk_tokens(TRANSFORMER_PRESETS["tiny"]) > 100_000  # tiny models never chunk
    with pytest.raises(ValueError):
        sample(_model(), TextCondition(torch.randn(3, 32)), build_schedule("0.06M", "1:1", 1, num_scales=2),
               seed=0, chunk_tokens="yes")


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_storage_upcasts_on_the_fly(fp8):
    sched = build_schedule("0.06M", "1:1", 1, num_scales=4)
    text = TextCondition(torch.randn(5, GQA.text_channels))
    stored = _model(ops=cast)
    store_weights(stored.block_stack, fp8)
    assert stored.blocks[0].mlp.up_proj.weight.dtype == fp8 and isinstance(stored.blocks[0].mlp.up_proj, CastLinear)
    assert stored.blocks[0].input_layernorm.weight.dtype == torch.float32  # norms keep their dtype
    # reference: plain torch.nn with the same (fp8-rounded) weights held in fp32
    plain = _model()
    plain.load_state_dict({k: v.float() for k, v in stored.state_dict().items()})
    a, la = _run(stored, sched, text, chunk_tokens=None)
    b, lb = _run(plain, sched, text, chunk_tokens=None)
    assert all(torch.equal(x, y) for x, y in zip(la, lb))
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))


def test_cast_linear_matches_linear():
    torch.manual_seed(0)
    lin = CastLinear(16, 8)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    want = torch.nn.functional.linear(x, lin.weight.to(torch.bfloat16), lin.bias.to(torch.bfloat16))
    assert lin(x).dtype == torch.bfloat16 and torch.equal(lin(x), want)


def _measured_setup(frames: int):
    """A mid-size GQA model, an 8-scale pyramid of ``frames`` frames and 7 text tokens, for profiled runs."""
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    cfg = TransformerConfig(depth=2, block_chunks=1, width=256, num_heads=4, num_kv_heads=2, mlp_hidden=1024,
                            text_channels=32)
    sched = build_schedule("0.06M", "16:9", frames, num_scales=8, image_repetition=(1,) * 8,
                           video_repetition=(1,) * 8)
    L = 7
    return cfg, _model(cfg), sched, TextCondition(torch.randn(L, cfg.text_channels)), L


def test_estimate_matches_measured_peak_and_plan_saves_memory():
    """Measured peak live tensor bytes (torch.profiler) of a mid-size CPU run vs the estimate.

    Stated factor: the estimate lies within [0.7, 1.4] x the measurement, with and without the plan.
    """
    cfg, model, sched, text, L = _measured_setup(frames=81)
    measured = {}
    for chunk in (None, 256):
        _, peak = measure_peak_bytes(lambda c=chunk: sample(model, text, sched, seed=0, chunk_tokens=c))
        est = estimate_sampling_memory(cfg, sched, dtype=torch.float32, text_tokens=L, chunk_tokens=chunk)
        assert 0.7 <= est / peak <= 1.4, (chunk, est, peak)
        measured[chunk] = peak
    assert measured[256] < 0.75 * measured[None]


def test_unguided_estimate_matches_its_measured_peak():
    """Guidance 1 runs one branch: the estimate with batch 1 lies within the same factor of the measured peak, and
    the run peaks well below the guided one."""
    from infinitystar.guidance import GuidanceConfig

    cfg, model, sched, text, L = _measured_setup(frames=81)
    peaks = {}
    for scale, batch in ((1.0, 1), (34.0, 2)):
        guidance = GuidanceConfig(scale=scale)
        assert guidance.branches(sched.scales_per_clip) == batch
        _, peaks[batch] = measure_peak_bytes(lambda g=guidance: sample(model, text, sched, seed=0, chunk_tokens=256,
                                                                        guidance=g))
        est = estimate_sampling_memory(cfg, sched, batch=batch, dtype=torch.float32, text_tokens=L, chunk_tokens=256)
        assert 0.7 <= est / peaks[batch] <= 1.4, (batch, est, peaks[batch])
    assert peaks[1] < 0.75 * peaks[2]


def test_plan_fits_the_targets_on_the_estimate():
    """Issue 7 targets with fp8 weights (8.77 GB, upcast per call): 720p 5 s <= 24 GB, 480p 10 s <= 16 GB."""
    big = TRANSFORMER_PRESETS["8b"]
    weights = 8_768_382_112  # fp8: one byte per parameter

    def est(schedule, **kw):
        return estimate_sampling_memory(big, schedule, weight_dtype=torch.float8_e4m3fn, **kw)

    s720 = build_schedule("720p", "16:9", 81)
    assert weights + est(s720) <= 24e9
    assert weights + est(s720, chunk_tokens=None) > 24e9  # without token blocks it would not fit
    s480 = build_schedule("480p", "16:9", 161)
    assert est(s480) < est(s480, chunk_tokens=None)
    # 480p 10 s <= 16 GB: with the clip-1 reference K/V in host memory, not without
    assert weights + est(s480, offload_kv=True) <= 16e9
    assert weights + est(s480) > 16e9
    # and without relying on GQA-native attention kernels
    assert weights + est(s480, offload_kv=True, native_gqa=False) <= 16e9
    assert weights + est(s720, native_gqa=False) <= 24e9


def test_prepare_kv_repeats_kv_heads_like_attend():
    from infinitystar.attention import attend, prepare_kv

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 5, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 16)
    kk, vv = prepare_kv(q, k, v)
    assert kk.shape == (2, 8, 11, 16) and torch.equal(kk[:, 5], k[:, 1])  # query head h uses KV head h // 4
    assert torch.equal(attend(q, kk, vv), attend(q, k, v))


def test_native_gqa_only_where_the_kernel_takes_gqa():
    from infinitystar.attention import native_gqa

    for dtype in (torch.float32, torch.bfloat16):
        q = torch.zeros(1, 8, 2, 16, dtype=dtype)
        assert not any(native_gqa(q, b) for b in ("auto", "sdpa", "flash", "sage"))  # CPU: official arithmetic


def test_sdpa_gqa_detection_survives_a_builtin_without_signature(monkeypatch):
    # torch 2.11's CUDA build exposes SDPA as a builtin that inspect.signature cannot read (seen on an H100)
    import inspect

    from infinitystar import attention

    want = attention._sdpa_takes_gqa()
    assert want == (tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5))

    def no_signature(obj, *a, **k):
        raise ValueError(f"no signature found for builtin {obj!r}")

    monkeypatch.setattr(inspect, "signature", no_signature)
    attention._sdpa_takes_gqa.cache_clear()  # read once per process: read again without the signature
    assert attention._sdpa_takes_gqa() == want


def test_cuda_index_names_the_device():
    # torch.cuda.set_per_process_memory_fraction and mem_get_info refuse torch.device("cuda") without an index
    from infinitystar.sampler import cuda_index

    assert cuda_index(torch.device("cuda", 1)) == 1 and cuda_index(3) == 3
    if torch.cuda.is_available():
        assert cuda_index(torch.device("cuda")) == torch.cuda.current_device()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_native_gqa_sdpa_matches_repeated_kv_on_cuda():
    from infinitystar.attention import attend, native_gqa

    g = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(2, 32, 300, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(2, 8, 700, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    assert native_gqa(q)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(4, 1), v.float().repeat_interleave(4, 1))
    for backend in ("sdpa", "cudnn"):  # cudnn: cuDNN's kernel alone (GQA K/V as they are too)
        got = attend(q, k, v, backend=backend).float()
        assert (got - want).norm() / want.norm() < 1e-2, backend
    assert torch.backends.cuda.flash_sdp_enabled()  # the kernel selection was restored


def test_offload_estimate_matches_measured_device_share():
    """Two clips: the measured peak minus what the cache holds in host memory (the clip-1 reference, alive
    through every clip-2 step) against the offload estimate, same stated factor [0.7, 1.4]; and the
    reference that leaves the device is what the resident estimate charges for it."""
    cfg, model, sched, text, L = _measured_setup(frames=161)
    resident = estimate_sampling_memory(cfg, sched, dtype=torch.float32, text_tokens=L, chunk_tokens=256)
    for offload in (True, 1):  # every layer, one layer of two
        out, peak = measure_peak_bytes(lambda o=offload: sample(model, text, sched, seed=0, chunk_tokens=256, offload_kv=o))
        device_peak = peak - out.kv_offloaded_bytes
        est = estimate_sampling_memory(cfg, sched, dtype=torch.float32, text_tokens=L, chunk_tokens=256,
                                       offload_kv=offload)
        assert 0.7 <= est / device_peak <= 1.4, (offload, est, device_peak)
        assert resident - est == pytest.approx(out.kv_offloaded_bytes, rel=0.05), offload
