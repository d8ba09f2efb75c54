"""CUDA graphs of whole steps (infinitystar.cuda_graphs): the bookkeeping on the CPU through a stand-in with the
semantics of a captured graph (tests/graph_emulation.py: fixed tensors, poisoned capture results), and the real
torch.cuda.CUDAGraph on a GPU. Graphed generations must equal eager ones bit for bit."""
import dataclasses
import logging

import pytest
import torch
from graph_emulation import EmulatedGraphBackend

from infinitystar.config import TRANSFORMER_PRESETS
from infinitystar.cuda_graphs import StepGraphs, release_step_graphs, step_graphs
from infinitystar.sampler import TextCondition, sample
from infinitystar.schedule import build_schedule
from infinitystar.transformer import InfinityStarTransformer

TINY = TRANSFORMER_PRESETS["tiny"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return InfinityStarTransformer(dataclasses.replace(TINY, depth=3, block_chunks=3)).eval()


def _text(seed, tokens=9):
    return TextCondition(torch.randn(tokens, TINY.text_channels, generator=torch.Generator().manual_seed(seed)))


def _run(model, text, sched, seed, **kw):
    logits = []
    out = sample(model, text, sched, seed=seed, step_hook=lambda r: logits.append(r.logits.clone()), **kw)
    return out, logits


def _assert_same(a, b):
    (out_a, logits_a), (out_b, logits_b) = a, b
    assert len(logits_a) == len(logits_b)
    for i, (x, y) in enumerate(zip(logits_a, logits_b)):
        assert torch.equal(x, y), f"step {i}: max |Δ| {(x - y).abs().max().item()}"
    assert all(torch.equal(x, y) for x, y in zip(out_a.bits, out_b.bits))


def test_graphed_generations_equal_eager_ones_and_replay_across_generations(model):
    """Three generations share one StepGraphs: other prompts of the same length, other seeds. The first captures each
    step shape at its second sight; the later ones replay every step but the one that stores the clip reference."""
    sched = build_schedule("0.06M", "16:9", 81, num_scales=7)
    graphs = StepGraphs(backend=EmulatedGraphBackend())
    shapes = {s.num_tokens for s in sched.steps}
    stores = sum(s.is_last_rep and s.si in sched.ref_last_use() for s in sched.steps)
    for n, (text_seed, seed) in enumerate(((1, 1), (2, 2), (1, 3))):
        text = _text(text_seed)
        _assert_same(_run(model, text, sched, seed), _run(model, text, sched, seed, cuda_graphs=graphs))
        if n == 0:
            assert graphs.counts["captured"] == len(shapes) and graphs.counts["eager"] == len(shapes) + stores
        else:
            assert graphs.counts == {"eager": stores, "captured": 0, "replayed": sched.num_steps - stores}
    assert graphs.nbytes() > 0
    graphs.release()
    assert graphs.nbytes() == 0 and not graphs.graphs


def test_a_new_prompt_length_or_moved_weights_drop_the_graphs(model):
    sched = build_schedule("0.06M", "1:1", 1, num_scales=6)
    graphs = StepGraphs(backend=EmulatedGraphBackend())
    _run(model, _text(1), sched, 0, cuda_graphs=graphs)
    assert graphs.graphs
    eager = _run(model, _text(2, tokens=5), sched, 4)
    graphed = _run(model, _text(2, tokens=5), sched, 4, cuda_graphs=graphs)  # the text K/V homes change shape
    _assert_same(eager, graphed)
    assert graphs.counts["replayed"] > 0 and all(k[3][0][1][2] == 5 for k in graphs.graphs)  # rebuilt for 5 tokens
    p = next(model.block_stack.parameters())
    old = p.data
    try:
        p.data = old.clone()  # the weights at another address (ComfyUI moved the model off the device and back)
        graphs.begin(model, torch.float32)
        assert not graphs.graphs and not graphs.homes
    finally:
        p.data = old


def test_a_graph_whose_homes_moved_is_captured_again(model):
    """A graph reads the K/V homes it was captured with; if the cache's entries live elsewhere now (here: a home
    replaced behind the graphs' back), that graph is captured again instead of replaying stale K/V."""
    sched = build_schedule("0.06M", "1:1", 1, num_scales=5)
    graphs = StepGraphs(backend=EmulatedGraphBackend())
    _run(model, _text(1), sched, 0, cuda_graphs=graphs)
    k, v = graphs.homes[(1, "t0")]
    graphs.homes[(1, "t0")] = (k.clone(), v.clone())  # same layout: the next text step writes into the new pair
    _assert_same(_run(model, _text(2), sched, 1), _run(model, _text(2), sched, 1, cuda_graphs=graphs))
    assert graphs.counts["captured"] == len(graphs.graphs) > 0


def test_chunked_storing_and_offloaded_steps_run_eagerly(model):
    """Token blocks, steps that store K/V and steps whose references live in host memory are not graphed, and the
    whole run still equals the eager one."""
    sched = build_schedule("0.06M", "16:9", 161, num_scales=6)
    text = _text(3)
    for kw in (dict(chunk_tokens=16), dict(offload_kv=True), dict(offload_kv=1)):
        graphs = StepGraphs(backend=EmulatedGraphBackend())
        for seed in (5, 6):
            _assert_same(_run(model, text, sched, seed, **kw), _run(model, text, sched, seed, cuda_graphs=graphs, **kw))
        stores = {s.index for s in sched.steps if s.is_last_rep and s.si in sched.ref_last_use()}
        eager = [s for s in sched.steps if s.num_tokens > kw.get("chunk_tokens", 1 << 30) or s.index in stores
                 or ("offload_kv" in kw and s.ref_sids)]
        assert stores and graphs.counts["eager"] == len(eager) < sched.num_steps, (kw, graphs.counts)  # 2nd run
        assert graphs.counts["replayed"] == sched.num_steps - len(eager), (kw, graphs.counts)


def test_extension_and_teacher_forcing_with_graphs(model):
    """Video extension: the prefix replay stores the clip references into the homes that the graphed steps of the
    new clip read; with teacher-forced bits (I2V/V2V) as well."""
    sched = build_schedule("0.06M", "1:1", 161, num_scales=5)
    text = _text(4)
    full, _ = _run(model, text, sched, 5)
    start = sched.steps_before_clip(2)
    graphs = StepGraphs(backend=EmulatedGraphBackend())
    for seed in (6, 7):  # the second extension replays what the first captured
        kw = dict(prefix_bits=full.bits[:start], teacher_bits=full.bits[:start + 3])
        _assert_same(_run(model, text, sched, seed, **kw), _run(model, text, sched, seed, cuda_graphs=graphs, **kw))
    assert graphs.counts["replayed"] > 0 and any(k[3][0][0] != "t0" for k in graphs.graphs)  # graphs read clip refs


def test_max_tokens_bounds_the_graphed_steps(model):
    sched = build_schedule("0.06M", "1:1", 1, num_scales=6)
    graphs = StepGraphs(max_tokens=20, backend=EmulatedGraphBackend())
    for seed in (0, 1):
        _run(model, _text(1), sched, seed, cuda_graphs=graphs)
    assert all(k[0][1] <= 20 for k in graphs.graphs)
    assert graphs.counts["eager"] == sum(s.num_tokens > 20 for s in sched.steps)


def test_a_failed_capture_falls_back_to_eager_steps(model, caplog):
    class Failing(EmulatedGraphBackend):
        def capture(self, fn, device):
            raise RuntimeError("operation not permitted when stream is capturing")

    sched = build_schedule("0.06M", "1:1", 1, num_scales=5)
    graphs = StepGraphs(backend=Failing())
    with caplog.at_level(logging.WARNING, logger="infinitystar.cuda_graphs"):
        graphed = _run(model, _text(1), sched, 2, cuda_graphs=graphs)
    _assert_same(_run(model, _text(1), sched, 2), graphed)
    assert graphs.failed and "not permitted" in caplog.text and graphs.counts["replayed"] == 0
    assert graphs.counts["captured"] == 0 and caplog.text.count("failed") == len(graphs.failed)  # once per shape


def test_weights_off_the_device_turn_graphs_off_for_the_generation(model):
    """Block weights streamed from the host (ComfyUI's partial loading) would be host copies inside a graph."""

    class OtherDevice(EmulatedGraphBackend):
        device_type = "meta"  # the model's weights are "elsewhere"

    graphs = StepGraphs(backend=OtherDevice())
    sched = build_schedule("0.06M", "1:1", 1, num_scales=4)
    for seed in (0, 1):
        _run(model, _text(1), sched, seed, cuda_graphs=graphs)
    assert "not on the device" in graphs.off and graphs.counts["eager"] == sched.num_steps and not graphs.graphs


def test_cuda_graphs_need_a_cuda_model(model):
    with pytest.raises(ValueError, match="CUDA device"):
        sample(model, _text(1), build_schedule("0.06M", "1:1", 1, num_scales=3), seed=0, cuda_graphs=True)


def test_one_branch_and_two_share_graphs_without_mixing(model):
    """Guidance 1 runs batch 1: guided and unguided generations alternating on one StepGraphs each equal their eager
    run, and each graphs its own steps (the batch is part of a step's shape; the K/V homes of the other batch are
    re-placed, which drops the other batch's graphs)."""
    from infinitystar.guidance import GuidanceConfig

    sched = build_schedule("0.06M", "16:9", 81, num_scales=7)
    graphs = StepGraphs(backend=EmulatedGraphBackend())
    text = _text(1)
    for scale, batch in ((1.0, 1), (34.0, 2), (1.0, 1), (34.0, 2)):
        kw = dict(guidance=GuidanceConfig(scale=scale))
        _assert_same(_run(model, text, sched, 5, **kw), _run(model, text, sched, 5, cuda_graphs=graphs, **kw))
        assert graphs.counts["captured"] > 0 and {key[0][0] for key in graphs.graphs} == {batch}  # (B, L, C) tokens
    graphs.release()


def test_the_model_keeps_its_graphs_until_released(model):
    graphs = step_graphs(model)
    assert step_graphs(model) is graphs
    release_step_graphs(model)
    assert step_graphs(model) is not graphs
    release_step_graphs(model)
    release_step_graphs(model)  # none: a no-op


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graphs_equal_eager_on_cuda(compile):
    """The real torch.cuda.CUDAGraph, bf16: two generations (other prompt of the same length, other seed), graphed
    equal to eager bit for bit, the second one replaying every graphed step; with torch.compile'd block parts too."""
    from infinitystar.transformer import compile_unavailable

    if compile and compile_unavailable("cuda"):
        pytest.skip(compile_unavailable("cuda"))
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, width=256, num_heads=2, num_kv_heads=1, mlp_hidden=512, depth=4, block_chunks=2)
    model = InfinityStarTransformer(cfg, device="cuda").eval().apply_precision_layout(torch.bfloat16)
    sched = build_schedule("0.06M", "16:9", 81, num_scales=7)
    kw = dict(generator_device="cuda", compile=compile)
    try:
        for n, (text_seed, seed) in enumerate(((1, 1), (2, 2))):
            text = _text(text_seed)
            eager = _run(model, text, sched, seed, **kw)
            graphed = _run(model, text, sched, seed, cuda_graphs=True, **kw)
            _assert_same(eager, graphed)
            counts = step_graphs(model).counts
            assert counts["replayed"] >= (sched.num_steps - 2 if n else 1), counts
    finally:
        release_step_graphs(model)
