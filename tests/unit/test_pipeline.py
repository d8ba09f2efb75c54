"""Pipeline on the tiny model set: schedules and duration rules, tokens I/O, T2I/T2V/I2V/V2V, extension."""
from pathlib import Path

import numpy as np
import pytest
import torch

from infinitystar import pipeline as P
from infinitystar.checkpoint import CheckpointInfo, load_tokenizer, load_transformer
from infinitystar.config import TRANSFORMER_PRESETS
from infinitystar.schedule import build_schedule
from infinitystar.text import TextEncoder


@pytest.fixture(scope="module")
def models(tiny_models):
    transformer, info = load_transformer(tiny_models["transformer_720p"])
    tokenizer = load_tokenizer(tiny_models["vae"])
    text_encoder = TextEncoder.from_folder(tiny_models["text_encoder"], dtype=torch.float32)
    return transformer, info, tokenizer, text_encoder


@pytest.fixture(scope="module")
def t2v(models):
    transformer, _, _, te = models
    schedule = P.resolve_schedule("0.06M", "16:9", 5)
    return P.generate(transformer, te.encode("a red fox", duration_s=5), schedule, seed=7)


def _info(variant, preset="8b"):
    return CheckpointInfo(variant, TRANSFORMER_PRESETS[preset], torch.bfloat16, None)


def test_durations_map_to_frames():
    assert [P.frames_for_duration(d) for d in (0, 5, 10, 15)] == [1, 81, 161, 241]
    with pytest.raises(ValueError, match="multiple of 5"):
        P.frames_for_duration(7)
    assert P.resolve_schedule("480p", "16:9", 10).frames == 161
    assert P.resolve_schedule("0.06M", "1:1", frames=1).frames == 1


def test_duration_rules_follow_the_released_models():
    assert P.resolve_schedule("720p", "16:9", 5, model_info=_info("720p")).frames == 81
    assert P.resolve_schedule("720p", "16:9", 0, model_info=_info("720p")).frames == 1
    with pytest.raises(ValueError, match="720p model was trained for durations \\[0, 5\\]"):
        P.resolve_schedule("720p", "16:9", 10, model_info=_info("720p"))
    assert P.resolve_schedule("480p", "16:9", 10, model_info=_info("480p")).num_clips == 3
    with pytest.raises(ValueError, match="extend"):
        P.resolve_schedule("480p", "16:9", 15, model_info=_info("480p"))
    assert P.resolve_schedule("0.06M", "16:9", 15, model_info=_info("720p", "tiny")).frames == 241
    assert P.resolve_schedule("0.06M", "16:9", 15, model_info=_info("unknown")).frames == 241


def test_text_to_video_with_the_interact_weights_warns(caplog):
    with caplog.at_level("WARNING", logger="infinitystar.pipeline"):
        assert P.resolve_schedule("480p", "16:9", 5, model_info=_info("interact")).frames == 81
    assert "InfinityStar Interact" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="infinitystar.pipeline"):
        P.resolve_schedule("480p", "16:9", 5, model_info=_info("480p"))
    assert "interact" not in caplog.text


def test_generator_device_follows_the_model(models, monkeypatch):
    transformer = models[0]
    assert P.resolve_generator_device("auto", transformer) == "cpu"
    assert P.resolve_generator_device("cpu", transformer) == "cpu"
    with pytest.raises(ValueError, match="one of"):
        P.resolve_generator_device("gpu", transformer)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        P.resolve_generator_device("cuda", transformer)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert P.resolve_generator_device("cuda", transformer) == "cuda"


def test_generator_choice_reaches_the_sampler(models, monkeypatch):
    import infinitystar.sampler as S

    transformer, _, _, te = models
    seen = []
    original = S.sample
    monkeypatch.setattr(S, "sample", lambda *a, **k: seen.append(k["generator_device"]) or original(*a, **k))
    tokens = P.generate(transformer, te.encode("x", duration_s=0), P.resolve_schedule("0.06M", "1:1", 0), seed=1,
                        generator="cpu")
    with pytest.raises(ValueError, match="generator must be one of"):
        P.extend(transformer, te.encode("x"), tokens, seed=0, generator="tpu")
    assert seen == ["cpu"]


def test_tokens_roundtrip_and_errors(t2v, tmp_path):
    path = t2v.save(tmp_path / "t.safetensors")
    back = P.Tokens.load(path)
    assert (back.pn, back.h_div_w, back.frames, back.seed) == (t2v.pn, t2v.h_div_w, t2v.frames, 7)
    assert len(back.bits) == len(t2v.bits) == back.schedule().num_steps
    assert all(torch.equal(a, b) for a, b in zip(back.bits, t2v.bits))
    assert torch.equal(back.summed_codes, t2v.summed_codes)
    assert back.kept_frames == t2v.kept_frames == 0
    maps = Path("/proc/self/maps")
    if maps.exists():  # Windows refuses to replace or delete a file a live tensor maps (Load Tokens' cache)
        assert str(path.resolve()) not in maps.read_text(encoding="utf-8", errors="replace")
    import dataclasses

    continued = P.Tokens.load(dataclasses.replace(t2v, kept_frames=1).save(tmp_path / "i2v.safetensors"))
    assert continued.kept_frames == 1
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an InfinityStar tokens file"):
        P.Tokens.load(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="expects"):
        P.check_bits([torch.zeros(1, 1, 2, 2, 16)], t2v.schedule())
    (tmp_path / "clip.safetensors").write_bytes(b"\x00\x00 an mp4 renamed")
    with pytest.raises(ValueError, match="not a readable .safetensors tokens file"):
        P.Tokens.load(tmp_path / "clip.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for name, change, message in (("v2", {"version": "2"}, "format version '2'"),
                                  ("nopn", {"pn": None}, "missing pn"),
                                  ("nocodes", {"summed_codes": None}, "missing summed_codes"),
                                  ("flat", {"summed_codes": torch.zeros(3)}, "do not hold"),
                                  # a frame count the file does not hold is refused before a schedule is built for
                                  # it (10^7 clips would take ~100 GB of schedule)
                                  ("huge", {"frames": str(1 + 80 * 10**7)}, "do not hold the 200000001 latent"),
                                  ("short", {"summed_codes": tensors["summed_codes"][:, :, :-1].clone()},
                                   "do not hold"),
                                  ("odd", {"frames": "82"}, "frames '82' is no image or video length"),
                                  ("kept_all", {"kept_frames": "81"}, "kept_frames '81' is not a clip boundary"),
                                  ("kept_mid", {"kept_frames": "40"}, "kept_frames '40' is not a clip boundary"),
                                  ("kept_neg", {"kept_frames": "-1"}, "kept_frames '-1' is not"),
                                  ("text", {"frames": "many"}, "frames 'many' is no")):
        m = {k: v for k, v in {**meta, **change}.items() if v is not None and not isinstance(v, torch.Tensor)}
        t = {k: v for k, v in {**tensors, **change}.items() if isinstance(v, torch.Tensor)}
        save_file(t, str(tmp_path / f"{name}.safetensors"), metadata=m)
        with pytest.raises(ValueError, match=message):
            P.Tokens.load(tmp_path / f"{name}.safetensors")


def test_t2v_tokens_match_schedule(t2v):
    schedule = t2v.schedule()
    assert t2v.frames == 81 and t2v.seed == 7 and len(t2v.bits) == schedule.num_steps
    assert t2v.summed_codes.shape == (1, 64, schedule.latent_frames, *schedule.scales[-1][1:])
    P.check_bits(t2v.bits, schedule)


def test_t2i_decodes_to_one_image(models):
    transformer, _, tokenizer, te = models
    schedule = P.resolve_schedule("0.06M", "1:1", 0)
    calls = []
    tokens = P.generate(transformer, te.encode("a tulip", duration_s=0), schedule, seed=1,
                        callback=lambda i, n, state: calls.append((i, n)))
    assert calls[0] == (0, schedule.num_steps) and calls[-1] == (schedule.num_steps - 1, schedule.num_steps)
    frames = P.decode(tokenizer, tokens)
    assert frames.shape == (1, schedule.height, schedule.width, 3) and frames.dtype == torch.float32
    assert 0 <= frames.min() and frames.max() <= 1


def test_extend_replays_only_the_reference_chain(t2v, models, monkeypatch):
    transformer, _, _, te = models
    text = te.encode("a red fox", duration_s=10)
    forwards = []
    original = transformer.forward_blocks
    monkeypatch.setattr(transformer, "forward_blocks", lambda *a, **k: forwards.append(1) or original(*a, **k))
    longer = P.extend(transformer, text, t2v, clips=1, seed=3)
    new = longer.schedule()
    assert longer.frames == 161 and len(longer.bits) == new.num_steps
    assert all(torch.equal(a, b) for a, b in zip(longer.bits, t2v.bits))
    torch.testing.assert_close(longer.summed_codes[:, :, : t2v.summed_codes.shape[2]], t2v.summed_codes)
    new_steps = new.num_steps - t2v.schedule().num_steps
    assert len(forwards) == 1 + 2 + new_steps  # text, last step of the image clip and of clip 1, new clip
    assert longer.kept_frames == t2v.frames == 81  # what Decode's "new clips" drops


def test_chained_extends_with_one_seed_do_not_redraw_the_same_numbers(t2v, models):
    """Extend draws nothing for the earlier clips: from the seed alone, Extend -> Extend with one seed (the CLI's
    default 41 on every call) drew each new clip from the same random numbers at the same places, and consecutive
    clips came out nearly alike. The draws now depend on the clip's place too; the same seeds still give the same
    video."""
    transformer, _, _, te = models
    text = te.encode("a red fox", duration_s=10)
    once = P.extend(transformer, text, t2v, clips=1, seed=7)
    twice = P.extend(transformer, text, once, clips=1, seed=7)
    steps = once.schedule().num_steps - t2v.schedule().num_steps  # one clip's steps, the same shapes in both
    first, second = once.bits[-steps:], twice.bits[-steps:]
    alike = sum(int((a == b).sum()) for a, b in zip(first, second)) / sum(a.numel() for a in first)
    assert alike < 0.8, f"consecutive clips share {alike:.0%} of their bits"
    again = P.extend(transformer, text, once, clips=1, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(again.bits, twice.bits)) and twice.seed == 7
    assert P.clip_seed(7, 0) == 7 and P.clip_seed(2**64 - 1, 3) < 2**64


def test_a_short_video_ends_in_a_partial_clip_and_round_trips(models, tmp_path):
    """3 s (49 frames) as the official table has it: one clip of 12 latent frames, decoded to 49 frames; its tokens
    save and load, and Extend, which continues whole clips, says so."""
    transformer, _, tokenizer, te = models
    schedule = build_schedule("0.06M", "16:9", 49)
    tokens = P.generate(transformer, te.encode("a red fox"), schedule, seed=5)
    assert tokens.frames == 49 and tokens.summed_codes.shape == (1, 64, 13, 12, 21)
    frames = P.decode(tokenizer, tokens)
    assert frames.shape == (49, schedule.height, schedule.width, 3)
    back = P.Tokens.load(tokens.save(tmp_path / "short.safetensors"))
    assert back.frames == 49 and torch.equal(back.summed_codes, tokens.summed_codes)
    with pytest.raises(ValueError, match="partial clip; Extend continues videos of whole 5 s clips"):
        P.extend(transformer, te.encode("x"), tokens, seed=0)
    with pytest.raises(ValueError, match="partial clip; only whole 5 s clips"):  # the Sampler's start_tokens
        tokens.leading_clips(1)
    assert tokens.leading_clips(0).frames == 1  # its image clip is whole


def test_extend_rejects_partial_tokens(models):
    transformer, _, tokenizer, te = models
    image_tokens = P.encode_image(tokenizer, np.zeros((40, 60, 3), np.uint8), P.resolve_schedule("0.06M", "16:9", 5))
    image_tokens.bits = image_tokens.bits[:-1]
    with pytest.raises(ValueError, match="complete"):
        P.extend(transformer, te.encode("x"), image_tokens, seed=0)


def test_i2v_teacher_forces_the_image(models):
    transformer, _, tokenizer, te = models
    schedule = P.resolve_schedule("0.06M", "16:9", 5)
    image = (np.random.default_rng(0).random((90, 120, 3)) * 255).astype(np.uint8)
    cond = P.encode_image(tokenizer, image, schedule, seed=5)
    assert cond.frames == 1 and len(cond.bits) == schedule.num_image_steps
    again = P.encode_image(tokenizer, image, schedule, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(again.bits, cond.bits))
    out = P.generate(transformer, te.encode("a cat", duration_s=5), schedule, seed=2, condition=cond)
    assert all(torch.equal(a.reshape(b.shape), b) for a, b in zip(out.bits, cond.bits))
    torch.testing.assert_close(out.summed_codes[:, :, :1], cond.summed_codes)
    assert out.kept_frames == 1  # Decode's "new clips" drops the start image's frame
    wrong = P.resolve_schedule("0.06M", "1:1", 5)
    with pytest.raises(ValueError, match="same schedule"):
        P.generate(transformer, te.encode("a cat"), wrong, seed=2, condition=cond)


class _StubTokenizer:
    """Stands in for the video tokenizer (its own encode is tested in test_vae*): returns a seeded latent."""

    def __init__(self):
        self.decoder = torch.nn.Module()
        self.decoder.conv_in = torch.nn.Module()
        self.decoder.conv_in.conv = torch.nn.Conv3d(1, 1, 1)
        self.seen = []

    def encode_latent(self, pixels, generator=None, callback=None):
        from infinitystar.vae.codec import to_signed_unit

        self.seen.append(tuple(pixels.shape))
        self.pixels = to_signed_unit(pixels) if pixels.dtype == torch.uint8 else pixels  # as the tokenizer's chunks
        _, _, t, h, w = pixels.shape
        return torch.randn(1, 64, 1 + (t - 1) // 4, h // 16, w // 16, generator=generator)


def test_v2v_encodes_whole_clips():
    tokenizer = _StubTokenizer()
    schedule = P.resolve_schedule("0.06M", "16:9", 10)
    frames = (np.random.default_rng(1).random((90, 48, 80, 3)) * 255).astype(np.uint8)
    cond = P.encode_video(tokenizer, frames, schedule, seed=0)
    assert tokenizer.seen == [(1, 3, 81, schedule.height, schedule.width)]
    assert cond.frames == 81 and len(cond.bits) == P.resolve_schedule("0.06M", "16:9", 5).num_steps
    assert cond.summed_codes.shape == (1, 64, 21, *schedule.scales[-1][1:])
    P.check_condition(cond, schedule)
    with pytest.raises(ValueError, match="nothing left"):
        P.check_condition(cond, P.resolve_schedule("0.06M", "16:9", 5))
    with pytest.raises(ValueError, match="frames"):
        P.encode_video(tokenizer, frames[:50], schedule)
    with pytest.raises(ValueError, match="leaves no clip to generate .* at least 5 s longer"):
        P.encode_video(tokenizer, frames, P.resolve_schedule("0.06M", "16:9", 5))


def test_v2v_encodes_the_first_clips_of_a_longer_video():
    """The official continuation conditions on the video's first 5 s: of a 10 s input and a 10 s output, frames
    0..80 are encoded (one clip, leaving one to generate), not the last 81 and not both clips. Frame i is filled
    with the grey level i, so the frames the tokenizer receives can be read back."""
    tokenizer = _StubTokenizer()
    schedule = P.resolve_schedule("0.06M", "16:9", 10)
    frames = np.broadcast_to(np.arange(161, dtype=np.uint8)[:, None, None, None], (161, 48, 80, 3)).copy()
    cond = P.encode_video(tokenizer, frames, schedule, seed=0)
    assert cond.frames == 81
    levels = ((tokenizer.pixels[0, 0] + 1) / 2 * 255).round().flatten(1)  # (T, H*W) grey levels
    assert torch.equal(levels.amin(dim=1), levels.amax(dim=1))  # each frame stays one level
    assert levels[:, 0].tolist() == list(range(81))
    P.encode_video(tokenizer, frames, schedule, seed=0, clips=2)
    assert ((tokenizer.pixels[0, 0, :, 0, 0] + 1) / 2 * 255).round().tolist() == list(range(161))


def test_extending_tokens_of_another_resolution_warns(t2v, caplog):
    """Tokens at a resolution the weights were not trained at (e.g. Encode's default 720p with the 480p weights):
    Extend runs, and says so; with weights of unknown size, or without model info, it says nothing."""
    with caplog.at_level("WARNING", logger="infinitystar.pipeline"):
        assert P.extension_schedule(t2v, 1, model_info=_info("480p")).frames == t2v.frames + 80
    assert "480p model is used at resolution 0.06M" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="infinitystar.pipeline"):
        P.extension_schedule(t2v, 1, model_info=_info("unknown", "tiny"))
        P.extension_schedule(t2v, 1, model_info=_info("480p", "tiny"))  # the tiny set in the 480p folder
        P.extension_schedule(t2v, 1)
    assert "trained at" not in caplog.text and "interact" not in caplog.text
    with caplog.at_level("WARNING", logger="infinitystar.pipeline"):
        P.extension_schedule(t2v, 1, model_info=_info("interact"))
    assert "extending a generation with them is not what they were made for" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="infinitystar.pipeline"):  # also with a start image or video
        P.resolve_schedule("0.06M", "16:9", 5, model_info=_info("interact"))
    assert "generating a new video or image (Sampler, `generate`) with them is not what" in caplog.text


def test_leading_clips_are_a_prefix_of_the_longer_generation():
    """A 10 s generation's image clip and clip 1 are a 5 s generation: the shorter schedule's steps are the first
    steps of the longer one (shapes, bit widths, references, RoPE positions), so the leading bits and latents are
    a complete 5 s token set (the Sampler starts a continuation from a longer video's first 5 s)."""
    long, short = P.resolve_schedule("0.06M", "16:9", 10), P.resolve_schedule("0.06M", "16:9", 5)
    fields = ("si", "rep", "real_sid", "clip", "t", "h", "w", "d", "is_last_rep", "frame_ss", "frame_ee", "ref_sids")
    assert [tuple(getattr(s, f) for f in fields) for s in short.steps] == \
        [tuple(getattr(s, f) for f in fields) for s in long.steps[:short.num_steps]]
    gen = torch.Generator().manual_seed(0)
    bits = [torch.randint(0, 2, (1, s.t, s.h, s.w, s.d), generator=gen, dtype=torch.uint8) for s in long.steps]
    codes = torch.randn(1, 64, 41, *long.scales[-1][1:], generator=gen)
    tokens = P.Tokens(bits, codes, long.pn, long.h_div_w, long.frames, 7)
    first = tokens.leading_clips(1)
    assert first.frames == 81 and first.clips == 1 and len(first.bits) == short.num_steps
    assert all(a is b for a, b in zip(first.bits, bits)) and torch.equal(first.summed_codes, codes[:, :, :21])
    assert tokens.leading_clips(2) is tokens and tokens.leading_clips(0).frames == 1
    with pytest.raises(ValueError, match="cannot take 3 leading clip"):
        tokens.leading_clips(3)


def test_tokens_files_are_told_apart_by_their_header(t2v, tmp_path):
    """Load Tokens lists the output folder's tokens among whatever else is saved there (checkpoints, latents)."""
    from safetensors.torch import save_file

    t2v.save(tmp_path / "t.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    (tmp_path / "text.safetensors").write_text("not a safetensors file")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "t.safetensors").read_bytes()[:20])
    assert [p.name for p in sorted(tmp_path.iterdir()) if P.Tokens.is_file_of_tokens(p)] == ["t.safetensors"]


def test_decode_chunks_can_be_capped_for_a_host_to_check_for_cancel(models, t2v):
    """A budget that fits the whole video decodes it in one chunk; ``max_chunk_latents`` caps the chunks (the nodes
    see Cancel between them) and the frames stay the same (chunked decoding is exact)."""
    _, _, tokenizer, _ = models
    calls = {"whole": [], "capped": []}
    whole = P.decode(tokenizer, t2v, memory_budget=1 << 40, callback=lambda d, n: calls["whole"].append(n))
    capped = P.decode(tokenizer, t2v, memory_budget=1 << 40, max_chunk_latents=8,
                      callback=lambda d, n: calls["capped"].append(n))
    assert calls["whole"] == [1] and calls["capped"] == [3, 3, 3]  # 21 latents: 5 + 8 + 8
    assert torch.equal(whole, capped)


def test_decode_new_clips_drops_the_frames_the_tokens_continued(models):
    """``new_clips`` keeps the frames after ``kept_frames`` of a whole decode (the causal decoder reads them all);
    tokens that continue nothing decode whole; an older file without the field reads as continuing nothing."""
    _, _, tokenizer, _ = models
    codes = torch.randn(1, 64, 41, 2, 3, generator=torch.Generator().manual_seed(1)) * 0.5
    whole = P.decode(tokenizer, P.Tokens([], codes, "0.06M", 9 / 16, 161))
    assert whole.shape[0] == 161
    for kept in (0, 1, 81):
        tokens = P.Tokens([], codes, "0.06M", 9 / 16, 161, kept_frames=kept)
        assert torch.equal(P.decode(tokenizer, tokens, new_clips=True), whole[kept:]), kept
        assert torch.equal(P.decode(tokenizer, tokens), whole), kept
    both = P.Tokens([], codes, "0.06M", 9 / 16, 161, kept_frames=1)
    last = P.decode(tokenizer, both, new_clips=True, last_clip=True)
    assert torch.equal(last, whole[-80:])
    # what is dropped is freed: the frames kept hold no more memory than their own (ComfyUI caches them)
    assert last.untyped_storage().nbytes() == last.numel() * last.element_size()
