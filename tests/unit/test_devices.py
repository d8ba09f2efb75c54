"""What the library picks on GPUs other than the H100/H200 it was measured on, with the device queries simulated:
NVIDIA before Ampere (no native bf16, no flash-attn, no Triton below sm70), AMD ROCm (capabilities are gfx arch
numbers), Apple MPS (no float64, no fp8). Each choice here once crashed or would crash only after loading."""
import pytest
import torch

import infinitystar.attention as A
from infinitystar.checkpoint import default_block_dtype
from infinitystar.guidance import apg
from infinitystar.ops import fp8_matmul_unavailable, native_bf16
from infinitystar.sampler import default_compute_dtype
from infinitystar.text import official_autocast_dtype
from infinitystar.transformer import compile_unavailable

CUDA = torch.device("cuda:0")


@pytest.fixture
def gpu(monkeypatch):
    """Set the simulated GPU: ``gpu(capability, hip=False, arch="")`` (``arch``: ROCm's gcnArchName)."""
    import types

    def set_gpu(capability, hip=False, arch=""):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device=None: types.SimpleNamespace(gcnArchName=arch, name="simulated"))
        monkeypatch.setattr(torch.version, "hip", "6.2" if hip else None)
        A._capability.cache_clear()
        A._rocm_math_sdpa.cache_clear()

    yield set_gpu
    A._capability.cache_clear()
    A._rocm_math_sdpa.cache_clear()


@pytest.mark.parametrize("capability, hip, native", [
    ((6, 1), False, False), ((7, 5), False, False), ((8, 0), False, True), ((8, 6), False, True),
    ((9, 0), False, True), ((10, 3), True, False), ((11, 0), True, True), ((9, 4), True, True)])
def test_bf16_is_used_where_the_gpu_computes_it_natively(gpu, capability, hip, native):
    """Pascal and Turing only emulate bf16 (Pascal's cuBLAS refuses it); RDNA1/2 (gfx10xx) lack it."""
    gpu(capability, hip)
    assert native_bf16(CUDA) is native
    assert default_compute_dtype(CUDA) == (torch.bfloat16 if native else torch.float16)
    runs_bf16 = native or (not hip and capability >= (7, 5))  # Turing emulates bf16: fine for T5's autocast
    assert official_autocast_dtype(CUDA, torch.float16) == (torch.bfloat16 if runs_bf16 else None)
    assert not native_bf16("cpu") and not native_bf16("mps")
    assert default_compute_dtype(torch.device("cpu")) == torch.float32
    # blocks stored in fp32 (the CLI's --dtype fp32, the way out of an fp16 overflow) compute in fp32
    assert default_compute_dtype(CUDA, torch.float32) == torch.float32
    assert default_compute_dtype(CUDA, torch.bfloat16) == default_compute_dtype(CUDA)


@pytest.mark.parametrize("arch, native", [
    ("gfx906:sramecc+:xnack-", False), ("gfx900", False), ("gfx1030", False), ("gfx1010:xnack-", False),
    ("gfx908:sramecc+:xnack-", True), ("gfx90a:sramecc+:xnack-", True), ("gfx942", True), ("gfx1100", True),
    ("gfx1201", True)])
def test_amd_bf16_follows_the_architecture_name(gpu, arch, native):
    """ROCm reports every gfx9 part as capability 9.x: Vega (MI50, Radeon VII: gfx906) has no bf16, MI100 (gfx908)
    and later do; RDNA1/2 (gfx10xx) lack it, RDNA3/4 have it."""
    gpu((9, 0) if arch.startswith("gfx9") else (int(arch[3:5]), 0), hip=True, arch=arch)
    assert native_bf16(CUDA) is native
    assert default_compute_dtype(CUDA) == (torch.bfloat16 if native else torch.float16)


def test_default_storage_follows_an_fp16_compute(gpu):
    """The official fp32 files' blocks go to bf16 on a GPU, or fp16 where the compute is fp16 on a device without
    bf16 (MPS before macOS 14, DirectML, RTX 20xx); the CPU and files stored otherwise keep theirs."""
    assert default_block_dtype(torch.float32, "cuda") == torch.bfloat16
    gpu((8, 6))
    assert default_block_dtype(torch.float32, CUDA, torch.float16) == torch.bfloat16  # fp16 chosen on an Ampere
    gpu((7, 5))
    assert default_block_dtype(torch.float32, CUDA, torch.float16) == torch.float16
    assert default_block_dtype(torch.float32, "mps", torch.float16) == torch.float16
    assert default_block_dtype(torch.float32, "cuda", torch.float32) == torch.bfloat16
    assert default_block_dtype(torch.float32, "cpu", torch.float16) is None
    assert default_block_dtype(torch.bfloat16, "cuda", torch.float16) is None


def test_flash_attn_only_where_it_runs(gpu, monkeypatch):
    """auto takes flash-attn on an NVIDIA Ampere or newer only; asking for it on an older GPU is refused before
    loading (flash-attn itself fails at the first call); on ROCm auto keeps to SDPA."""
    monkeypatch.setattr(A, "_AVAILABLE", [*A.SDPA_BACKENDS, "flash"])
    monkeypatch.setattr(A, "available_backends", lambda: [*A.SDPA_BACKENDS, "flash"])
    gpu((8, 6))
    assert A.auto_backend(CUDA) == "flash" and A.backend_unavailable("flash", CUDA) is None
    gpu((7, 5))
    assert A.auto_backend(CUDA) == "sdpa"
    assert "Ampere" in A.backend_unavailable("flash", CUDA)
    gpu((9, 4), hip=True)
    assert A.auto_backend(CUDA) == "sdpa" and A.backend_unavailable("flash", CUDA) is None
    assert A.auto_backend("cpu") == "sdpa" and A.backend_unavailable("flash", "mps") is None  # SDPA runs there
    assert A.backend_unavailable("sdpa", CUDA) is None and A.backend_unavailable("auto", "cpu") is None


def test_fp8_matmuls_and_compile_are_refused_where_they_cannot_run(gpu, monkeypatch):
    gpu((9, 4), hip=True)  # an MI300 passes an NVIDIA "capability >= 8.9" test, but its fp8 GEMM is e4m3fnuz
    assert "ROCm" in fp8_matmul_unavailable(CUDA)
    gpu((8, 9))
    assert fp8_matmul_unavailable(CUDA) is None
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else real(name, *a))
    gpu((6, 1))
    assert "7.0" in compile_unavailable(CUDA)
    gpu((7, 5))
    assert compile_unavailable(CUDA) is None
    assert "MPS" in compile_unavailable("mps")


def test_apg_without_float64_on_the_device_runs_on_the_cpu(monkeypatch):
    """MPS has no float64: APG's projection runs on the CPU there, still in float64, and gives the same numbers
    (a smoke test of that path: on the CPU the round trip to the device is not exercised)."""
    import infinitystar.guidance as G

    assert G.float64_device(torch.device("mps")) == torch.device("cpu")
    assert G.float64_device(CUDA) == CUDA and G.float64_device(torch.device("cpu")) == torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 40, 32, generator=gen), torch.randn(2, 40, 32, generator=gen)
    want = apg(cond, uncond, 34.0, 0.05, eta=0.5)
    seen = []
    monkeypatch.setattr(G, "float64_device", lambda device: seen.append(device) or torch.device("cpu"))
    assert torch.equal(apg(cond.to(torch.float32), uncond, 34.0, 0.05, eta=0.5), want) and seen


def test_memory_plans_count_the_kv_copy_where_the_kernel_needs_one(gpu):
    """Only NVIDIA Ampere or newer (SDPA's flash kernel, or flash-attn) reads GQA K/V as it is; elsewhere each call
    holds it repeated to the query heads, and a plan made for the 8B model at 720p must count that (about 2.5 GB)."""
    from infinitystar.attention import takes_gqa
    from infinitystar.config import TRANSFORMER_PRESETS
    from infinitystar.memory import estimate_sampling_memory
    from infinitystar.schedule import build_schedule

    gpu((9, 0))
    assert takes_gqa(CUDA, torch.bfloat16, 128) and takes_gqa(CUDA, torch.float16, 128, "flash")
    assert not takes_gqa(CUDA, torch.float32, 128) and not takes_gqa(CUDA, torch.bfloat16, 128, "sage")
    assert not takes_gqa("cpu", torch.bfloat16, 128) and not takes_gqa("mps", torch.float16, 128)
    gpu((7, 5))
    assert not takes_gqa(CUDA, torch.float16, 128)
    gpu((9, 4), hip=True)
    assert not takes_gqa(CUDA, torch.bfloat16, 128)
    config, schedule = TRANSFORMER_PRESETS["8b"], build_schedule("720p", "16:9", 81)
    shared, copied = (estimate_sampling_memory(config, schedule, dtype=torch.float16, native_gqa=n) for n in (1, 0))
    assert copied - shared > 2 * 10**9


@pytest.mark.parametrize("hip, arch, sliced", [
    (True, "gfx1030", True), (True, "gfx1010:xnack-", True), (True, "gfx906:sramecc+:xnack-", True),
    (True, "gfx90a:sramecc+:xnack-", False), (True, "gfx942", False), (True, "gfx1100", False), (False, "", False)])
def test_rocm_gpus_whose_sdpa_is_the_math_kernel_attend_in_query_slices(gpu, hip, arch, sliced):
    """ROCm runs SDPA's fused kernels on CDNA2+ and RDNA3+ only; elsewhere (RDNA1/2, Vega) the math kernel builds the
    whole score matrix, as on MPS, so those calls are cut by queries too. NVIDIA GPUs never are."""
    import types

    gpu((10, 3) if arch.startswith("gfx10") else (11, 0) if arch.startswith("gfx11") else (9, 0), hip=hip, arch=arch)
    q = types.SimpleNamespace(device=torch.device("cuda", 0), is_cuda=True)
    assert A._scores_materialized(q) is sliced


def test_attention_on_mps_cuts_the_queries_so_the_score_matrix_stays_small(monkeypatch):
    """Where SDPA builds the whole score matrix (MPS; played here by the CPU) a call runs over query slices whose
    scores fit the budget: the same attention, row by row."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, n, 16, generator=gen) for n in (50, 70, 70))
    want = A.attend(q, k[:, :2], v[:, :2], round_qkv_bf16=False)  # GQA: 2 KV heads for 4 query heads
    slices = []
    real = A._attend_in_query_slices
    monkeypatch.setattr(A, "_scores_materialized", lambda q: True)
    monkeypatch.setattr(A, "_attend_in_query_slices",
                        lambda q, k, v, scale: slices.append(q.shape) or real(q, k, v, scale, budget=4 * 70 * 4 * 8))
    got = A.attend(q, k[:, :2], v[:, :2], round_qkv_bf16=False)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert slices == [q.shape]
    parts = []
    monkeypatch.setattr(A.F, "scaled_dot_product_attention",
                        lambda q, *a, **kw: parts.append(q.shape[2]) or torch.zeros(*q.shape))
    real(q, k, v, 0.25, budget=4 * 70 * 4 * 8)
    assert parts == [8] * 6 + [2]  # 8 queries a slice: 8 x 4 heads x 70 keys x 4 bytes
