"""Unit tests of the tokenizer model: exact chunked decode/encode, shapes, input checks, state-dict loading."""
import pytest
import torch

from infinitystar.vae import VaeConfig, VideoTokenizer, detect_vae_config, load_vae_state_dict
from infinitystar.vae.chunking import plan_decode_chunks, plan_encode_chunks

CFG = VaeConfig(block_out_channels=(8, 8, 16, 16, 16))


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tok():
    torch.manual_seed(0)
    model = VideoTokenizer(CFG).eval()
    with torch.no_grad():
        model.scale_learnable_parameters.copy_(torch.tensor([1.3, 0.7, 1.0, 1.0]))
    return model


def _codes(t, h=2, w=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 64, t, h, w, generator=g) * 0.3


def _frames(t, h=32, w=32, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, t, h, w, generator=g) * 2 - 1


@pytest.mark.parametrize("latents", [1, 2, 5, 6, 9])
def test_chunked_decode_equals_one_shot(tok, latents):
    codes = _codes(latents)
    one_shot = tok.decode(codes, chunk_latents=latents)
    assert one_shot.shape == (1, 3, 1 + 4 * (latents - 1), 32, 32)
    for chunk in [None, 1, 2, 3, 4]:
        got = tok.decode(codes, chunk_latents=chunk)
        assert got.shape == one_shot.shape
        assert (got - one_shot).abs().max() <= 1e-5, f"chunk {chunk}"


def test_decode_is_causal(tok):
    """Decoding a prefix of the latents gives the prefix of the frames (independent of chunking)."""
    codes = _codes(7)
    full = tok.decode(codes)
    for k in (1, 3, 5):
        part = tok.decode(codes[:, :, :k], chunk_latents=k)
        torch.testing.assert_close(part, full[:, :, :part.shape[2]], rtol=0, atol=1e-5)


def test_decode_plans():
    assert plan_decode_chunks(21) == [(0, 3)] + [(s, s + 2) for s in range(3, 21, 2)]
    assert plan_decode_chunks(1) == [(0, 1)]
    assert plan_decode_chunks(6) == [(0, 4), (4, 6)]
    assert plan_decode_chunks(21, 4) == [(0, 1)] + [(s, s + 4) for s in range(1, 21, 4)]
    assert plan_decode_chunks(41, 5) == [(0, 1)] + [(s, s + 4) for s in range(1, 41, 4)]
    for t in range(1, 30):
        for c in (None, 1, 2, 3, 6):
            plan = plan_decode_chunks(t, c)
            assert plan[0][0] == 0 and plan[-1][1] == t
            assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))
            assert all((e - s) % 2 == 0 for s, e in plan[1:])


def test_encode_plans():
    assert plan_encode_chunks(81, 8) == [(0, 9)] + [(s, s + 8) for s in range(9, 81, 8)]
    assert plan_encode_chunks(1, 8) == [(0, 1)]
    assert plan_encode_chunks(13, 8) == [(0, 13)]
    assert plan_encode_chunks(21, 8) == [(0, 13), (13, 21)]


def test_encode_moves_one_chunk_at_a_time(tok, monkeypatch):
    """The frames stay where they are (system memory for the nodes and the CLI) and each official chunk is moved
    and cast on its own: the encoder never sees the whole video converted, and the latent is the same."""
    frames = (torch.rand(1, 3, 21, 32, 48) * 2 - 1).double()  # not the encode dtype: each chunk is cast
    want = tok.encode_posterior(frames.float())
    seen, real = [], tok.encoder.forward
    monkeypatch.setattr(tok.encoder, "forward", lambda x, cache: seen.append((x.shape[2], x.dtype, x.untyped_storage().nbytes() == x.nbytes))
                        or real(x, cache))
    got = tok.encode_posterior(frames)
    assert seen == [(13, torch.float32, True), (8, torch.float32, True)]  # each chunk its own copy
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("frames", [1, 5, 9, 13, 17])
def test_encode_shapes(tok, frames):
    mean, logvar = tok.encode_posterior(_frames(frames))
    assert mean.shape == logvar.shape == (1, 64, 1 + (frames - 1) // 4, 2, 2)
    assert logvar.min() >= -30 and logvar.max() <= 20


def test_chunked_encode_equals_one_shot(tok):
    x = _frames(17)
    mean, logvar = tok.encode_posterior(x)  # chunks 9 + 8 with conv caches
    with torch.no_grad():
        h = tok.encoder(x)  # one shot
    from infinitystar.vae.model import patchify
    ref_mean, ref_logvar = patchify(h, 2).chunk(2, dim=1)
    assert (mean - ref_mean).abs().max() <= 1e-5
    assert (logvar - ref_logvar.clamp(-30, 20)).abs().max() <= 1e-5


def test_encode_latent_modes(tok):
    x = _frames(5)
    mean, logvar = tok.encode_posterior(x)
    z_mean = tok.encode_latent(x, sample=False)
    with torch.no_grad():
        ref = torch.nn.functional.linear(mean.permute(0, 2, 3, 4, 1), tok.proj_down.weight, tok.proj_down.bias)
    torch.testing.assert_close(z_mean, ref.permute(0, 4, 1, 2, 3) * 1.3)
    a = tok.encode_latent(x, generator=torch.Generator().manual_seed(5))
    b = tok.encode_latent(x, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    c = tok.encode_latent(x, noise=noise)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    assert not torch.allclose(a, z_mean)


@pytest.mark.parametrize("bad, msg", [
    (torch.zeros(3, 5, 32, 32), "B, 3, T, H, W"),
    (torch.zeros(1, 4, 5, 32, 32), "channels"),
    (torch.zeros(1, 3, 5, 32, 32, dtype=torch.int32), "float frames in .* or uint8 pixels"),
    (torch.zeros(1, 3, 4, 32, 32), r"1 \+ 4k"),
    (torch.zeros(1, 3, 5, 40, 32), "multiples of 16"),
])
def test_bad_frames(tok, bad, msg):
    with pytest.raises(ValueError, match=msg):
        tok.encode_posterior(bad)


def test_bad_codes(tok):
    with pytest.raises(ValueError, match="64"):
        tok.decode(torch.zeros(1, 16, 3, 2, 2))
    with pytest.raises(ValueError, match="chunk_latents"):
        tok.decode(_codes(3), chunk_latents=0)


def test_state_dict_roundtrip_and_strict_errors(tok):
    sd = tok.state_dict()
    assert detect_vae_config(sd) == CFG
    assert "quantize.lfq_detail.mask" in sd and sd["quantizer.lfq_semantic.mask"][0] == 2 ** 15
    other = VideoTokenizer(CFG)
    load_vae_state_dict(other, sd, source="mem.pth")
    torch.testing.assert_close(other.decode(_codes(3)), tok.decode(_codes(3)))
    broken = dict(sd)
    broken.pop("proj_up.weight")
    broken["extra.weight"] = torch.zeros(1)
    broken["decoder.conv_out.conv.bias"] = torch.zeros(4)
    with pytest.raises(ValueError, match=r"mem\.pth.*missing: proj_up\.weight.*unexpected: extra\.weight.*mis-shaped"):
        load_vae_state_dict(other, broken, source="mem.pth")


def test_meta_build_and_assign_load(tok):
    meta = VideoTokenizer(CFG, device="meta")
    load_vae_state_dict(meta, tok.state_dict(), source="mem")
    assert not any(p.is_meta for p in meta.parameters())
    torch.testing.assert_close(meta.decode(_codes(1)), tok.decode(_codes(1)))


def test_custom_ops_are_used():
    made = []

    class Ops:
        class Conv3d(torch.nn.Conv3d):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                made.append("conv")

        class Linear(torch.nn.Linear):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                made.append("linear")

    model = VideoTokenizer(CFG, ops=Ops)
    n_conv = sum(isinstance(m, torch.nn.Conv3d) for m in model.modules())
    assert made.count("conv") == n_conv and made.count("linear") == 4


def test_bf16_weights_decode(tok):
    model = VideoTokenizer(CFG).eval()
    model.load_state_dict(tok.state_dict())
    model.to(torch.bfloat16)
    out = model.decode(_codes(3))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert (out.float() - tok.decode(_codes(3))).abs().max() < 0.2


def test_compute_dtype_with_fp32_weights(tok):
    model = VideoTokenizer(CFG).eval()
    model.load_state_dict(tok.state_dict())
    model.compute_dtype = torch.bfloat16
    out = model.decode(_codes(3))
    assert out.dtype == torch.bfloat16
    assert (out.float() - tok.decode(_codes(3))).abs().max() < 0.2


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_encode_runs_in_fp32_whatever_decodes_in(tok, weights):
    """The official scripts encode outside their bf16 autocast: a bf16 decode setting (the nodes' default on GPUs)
    or bf16-stored weights still encode in fp32, with the fp32 model's posterior (bf16 weights: their values)."""
    model = VideoTokenizer(CFG).eval()
    model.load_state_dict(tok.state_dict())
    model.to(weights)
    model.compute_dtype = torch.bfloat16
    reference = VideoTokenizer(CFG).eval()
    reference.load_state_dict(model.state_dict())  # fp32 copy of the same (possibly bf16-rounded) values
    reference.float()
    seen = []
    hook = model.encoder.conv_in.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    try:
        mean, logvar = model.encode_posterior(_frames(5))
    finally:
        hook.remove()
    expected = reference.encode_posterior(_frames(5))
    assert seen and set(seen) == {torch.float32}
    assert mean.dtype == torch.float32
    assert torch.equal(mean, expected[0]) and torch.equal(logvar, expected[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_frames_in_system_memory_encode_on_the_gpu(tok):
    """Frames left in system memory with the tokenizer on CUDA: the chunks go over one by one and the latent is the
    one the frames give when they are on the GPU already."""
    frames = torch.rand(1, 3, 21, 32, 48) * 2 - 1
    gpu = tok.cuda()
    try:
        a = gpu.encode_posterior(frames)
        b = gpu.encode_posterior(frames.cuda())
    finally:
        tok.cpu()
    assert a[0].device.type == "cuda" and all(torch.equal(x, y) for x, y in zip(a, b))
