"""Tiled spatial decode: an approximation that must agree with the full decode where tiles cover all."""
import pytest
import torch

from infinitystar.vae import VaeConfig, VideoTokenizer
from infinitystar.vae.chunking import decode_chunked, decode_tiled

CFG = VaeConfig(block_out_channels=(8, 8, 16, 16, 16))


@pytest.fixture(scope="module")
def tok(single_thread):
    torch.manual_seed(0)
    return VideoTokenizer(CFG).eval()


def test_single_tile_equals_full_decode(tok):
    codes = torch.randn(1, 64, 3, 3, 4, generator=torch.Generator().manual_seed(0)) * 0.3
    full = tok.decode(codes)
    tiled = tok.decode(codes, tiled=True, tile=(3, 4), overlap=1)
    torch.testing.assert_close(tiled, full.float(), rtol=0, atol=1e-5)


class _PointwiseDecoder(torch.nn.Module):
    """Stand-in decoder with no spatial context: tiling + blending must then be exact."""

    def forward(self, z, cache=None, split_first=False):
        return z[:, :3].repeat_interleave(8, dim=-1).repeat_interleave(8, dim=-2) * 2


@pytest.mark.parametrize("tile, overlap", [((2, 2), (1, 1)), ((3, 5), (1, 2)), ((4, 4), (0, 0))])
def test_tiles_blend_to_a_partition_of_unity(tile, overlap):
    z = torch.randn(1, 16, 3, 10, 14, generator=torch.Generator().manual_seed(2))
    dec = _PointwiseDecoder()
    full = decode_chunked(dec, z, [(0, 3)])
    seen = []
    tiled = decode_tiled(dec, z, [(0, 1), (1, 3)], tile, overlap, 2, 3, callback=lambda i, n: seen.append((i, n)))
    torch.testing.assert_close(tiled, full, rtol=0, atol=1e-5)
    assert seen[-1][0] == seen[-1][1] == len(seen)


def test_a_chunked_decode_fills_one_output_of_the_frames_given():
    """With ``frames`` the chunks are written into one output (equal to their concatenation); a decoder that gives
    another number of frames is an error, not frames left unwritten."""
    z = torch.randn(1, 16, 5, 4, 6, generator=torch.Generator().manual_seed(3))
    dec = _PointwiseDecoder()  # one frame per latent frame
    whole = decode_chunked(dec, z, [(0, 5)])
    torch.testing.assert_close(decode_chunked(dec, z, [(0, 2), (2, 5)], frames=5), whole, rtol=0, atol=0)
    torch.testing.assert_close(decode_chunked(dec, z, [(0, 2), (2, 5)]), whole, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="gave 5 frames for 5 latent frames; 17 were expected"):
        decode_chunked(dec, z, [(0, 2), (2, 4), (4, 5)], frames=17)


@pytest.mark.parametrize("images", [False, True], ids=["frames", "images"])
@pytest.mark.parametrize("tiled", [False, True], ids=["chunked", "tiled"])
def test_chunks_are_written_into_one_output_not_concatenated(tiled, images, monkeypatch):
    """A chunked decode given the video's length writes its chunks into one output, and a tiled decode blends its
    tiles into one buffer that becomes the output in place: never a concatenation, which holds the chunks and the
    whole video at once. The output equals the one-chunk decode, frames or images; a decoder that gives more or
    fewer frames than asked is an error."""
    import infinitystar.vae.chunking as chunking
    from infinitystar.vae.codec import images_on

    z = torch.randn(1, 16, 7, 4, 6, generator=torch.Generator().manual_seed(4))
    dec = _PointwiseDecoder()
    keep = images_on("cpu") if images else None
    whole = decode_chunked(dec, z, [(0, 7)], keep=keep)
    plan = [(0, 1), (1, 3), (3, 5), (5, 7)]
    joined = []
    real_cat = torch.cat
    monkeypatch.setattr(chunking.torch, "cat", lambda parts, *a, **k: joined.append(len(parts)) or real_cat(parts, *a, **k))
    if tiled:
        out = decode_tiled(dec, z, plan, (2, 3), (1, 1), 2, 7, images_to="cpu" if images else None)
        run = lambda frames: decode_tiled(dec, z, plan, (2, 3), (1, 1), 2, frames)  # noqa: E731
    else:
        out = decode_chunked(dec, z, plan, keep=keep, frames=7)
        run = lambda frames: decode_chunked(dec, z, plan, keep=keep, frames=frames)  # noqa: E731
    assert joined == [] and out.is_contiguous() and out.shape == whole.shape
    torch.testing.assert_close(out, whole, rtol=0, atol=1e-6 if tiled else 0)
    with pytest.raises(RuntimeError, match="gave at least 7 frames for 7 latent frames; 6 were expected"):
        run(6)
    with pytest.raises(RuntimeError, match="gave 7 frames for 7 latent frames; 8 were expected"):
        run(8)


def test_overlapping_tiles_run_on_the_model(tok):
    codes = torch.randn(1, 64, 3, 4, 6, generator=torch.Generator().manual_seed(1)) * 0.3
    full = tok.decode(codes)
    tiled = tok.decode(codes, tiled=True, tile=(3, 3), overlap=1)
    assert tiled.shape == full.shape and torch.isfinite(tiled).all()


class _TileOriginDecoder(torch.nn.Module):
    """Stand-in decoder that paints its whole tile with the smallest x coordinate it was given (channel 0 of the
    latent holds each cell's x): two overlapping tiles then differ by a step, and the blend shows its weights."""

    def forward(self, z, cache=None, split_first=False):
        origin = z[:, :1].amin(dim=(-2, -1), keepdim=True)
        return origin.expand(-1, 3, -1, z.shape[-2] * 8, z.shape[-1] * 8).clone()


def test_the_overlap_blends_with_linear_weights():
    """Two tiles of 4 cells overlapping by 2 (16 px after the 8x decoder): the left tile's weight falls as
    (16 - j) / 17 and the right one's rises as (j + 1) / 17 over the overlap's pixels j, so pixel j holds
    (0 * (16 - j) + 2 * (j + 1)) / 17; outside it each tile alone."""
    z = torch.zeros(1, 16, 1, 1, 6)
    z[:, 0] = torch.arange(6.0)
    out = decode_tiled(_TileOriginDecoder(), z, [(0, 1)], tile=(1, 4), overlap=(1, 2), patch=1, frames=1)[0, 0, 0, 0]
    expected = torch.cat([torch.zeros(16), torch.tensor([2 * (j + 1) / 17 for j in range(16)]), torch.full((16,), 2.0)])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tiled", [False, True], ids=["chunked", "tiled"])
def test_images_to_another_device_equal_the_post_processed_whole(tok, tiled, monkeypatch):
    """``images_to``: each chunk post-processed where it was decoded gives exactly the images of the whole decode
    (clamp((x + 1) / 2), frames first), on the device asked for; one video at a time. Tiled, with the images on
    another device, the tiles are blended there: the same images."""
    import infinitystar.vae.model as vae_model
    from infinitystar.vae import frames_to_float_images

    codes = torch.randn(1, 64, 7, 3, 4, generator=torch.Generator().manual_seed(3)) * 0.3
    kw = dict(chunk_latents=2, tiled=tiled, tile=(2, 3), overlap=1)
    whole = frames_to_float_images(tok.decode(codes, **kw))
    images = tok.decode(codes, images_to="cpu", **kw)
    assert images.shape == (25, 48, 64, 3) and images.dtype == torch.float32 and images.is_contiguous()
    assert torch.equal(images, whole)
    assert tok.decode(codes, images_to="meta", **kw).device.type == "meta"
    homes = []
    real_tiled = vae_model.decode_tiled
    monkeypatch.setattr(vae_model, "decode_tiled", lambda *a, **k: homes.append(k.get("sums_on")) or real_tiled(*a, **k))
    monkeypatch.setattr(vae_model, "_same_device", lambda a, b: False)  # "cpu" plays the host beside a GPU
    assert torch.equal(tok.decode(codes, images_to="cpu", **kw), whole)
    assert homes == (["cpu"] if tiled else [])
    with pytest.raises(ValueError, match="one video"):
        tok.decode(codes.expand(2, -1, -1, -1, -1), images_to="cpu")


@pytest.mark.parametrize("tiled", [False, True], ids=["chunked", "tiled"])
@pytest.mark.parametrize("images_to", [None, "cpu"], ids=["frames", "images"])
def test_first_frame_keeps_the_tail_of_the_whole_decode(tok, tiled, images_to):
    """``first_frame``: the frames from it on, exactly as the whole decode gives them (the earlier ones still feed
    the causal decoder), at a chunk boundary or inside a chunk; out of range is refused."""
    codes = torch.randn(1, 64, 7, 3, 4, generator=torch.Generator().manual_seed(5)) * 0.3
    kw = dict(chunk_latents=2, tiled=tiled, tile=(2, 3), overlap=1, images_to=images_to)
    whole = tok.decode(codes, **kw)
    dim = 0 if images_to else 2
    for first in (1, 4, 5, 13, 24):  # frames 0 | 1-8 | 9-16 | 17-24 come from the latents 0 | 1-2 | 3-4 | 5-6
        tail = tok.decode(codes, first_frame=first, **kw)
        assert tail.shape[dim] == 25 - first and tail.is_contiguous()
        assert torch.equal(tail, whole.narrow(dim, first, 25 - first)), first
    for bad in (-1, 25):
        with pytest.raises(ValueError, match=f"first_frame {bad}: these codes decode to 25 frames"):
            tok.decode(codes, first_frame=bad, **kw)
    if images_to is None:  # frames of a batch: each video's tail
        pair = torch.cat([codes, codes.flip(-1)])
        assert torch.equal(tok.decode(pair, first_frame=6, **kw), tok.decode(pair, **kw)[:, :, 6:])


@pytest.mark.parametrize("tiled", [False, True], ids=["chunked", "tiled"])
def test_a_decoder_giving_another_frame_count_after_first_frame_is_an_error(tiled):
    z = torch.randn(1, 16, 5, 4, 6, generator=torch.Generator().manual_seed(6))
    dec = _PointwiseDecoder()  # one frame per latent frame: 5 frames
    plan = [(0, 1), (1, 3), (3, 5)]
    run = (lambda frames, first: decode_tiled(dec, z, plan, (2, 3), (1, 1), 2, frames, first_frame=first)) if tiled \
        else (lambda frames, first: decode_chunked(dec, z, plan, frames=frames, first_frame=first))
    torch.testing.assert_close(run(5, 2), decode_chunked(dec, z, [(0, 5)])[:, :, 2:], rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="gave 3 frames after frame 2 for 5 latent frames; 4 were expected"
                       if not tiled else "gave 5 frames for 5 latent frames; 6 were expected"):
        run(6, 2)


@pytest.mark.parametrize("images_to", [None, "cpu"], ids=["frames", "images"])
@pytest.mark.parametrize("tiled", [False, True], ids=["chunked", "tiled"])
def test_a_late_first_frame_holds_its_frames_not_the_video_s(tok, tiled, images_to):
    """The last clip of a long video: the decode's peak follows the frames kept, not the video's length."""
    from infinitystar.memory import measure_peak_bytes

    kw = dict(chunk_latents=2, tiled=tiled, tile=(2, 2), overlap=1, images_to=images_to)
    peaks = {}
    for t in (5, 41):
        codes = torch.randn(1, 64, t, 3, 3, generator=torch.Generator().manual_seed(t)) * 0.3
        frames = 1 + 4 * (t - 1)
        peaks[t] = measure_peak_bytes(lambda codes=codes, frames=frames: tok.decode(codes, first_frame=frames - 16,
                                                                                   **kw))[1]
    video = 3 * 161 * 48 * 48 * 4  # the long one's fp32 frames
    assert peaks[41] - peaks[5] < 0.25 * video, peaks
