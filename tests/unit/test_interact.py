"""InfinityStar-Interact (infinitystar.interact): clip schedule, prefix conditions, stories, windowed decode.

The sampler itself is compared with the official ``ar_infer_infinity_star_interact`` (fp32, CPU, tiny random
weights; needs INFINITYSTAR_OFFICIAL_PATH); the rest checks the rules of spec §6.3 on the tiny model set.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from infinitystar import interact as I
from infinitystar import pipeline as P
from infinitystar.checkpoint import load_tokenizer, load_transformer
from infinitystar.rope import visual_rope
from infinitystar.sampler import TextCondition
from infinitystar.schedule import build_schedule


@pytest.fixture(scope="module")
def models(tiny_models):
    from infinitystar.text import TextEncoder

    transformer, _ = load_transformer(tiny_models["transformer_480p"])
    tokenizer = load_tokenizer(tiny_models["vae"])
    text_encoder = TextEncoder.from_folder(tiny_models["text_encoder"], dtype=torch.float32)
    return transformer, tokenizer, text_encoder


@pytest.fixture(scope="module")
def schedule():
    return I.clip_schedule("0.06M", "16:9")


def _latents(schedule, frames, seed):
    _, H, W = schedule.scales[-1]
    return torch.randn(1, 64, frames, H, W, generator=torch.Generator().manual_seed(seed)) * 0.5


def _video(frames, h=100, w=170, seed=0):
    return (np.random.default_rng(seed).random((frames, h, w, 3)) * 255).astype(np.uint8)


def test_clip_schedule_is_one_video_pyramid_from_position_zero():
    sched = I.clip_schedule("480p", "16:9")
    full = build_schedule("480p", "16:9", 81)
    n = full.scales_per_clip
    assert sched.scales == full.scales[n:] and all(t == 20 for t, _, _ in sched.scales)
    assert [s.real_sid for s in sched.steps] == list(range(sched.num_steps))
    assert sched.num_steps == sum(full.video_repetition) == 3 * 12 + 2 + 1  # the script's [3]*12 + [2, 1]
    assert all((s.frame_ss, s.frame_ee, s.ref_sids, s.clip) == (0, 20, (), 0) for s in sched.steps)
    assert [s.d for s in sched.steps if s.rep == 0] == [16] * 11 + [64] * 3  # semantic_scales = 11
    assert sched.clip_size(0) == full.scales[-1] and sched.ref_last_use() == {}
    with pytest.raises(ValueError, match="at least 8 scales"):
        _truncated_pyramid()


def _truncated_pyramid():
    from unittest import mock

    with mock.patch.dict("infinitystar.schedule.PN_SCALES", {"0.06M": 7}):
        return I.clip_schedule("0.06M", "1:1")


def test_conditions_follow_the_official_layout(schedule):
    context, first = _latents(schedule, 21, 1), _latents(schedule, 1, 2)
    semantic, detail = I.conditions(context, first, schedule)
    _, h, w = schedule.scales[7]
    assert semantic.key == "semantic_condition" and semantic.scale_pos == 800
    assert semantic.frames == tuple(range(1, 21))
    assert torch.equal(semantic.codes, F.interpolate(context[:, :, 1:], size=(20, h, w), mode="area"))
    assert detail.key == "detail_condition" and detail.scale_pos == 801 and detail.frames == (0, 19, 20)
    assert torch.equal(detail.codes, torch.cat([first, context[:, :, 19:21]], dim=2))
    assert semantic.num_tokens == 20 * h * w and detail.num_tokens == 3 * context[0, 0, 0].numel()
    with pytest.raises(ValueError, match="context must be"):
        I.conditions(context[:, :, 1:], first, schedule)
    with pytest.raises(ValueError, match="first frame must be"):
        I.conditions(context, context[:, :, :2], schedule)


def test_rope_frame_list_picks_rows_of_the_frame_range():
    cos, sin = visual_rope(530, 0, 21, 2, 3, 4, 6, head_dim=32)
    picked_cos, picked_sin = visual_rope(530, 0, 0, 2, 3, 4, 6, head_dim=32, frames=(0, 19, 20))
    rows = torch.cat([torch.arange(f * 6, f * 6 + 6) for f in (0, 19, 20)])
    assert torch.equal(picked_cos, cos[rows]) and torch.equal(picked_sin, sin[rows])
    assert torch.equal(visual_rope(530, 3, 5, 2, 3, 4, 6, head_dim=32, frames=(3, 4))[0],
                       visual_rope(530, 3, 5, 2, 3, 4, 6, head_dim=32)[0])


def test_sample_clip_reads_both_conditions(models, schedule, single_thread):
    transformer, _, te = models
    text = te.encode("a red fox", duration_s=5)
    context, first = _latents(schedule, 21, 1), _latents(schedule, 1, 2)

    def run(ctx=context, ff=first, seed=3):
        return I.sample_clip(transformer, text, ctx, ff, schedule, seed=seed).summed_codes

    base = run()
    assert base.shape == (1, 64, 20, *schedule.scales[-1][1:])
    assert torch.equal(run(), base)
    assert not torch.equal(run(ff=_latents(schedule, 1, 9)), base)  # detail condition: the story's first frame
    early = context.clone()
    early[:, :, 1:19] = _latents(schedule, 18, 10)  # only the semantic condition sees frames 1..18
    assert not torch.equal(run(ctx=early), base)
    very_first = context.clone()
    very_first[:, :, :1] = _latents(schedule, 1, 11)  # the context's own first frame is not read
    assert torch.equal(run(ctx=very_first), base)
    assert not torch.equal(run(seed=4), base)


def test_story_start_continue_decode(models, schedule, single_thread, tmp_path):
    transformer, tokenizer, te = models
    video = _video(90)
    story = I.start(tokenizer, video, pn="0.06M", seed=1)
    assert story.kind == "interact" and story.bits == [] and story.frames == 81
    assert story.summed_codes.shape == (1, 64, 21, *schedule.scales[-1][1:])
    assert abs(story.h_div_w - schedule.h_div_w) < 1e-9  # 100 x 170 frames: the 16:9 template
    # the last 81 frames are encoded, with the posterior drawn from the seed
    assert torch.equal(I.start(tokenizer, video[9:], pn="0.06M", seed=1).summed_codes, story.summed_codes)
    assert not torch.equal(I.start(tokenizer, video[:81], pn="0.06M", seed=1).summed_codes, story.summed_codes)
    with pytest.raises(ValueError, match="at least 81 frames"):
        I.start(tokenizer, video[:80], pn="0.06M")

    text = te.encode("a red fox", duration_s=5)
    one = I.continue_story(transformer, text, story, seed=3)
    assert one.frames == 161 and one.summed_codes.shape[2] == 41 and one.kind == "interact"
    assert torch.equal(one.summed_codes[:, :, :21], story.summed_codes)
    direct = I.sample_clip(transformer, text, story.summed_codes[:, :, -21:], story.summed_codes[:, :, :1],
                           schedule, seed=3)
    assert torch.equal(one.summed_codes[:, :, 21:], direct.summed_codes)
    two = I.continue_story(transformer, te.encode("a blue fox", duration_s=5), one, seed=3)
    assert two.frames == 241 and two.summed_codes.shape[2] == 61
    assert (story.kept_frames, one.kept_frames, two.kept_frames) == (0, 81, 161)
    second = I.sample_clip(transformer, te.encode("a blue fox", duration_s=5), one.summed_codes[:, :, -21:],
                           story.summed_codes[:, :, :1], schedule, seed=3)  # first frame: the story's, not the clip's
    assert torch.equal(two.summed_codes[:, :, 41:], second.summed_codes)

    path = two.save(tmp_path / "story.safetensors")
    back = P.Tokens.load(path)
    assert back.kind == "interact" and back.frames == 241 and torch.equal(back.summed_codes, two.summed_codes)
    assert back.kept_frames == 161

    assert I.decode_windows(61) == [(0, 21), (1, 41), (21, 61)]
    frames = P.decode(tokenizer, one)
    assert frames.shape == (161, schedule.height, schedule.width, 3)
    from infinitystar.vae import frames_to_float_images

    alone = frames_to_float_images(tokenizer.decode(one.summed_codes[:, :, :21]), smooth_first_frame=True)
    window = frames_to_float_images(tokenizer.decode(one.summed_codes[:, :, 1:41]), smooth_first_frame=True)
    assert torch.equal(frames[:81], alone) and torch.equal(frames[81:], window[-80:])
    whole = frames_to_float_images(tokenizer.decode(one.summed_codes), smooth_first_frame=True)
    assert not torch.equal(frames[81:], whole[81:])  # not one decode of the whole chain
    calls = []
    last = P.decode(tokenizer, one, last_clip=True, callback=lambda done, total: calls.append((done, total)))
    assert torch.equal(last, frames[81:]) and calls == [(1, 1)]  # only the last window is decoded
    assert torch.equal(P.decode(tokenizer, story, last_clip=True), frames[:81])
    calls = []
    new = P.decode(tokenizer, two, new_clips=True, callback=lambda done, total: calls.append((done, total)))
    assert torch.equal(new, P.decode(tokenizer, two)[161:]) and calls == [(1, 1)]  # only the new clip's window
    import dataclasses

    assert torch.equal(P.decode(tokenizer, dataclasses.replace(two, kept_frames=81), new_clips=True),
                       P.decode(tokenizer, two)[81:])
    assert torch.equal(P.decode(tokenizer, story, new_clips=True), frames[:81])  # a start continues nothing


def test_last_clip_of_other_tokens_is_cut_from_a_whole_decode(models):
    _, tokenizer, _ = models
    codes = torch.randn(1, 64, 41, 2, 3, generator=torch.Generator().manual_seed(0)) * 0.5
    video = P.Tokens([], codes, "0.06M", 9 / 16, 161)
    whole = P.decode(tokenizer, video)
    assert whole.shape[0] == 161 and torch.equal(P.decode(tokenizer, video, last_clip=True), whole[-80:])
    five = P.Tokens([], codes[:, :, :21], "0.06M", 9 / 16, 81)
    assert torch.equal(P.decode(tokenizer, five, last_clip=True), P.decode(tokenizer, five))


def test_story_from_generated_tokens_and_misuse(models, single_thread):
    transformer, tokenizer, te = models
    text = te.encode("a red fox", duration_s=5)
    t2v = P.generate(transformer, text, P.resolve_schedule("0.06M", "16:9", 5), seed=2)
    story = I.continue_story(transformer, text, t2v, seed=5)
    assert story.kind == "interact" and torch.equal(story.summed_codes[:, :, :21], t2v.summed_codes)
    with pytest.raises(ValueError, match="continue them with InfinityStar Interact"):
        P.extend(transformer, text, story, seed=1)
    with pytest.raises(ValueError, match="story"):
        P.generate(transformer, text, P.resolve_schedule("0.06M", "16:9", 10), seed=1, condition=story)
    image = P.generate(transformer, te.encode("a red fox", duration_s=0), P.resolve_schedule("0.06M", "16:9", 0),
                       seed=2)
    with pytest.raises(ValueError, match="at least 81 frames"):
        I.continue_story(transformer, text, image, seed=1)
    partial = P.Tokens(t2v.bits[:5], t2v.summed_codes, t2v.pn, t2v.h_div_w, t2v.frames)
    with pytest.raises(ValueError, match="partial generation"):
        I.continue_story(transformer, text, partial, seed=1)
    cropped = P.Tokens([], t2v.summed_codes[..., :-1], t2v.pn, t2v.h_div_w, t2v.frames, kind="interact")
    with pytest.raises(ValueError, match="latent cells"):
        I.continue_story(transformer, text, cropped, seed=1)
    for kind, bits in (("generation", t2v.bits), ("interact", [])):  # 720p tokens: not an interact size
        wide = P.Tokens(bits, t2v.summed_codes, "0.90M", t2v.h_div_w, t2v.frames, kind=kind)
        with pytest.raises(ValueError, match="0.90M .*trained at 480p.*Interact Start"):
            I.continue_story(transformer, text, wide, seed=1)
    I.check_story(P.Tokens([], t2v.summed_codes, "480p", t2v.h_div_w, t2v.frames, kind="interact"))  # an alias


def test_offload_kv_keeps_the_conditions_on_the_device(models, schedule, single_thread):
    """Every step reads the prefix conditions, as it reads the text, and the memory plan counts them resident: the
    K/V offload leaves them on the device (a clip has no reference scales, so nothing moves) and changes nothing."""
    transformer, _, te = models
    text = te.encode("a red fox", duration_s=5)
    context, first = _latents(schedule, 21, 1), _latents(schedule, 1, 2)
    kept = I.sample_clip(transformer, text, context, first, schedule, seed=3, offload_kv=False)
    moved = I.sample_clip(transformer, text, context, first, schedule, seed=3, offload_kv=True)
    assert moved.kv_offloaded_layers == transformer.config.depth and moved.kv_offloaded_bytes == 0
    assert moved.kv_peak_bytes == kept.kv_peak_bytes > 0
    assert torch.equal(moved.summed_codes, kept.summed_codes)


def test_conditions_refuse_cuda_graphs(models, schedule):
    from infinitystar.cuda_graphs import StepGraphs

    transformer, _, _ = models
    with pytest.raises(ValueError, match="prefix conditions"):
        I.sample_clip(transformer, TextCondition(torch.zeros(3, 32)), _latents(schedule, 21, 1),
                      _latents(schedule, 1, 2), schedule, seed=1, cuda_graphs=StepGraphs.__new__(StepGraphs))


def test_clip_equals_the_official_interact_sampler(official_path, single_thread):
    """fp32 on a CPU: the official ``ar_infer_infinity_star_interact`` (mode 'second_v_clip') and ours draw the
    same bits, so the clip's summed codes are equal, and the latents it decodes are our second window's; at the
    script's cfg 3 and at cfg 1, where both run the conditional branch alone."""
    from bench_loader import load_benchmark

    from infinitystar.guidance import GuidanceConfig

    bench = load_benchmark("bench_generate")
    official = load_benchmark("official")
    mod = official.import_official(official_path)
    config = bench.CONFIGS["tiny"]
    model = bench.build_model(config, torch.device("cpu"), torch.float32, 41)
    for aspect, seed, cfg in (("9:16", 7, 3.0), ("1:1", 8, 1.0)):
        sched = I.clip_schedule("0.06M", aspect)
        args = official.official_interact_args(mod, "0.06M", sched)
        args.cfg = cfg
        runner = official.OfficialRunner(mod, config, args, torch.device("cpu"), model.state_dict(),
                                         config.text_channels)
        cond = bench._text_features(config, seed)
        context, first = _latents(sched, 21, seed), _latents(sched, 1, seed + 1)
        theirs, decoded = runner.run_interact(cond, seed, context, first, sched.h_div_w)
        ours = I.sample_clip(model, TextCondition(cond), context, first, sched, seed=seed, generator_device="cpu",
                             compute_dtype=torch.float32, guidance=GuidanceConfig(scale=cfg, use_apg=False)).summed_codes
        assert theirs.shape == (1, 64, 21, *sched.scales[-1][1:])
        assert torch.equal(theirs[:, :, 1:], ours) and torch.equal(theirs[:, :, :1], context[:, :, -1:])
        a, b = I.decode_windows(41)[1]
        assert torch.equal(decoded, torch.cat([context, ours], dim=2)[:, :, a:b])


def test_clip_in_bf16_follows_the_interact_script_precision(official_path, single_thread, tmp_path):
    """The interact script runs fp32 blocks under bf16 autocast. On a CPU stand-in for that (CPU autocast with the
    official GPU-only guards, as bench_generate --cpu-bf16), our clip computing in bf16 with the interact layout
    the loader gives (bf16 blocks, fp32 norm weights) draws the official clip's bits; with the T2V layout (bf16 norm
    weights) it does not, once the norm weights are not bf16 numbers."""
    from bench_loader import load_benchmark

    from infinitystar.checkpoint import load_transformer
    from infinitystar.tiny import write_sharded_safetensors
    from infinitystar.transformer import RMSNorm

    bench = load_benchmark("bench_generate")
    official = load_benchmark("official")
    mod = official.import_official(official_path)
    config = bench.CONFIGS["tiny"]
    state = bench.build_model(config, torch.device("cpu"), torch.float32, 43).state_dict()
    g = torch.Generator().manual_seed(2)
    state = {k: v + 0.01 * torch.randn(v.shape, generator=g) if k.endswith("norm.weight") else v
             for k, v in state.items()}
    folder = write_sharded_safetensors(tmp_path / "InfinityStarInteract_24K_iters", state, shards=1)
    ours_model, info = load_transformer(folder, dtype=torch.bfloat16)  # what the nodes and the CLI load on a GPU
    assert info.variant == "interact"
    sched = I.clip_schedule("0.06M", "9:16")
    args = official.official_interact_args(mod, "0.06M", sched, script_precision=True)
    runner = official.OfficialRunner(mod, config, args, torch.device("cpu"), state, config.text_channels)
    cond = bench._text_features(config, 9)
    context, first = _latents(sched, 21, 9), _latents(sched, 1, 10)
    theirs = runner.run_interact(cond, 9, context, first, sched.h_div_w)[0][:, :, 1:]

    def ours():
        return I.sample_clip(ours_model, TextCondition(cond), context, first, sched, seed=9, generator_device="cpu",
                             compute_dtype=torch.bfloat16).summed_codes

    assert torch.equal(ours(), theirs)
    for m in ours_model.modules():
        if isinstance(m, RMSNorm) and m.weight.dtype == torch.float32 and m is not ours_model.norm_hidden_sates:
            m.weight.data = m.weight.data.to(torch.bfloat16)
    assert not torch.equal(ours(), theirs)


def test_the_official_prompt_file_starts_with_the_reference_caption():
    """The official interact script reads prompt.txt line by line and takes line 1 as the reference video's
    caption, blank or not; the clips are the later lines (blank ones skipped here)."""
    assert I.prompt_file_clips("a fox in the snow\na green frog\n\na grey heron\n") == (
        "a fox in the snow", ["a green frog", "a grey heron"])
    assert I.prompt_file_clips("\na green frog\n") == ("", ["a green frog"])
    assert I.prompt_file_clips("") == ("", [])
