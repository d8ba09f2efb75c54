import importlib.util

import pytest
import torch

from infinitystar.attention import attend, available_backends


def reference(q, k, v):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    w = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
    return w @ v


def test_gqa_matches_reference_without_rounding():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 7, 16, generator=g) for n in (4, 2, 2))
    k = k[:, :, :5].contiguous()
    v = v[:, :, :5].contiguous()
    torch.testing.assert_close(attend(q, k, v, round_qkv_bf16=False), reference(q, k, v), rtol=1e-5, atol=1e-6)


def test_kv_head_j_serves_query_heads_jg_to_jg_plus_g():
    q = torch.randn(1, 4, 3, 8)
    k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    out = attend(q, k, v, round_qkv_bf16=False)
    only0 = attend(q[:, :2], k[:, :1], v[:, :1], round_qkv_bf16=False)
    torch.testing.assert_close(out[:, :2], only0)


def test_bf16_rounding_of_inputs():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(3))
    rounded = reference(*(t.bfloat16().float() for t in (q, k, v)))
    out = attend(q, k, v)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, rounded, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, reference(q, k, v), rtol=0, atol=1e-7)


def test_backend_errors():
    q = torch.randn(1, 1, 2, 8)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attend(q, q, q, backend="xformers")
    assert "sdpa" in available_backends()
    if importlib.util.find_spec("sageattention") is None:
        with pytest.raises(ImportError, match="sageattention"):
            attend(q, q, q, backend="sage")
    if importlib.util.find_spec("flash_attn") is None and importlib.util.find_spec("flash_attn_interface") is None:
        with pytest.raises(ImportError, match="flash-attn"):
            attend(q, q, q, backend="flash")


@pytest.mark.parametrize("backend", ["cudnn", "sdpa_flash"])
def test_single_kernel_backends_are_sdpa_off_cuda(backend):
    # "cudnn" / "sdpa_flash" pick one of CUDA SDPA's kernels; elsewhere they are the plain SDPA path, bit for bit
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(2, n, 9, 16, generator=g).to(dtype) for n in (4, 2, 2))
        assert torch.equal(attend(q, k, v, backend=backend), attend(q, k, v, backend="sdpa"))
    assert backend in available_backends()



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend, kernel, not_kernel", [("cudnn", "cudnn", "flash_fwd"),
                                                         ("sdpa_flash", "flash_fwd", "cudnn")])
def test_single_kernel_backends_run_that_kernel_on_the_model_layout(backend, kernel, not_kernel):
    """backend="cudnn" / "sdpa_flash" really run that kernel for the model's strided queries and GQA K/V, and agree
    with the fp32 reference; SDPA picks its kernel silently (torch 2.11 picks cuDNN on an H200). cuDNN's kernels
    are named cudnn_generated_..._flash_fprop_..., PyTorch's FlashAttention-2 ones ...flash_fwd_... (the first
    version of this test failed on an H200 by looking for "flash" alone; the cuDNN kernel had run)."""
    from torch.profiler import ProfilerActivity, profile

    from infinitystar import attention

    g = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(2, 768, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    k, v = (torch.randn(2, 8, 1500, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(4, 1), v.float().repeat_interleave(4, 1))
    attention.attend(q, k, v, backend=backend)  # plan built outside the profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        got = attention.attend(q, k, v, backend=backend)
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages()]
    assert not attention._REFUSED, attention._REFUSED
    assert [n for n in names if kernel in n], names
    assert not [n for n in names if not_kernel in n], names
    assert (got.float() - want).norm() / want.norm() < 1e-2


def test_small_calls_are_those_under_the_work_threshold():
    from infinitystar.attention import SMALL_CALL_WORK, small_call

    assert small_call(1, 513) and small_call(3600, 4112) and small_call(4095, 4096)
    assert not small_call(4096, 4096) and not small_call(5120, 76112) and not small_call(320, 76112)
    assert SMALL_CALL_WORK == 4096 * 4096
    assert not small_call(1, 1, work=0) and small_call(10, 10, work=101) and not small_call(10, 10, work=100)


def test_sdpa_routes_only_small_calls_to_flash(monkeypatch):
    """backend "sdpa" asks for FlashAttention-2 alone exactly for calls under the threshold, where the kernel can
    (faked here: the CPU has no such kernel); other backends, and large calls, are left to their own path."""
    from infinitystar import attention

    calls = []

    def only(backend, q, k, v, scale, groups, asked=True):
        calls.append((backend, q.shape[2], k.shape[2], asked))
        return None  # as if refused: attend falls through to the default path, whose result is still right

    monkeypatch.setattr(attention, "_sdpa_only", only)
    monkeypatch.setattr(attention, "_flash_device", lambda q: True)
    monkeypatch.setattr(attention, "SMALL_CALL_WORK", 100)
    g = torch.Generator().manual_seed(3)
    small = [torch.randn(1, n, 9, 8, generator=g) for n in (4, 2, 2)]  # 9 x 9 = 81 < 100
    large = [torch.randn(1, n, 11, 8, generator=g) for n in (4, 2, 2)]  # 121
    for q, k, v in (small, large):
        torch.testing.assert_close(attend(q, k, v, round_qkv_bf16=False), reference(q, k, v), rtol=1e-5, atol=1e-6)
    assert calls == [("sdpa_flash", 9, 9, False)]  # not the user's choice: a refusal is not warned about
    for backend in ("cudnn", "sdpa_flash"):  # a single-kernel backend keeps its own kernel (CPU: plain SDPA)
        attend(*small, backend=backend)
    assert len(calls) == 1
    monkeypatch.setattr(attention, "_flash_device", lambda q: False)
    n = len(calls)
    attend(*small)
    assert len(calls) == n  # no FlashAttention-2 on this device: nothing is asked of it


def test_small_calls_stay_with_pytorch_where_flash_cannot_be_asked_for(monkeypatch):
    """The routing needs sm80+ NVIDIA, head dim <= 256, SDPA's flash kernel enabled and torch >= 2.3's sdpa_kernel
    (faked CUDA checks on the CPU): without any of them a call keeps SDPA's own pick instead of failing."""
    from infinitystar import attention

    monkeypatch.setattr(attention, "_half_cuda", lambda q: True)
    monkeypatch.setattr(attention, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(attention, "_has_sdpa_kernel", lambda: True)
    monkeypatch.setattr(torch.backends.cuda, "flash_sdp_enabled", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    q = torch.zeros(1, 2, 3, 128)
    assert attention._flash_device(q)
    assert not attention._flash_device(torch.zeros(1, 2, 3, 320))
    monkeypatch.setattr(attention, "_capability", lambda index: (7, 5))
    assert not attention._flash_device(q)
    monkeypatch.setattr(attention, "_capability", lambda index: (8, 0))
    monkeypatch.setattr(attention, "_has_sdpa_kernel", lambda: False)
    assert not attention._flash_device(q)
    monkeypatch.setattr(attention, "_has_sdpa_kernel", lambda: True)
    monkeypatch.setattr(torch.backends.cuda, "flash_sdp_enabled", lambda: False)
    assert not attention._flash_device(q)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sdpa_runs_small_calls_on_flash_and_leaves_large_ones_to_pytorch():
    """On the model's layout: a small call gives FlashAttention-2's result bit for bit (its kernel ran, no cuDNN);
    a large one gives exactly what SDPA's own pick gives."""
    from torch.profiler import ProfilerActivity, profile

    from infinitystar import attention

    g = torch.Generator("cuda").manual_seed(0)

    def layout(queries, keys):
        q = torch.randn(2, queries, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
        k, v = (torch.randn(2, 8, keys, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        return q, k, v

    small, large = layout(600, 700), layout(4224, 4300)
    assert attention.small_call(600, 700) and not attention.small_call(4224, 4300)
    attention.attend(*small)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        got = attention.attend(*small)
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages()]
    assert [n for n in names if "flash_fwd" in n] and not [n for n in names if "cudnn" in n], names
    assert torch.equal(got, attention.attend(*small, backend="sdpa_flash"))
    q, k, v = large
    pick = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=128 ** -0.5, enable_gqa=True)
    assert torch.equal(attention.attend(q, k, v), pick)


def test_cudnn_is_kept_off_query_lengths_old_cudnn_mishandles():
    from infinitystar.attention import cudnn_safe

    assert cudnn_safe(5120, 91000) and cudnn_safe(300, 91501) and cudnn_safe(300, 92000)
    assert not cudnn_safe(300, 91500) and not cudnn_safe(5121, 90100) and not cudnn_safe(5120, None)


def test_loader_node_offers_exactly_the_core_backends():
    """The loader node lists its attention choices itself (nodes import the core lazily); its snapshot in
    tests/data/object_info.json (checked against the real node by the host tests) must offer every core backend,
    in the core's order, and nothing else."""
    import json
    from pathlib import Path

    from infinitystar.attention import BACKENDS

    info = json.loads((Path(__file__).resolve().parents[1] / "data" / "object_info.json").read_text())
    inputs = info["InfinityStarModelLoader"]["input"]
    spec = inputs["required"].get("attention") or inputs.get("optional", {})["attention"]
    assert spec[0] == "COMBO" and tuple(spec[1]["options"]) == BACKENDS and spec[1]["default"] == "auto"
