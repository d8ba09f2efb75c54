"""Peak memory of the tokenizer: chunked decode grows with the chunk, not with the number of frames.

Peak = maximum over time of the bytes allocated minus freed, from torch.profiler's per-op CPU
memory records (profile_memory=True), ordered by op start time.
"""
import pytest
import torch

from infinitystar.memory import measure_peak_bytes
from infinitystar.vae import VaeConfig, VideoTokenizer, estimate_decode_memory, estimate_encode_memory
from infinitystar.vae.memory import choose_decode_chunk

CFG = VaeConfig(block_out_channels=(8, 8, 16, 16, 16))


def peak_bytes(fn) -> int:
    return measure_peak_bytes(fn)[1]


@pytest.fixture(scope="module")
def tok(single_thread):
    torch.manual_seed(0)
    return VideoTokenizer(CFG).eval()


def _codes(t):
    return torch.randn(1, 64, t, 3, 3, generator=torch.Generator().manual_seed(t)) * 0.3


def _output_bytes(t):
    return 3 * (1 + 4 * (t - 1)) * 48 * 48 * 4


def test_chunked_decode_peak_grows_with_chunk_not_frames(tok):
    short, long = 5, 13
    chunked = {t: peak_bytes(lambda t=t: tok.decode(_codes(t), chunk_latents=2)) for t in (short, long)}
    one_shot = {t: peak_bytes(lambda t=t: tok.decode(_codes(t), chunk_latents=t)) for t in (short, long)}
    # Beyond the decoded frames themselves (kept, then concatenated: 2x), chunked work memory is flat...
    work = {t: chunked[t] - 2 * _output_bytes(t) for t in chunked}
    assert work[long] <= 1.15 * work[short], (chunked, work)
    # ...while a one-shot decode grows with the frame count.
    assert one_shot[long] >= 2 * one_shot[short], one_shot
    assert chunked[long] < 0.5 * one_shot[long]
    # A bigger chunk costs more.
    assert peak_bytes(lambda: tok.decode(_codes(long), chunk_latents=6)) > 1.3 * chunked[long]


@pytest.mark.parametrize("t, chunk", [(5, 2), (13, 2), (13, 6), (9, None)])
def test_decode_estimate_is_an_upper_bound(tok, t, chunk):
    measured = peak_bytes(lambda: tok.decode(_codes(t), chunk_latents=chunk))
    est = estimate_decode_memory(CFG, (1, 64, t, 3, 3), chunk, torch.float32)
    assert measured <= est <= 2.0 * measured, (measured, est)


def test_encode_estimate_is_an_upper_bound(tok):
    x = torch.rand(1, 3, 17, 48, 48) * 2 - 1
    measured = peak_bytes(lambda: tok.encode_posterior(x))
    est = estimate_encode_memory(CFG, x.shape, torch.float32)
    assert measured <= est <= 2.0 * measured, (measured, est)


def test_estimates_scale_and_choose_chunk():
    full = VaeConfig()
    shape = (1, 64, 21, 45, 80)  # 720p, 81 frames
    small = estimate_decode_memory(full, shape, 2, torch.bfloat16)
    assert estimate_decode_memory(full, shape, 2, torch.float32) == pytest.approx(2 * small, rel=0.01)
    assert estimate_decode_memory(full, shape, 8, torch.bfloat16) > 2 * small
    assert estimate_decode_memory(full, shape, 2, torch.bfloat16, tile=(16, 16)) < small
    budget = estimate_decode_memory(full, shape, 6, torch.bfloat16)
    assert choose_decode_chunk(full, shape, torch.bfloat16, budget) == 6
    assert choose_decode_chunk(full, shape, torch.bfloat16, 1) == 2  # never below the smallest exact chunk


def test_images_moved_off_the_device_keep_the_peak_flat_in_frames(tok):
    """``images_to`` another device ("meta" here: counted nowhere, as the host's RAM is not device memory): the
    decoded video no longer grows the device's peak with the frame count, and each peak stays within its estimate."""
    moved, whole = {}, {}
    for t in (5, 13, 21):
        whole[t] = peak_bytes(lambda t=t: tok.decode(_codes(t), chunk_latents=2))
        moved[t] = peak_bytes(lambda t=t: tok.decode(_codes(t), chunk_latents=2, images_to="meta"))
        est = estimate_decode_memory(CFG, (1, 64, t, 3, 3), 2, torch.float32, video_on_device=False)
        assert moved[t] <= est <= 2.0 * moved[t], (t, moved[t], est)
        assert est < estimate_decode_memory(CFG, (1, 64, t, 3, 3), 2, torch.float32)
    assert moved[21] <= 1.1 * moved[5], moved
    assert whole[21] - whole[5] >= _output_bytes(21) - _output_bytes(5), whole  # kept on the device, it grows


@pytest.mark.parametrize("chunk", [6, None])
def test_images_moved_off_the_device_within_the_estimate(tok, chunk):
    moved = peak_bytes(lambda: tok.decode(_codes(13), chunk_latents=chunk, images_to="meta"))
    est = estimate_decode_memory(CFG, (1, 64, 13, 3, 3), chunk, torch.float32, video_on_device=False)
    assert moved <= est <= 2.0 * moved, (moved, est)


def test_images_off_the_device_allow_bigger_chunks_on_the_same_budget():
    full = VaeConfig()
    shape = (1, 64, 41, 30, 53)  # 480p, 161 frames
    off = estimate_decode_memory(full, shape, 2, torch.bfloat16, video_on_device=False)
    kept = estimate_decode_memory(full, shape, 2, torch.bfloat16)
    frames_bytes = 3 * 161 * 480 * 848 * 2  # the whole video in bf16, kept on the device otherwise
    assert kept - off >= frames_bytes, (kept, off)
    budget = estimate_decode_memory(full, shape, 4, torch.bfloat16, video_on_device=False)
    assert choose_decode_chunk(full, shape, torch.bfloat16, budget) == 2
    assert choose_decode_chunk(full, shape, torch.bfloat16, budget, video_on_device=False) == 4


@pytest.mark.parametrize("images_to", [None, "meta"], ids=["video-kept", "images-moved"])
def test_tiled_decode_within_its_estimate_and_flat_in_frames_when_moved(tok, images_to):
    """Tiled: each chunk of a tile goes into the video's fp32 blend sums as it is decoded, kept on the device with
    the video, or where the images go (the host): the estimate bounds the measured peak, which with the images moved
    does not grow with the frames."""
    kw = dict(chunk_latents=2, tiled=True, tile=(2, 2), overlap=1, images_to=images_to)
    peaks = {}
    for t in (5, 13):
        peaks[t] = peak_bytes(lambda t=t: tok.decode(_codes(t), **kw))
        est = estimate_decode_memory(CFG, (1, 64, t, 3, 3), 2, torch.float32, tile=(2, 2),
                                     video_on_device=images_to is None)
        assert peaks[t] <= est <= 2.0 * peaks[t], (t, peaks[t], est)
    grown = peaks[13] - peaks[5]
    sums = _output_bytes(13) - _output_bytes(5)  # fp32, as the blend sums
    if images_to is None:
        assert 0.9 * sums <= grown <= 1.2 * sums, peaks  # the sums become the output in place: one video's worth
    else:
        assert grown <= 0.1 * sums, peaks


@pytest.mark.parametrize("tiled", [False, True], ids=["chunked", "tiled"])
def test_images_kept_on_the_decoding_device_within_the_estimate(tok, tiled):
    """A CPU-only host decodes with ``images_to`` its own device: the fp32 images stay there, in a bf16 decode too
    (twice the bytes of the raw video), and the estimate says so."""
    kw = dict(chunk_latents=2, tiled=tiled, tile=(2, 2), overlap=1) if tiled else dict(chunk_latents=2)
    tok.compute_dtype = torch.bfloat16
    try:
        for t in (13, 21):
            measured = peak_bytes(lambda t=t: tok.decode(_codes(t), images_to="cpu", **kw))
            est = estimate_decode_memory(CFG, (1, 64, t, 3, 3), 2, torch.bfloat16, tile=(2, 2) if tiled else None,
                                         images=True)
            assert measured <= est <= 2.0 * measured, (t, measured, est)
    finally:
        tok.compute_dtype = None
