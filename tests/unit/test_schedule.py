import pytest

from infinitystar.schedule import (
    ScaleStep,
    aspect_templates,
    build_schedule,
    nearest_template,
    supported_frames,
    supported_pn,
)


def test_fifteen_templates():
    keys = sorted(aspect_templates())
    assert len(keys) == 15 and keys[0] == 0.336 and keys[-1] == 2.971
    assert all(len(v) == 15 for v in aspect_templates().values())


@pytest.mark.parametrize("pn,aspect,size", [
    ("0.90M", "16:9", (720, 1280)), ("0.90M", "1:1", (960, 960)), ("0.90M", "9:16", (1280, 720)),
    ("720p", 0.571, (720, 1280)), ("0.40M", "16:9", (480, 848)), ("480p", "1:1", (640, 640)),
    ("0.06M", "16:9", (192, 336))])
def test_output_sizes(pn, aspect, size):
    s = build_schedule(pn, aspect, 81)
    assert (s.height, s.width) == size


def test_720p_schedule_from_spec():
    s = build_schedule("720p", "16:9", 81)
    assert s.num_steps == 85 and s.num_image_steps == 45 and s.scales_per_clip == 15
    pyramid = [(h, w) for _, h, w in s.scales[:15]]
    assert pyramid == [(1, 1), (2, 3), (2, 4), (3, 5), (4, 7), (4, 8), (5, 9), (6, 11), (8, 13), (9, 16), (12, 21),
                       (18, 32), (24, 43), (30, 53), (45, 80)]
    assert s.video_repetition == (3,) * 12 + (2, 1, 1) and s.image_repetition == (3,) * 15
    assert [st.real_sid for st in s.steps] == list(range(85))
    assert s.latent_frames == 21 and s.clip_size(0) == (1, 45, 80) and s.clip_size(1) == (20, 45, 80)
    detail = {(st.h, st.w) for st in s.steps if st.d == 64}
    assert detail == {(24, 43), (30, 53), (45, 80)}


@pytest.mark.parametrize("frames,steps,clips", [(81, 81, 2), (161, 120, 3), (241, 159, 4), (1, 42, 1)])
def test_480p_step_counts(frames, steps, clips):
    s = build_schedule("480p", "16:9", frames)
    assert s.num_steps == steps and s.num_clips == clips
    assert s.video_repetition == (3,) * 12 + (2, 1) and s.semantic_scales == 11
    assert s.detail_scale_min_tokens == 350


def test_reference_table_and_frames():
    s = build_schedule("0.06M", "16:9", 241)
    n = s.scales_per_clip
    for st in s.steps:
        if st.clip == 0:
            assert st.ref_sids == () and (st.frame_ss, st.frame_ee) == (0, 1) and st.t == 1
        else:
            assert st.ref_sids == (st.clip * n - 1,)
            assert (st.frame_ss, st.frame_ee) == (1 + 20 * (st.clip - 1), 1 + 20 * st.clip) and st.t == 20
    last = s.ref_last_use()
    assert set(last) == {n - 1, 2 * n - 1, 3 * n - 1}  # the last scale of every clip but the final one
    assert sum(st.is_last_rep for st in s.steps) == len(s.scales)


def test_image_schedule():
    s = build_schedule("0.06M", "1:1", 1)
    assert s.num_clips == 1 and s.steps == s.image_steps and s.num_steps == 33
    assert all(isinstance(st, ScaleStep) and st.clip == 0 for st in s.steps)


def test_nearest_template_snaps():
    assert nearest_template(0.55) == 0.562 and nearest_template(10.0) == 2.971 and nearest_template(1.02) == 1.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(pn="1080p"), "unsupported resolution"), (dict(aspect="wide"), "unsupported aspect"),
    (dict(aspect=-1.0), "unsupported aspect"), (dict(frames=50), "unsupported frame count"),
    (dict(frames=0), "unsupported frame count"), (dict(frames=9), "unsupported frame count")])
def test_bad_input_lists_supported(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        build_schedule(**kwargs)
    text = str(info.value)
    assert any(str(x) in text for x in supported_pn() + supported_frames() + ["W:H"])


def test_lengths_between_whole_clips_end_in_a_partial_clip():
    """The official table's entries under 5 s (``pt2scale_schedule[pt]`` for every second: 17, 33, 49, 65 frames)
    keep the clip's pyramid and cut its t to the latent frames there are: 3 s = 13 latent frames, one clip of 12.
    Past 5 s only whole clips: the official sampler fails on a partial clip after a whole one (8 s, 129 frames)."""
    three = build_schedule("0.06M", "16:9", 49)
    assert (three.latent_frames, three.num_clips, three.frames) == (13, 2, 49)
    assert {t for t, _, _ in three.scales[11:]} == {12} and three.scales[-1] == (12, 12, 21)
    last = three.steps[-1]
    assert (last.frame_ss, last.frame_ee, last.ref_sids) == (1, 13, (10,))
    assert [s.rep for s in three.steps] == [s.rep for s in build_schedule("0.06M", "16:9", 81).steps]
    assert build_schedule("0.06M", "16:9", 17).scales[-1] == (4, 12, 21)
    with pytest.raises(ValueError, match="unsupported frame count 129.*1 to 4 s"):
        build_schedule("0.06M", "16:9", 129)


def test_custom_repetitions():
    s = build_schedule("0.06M", "16:9", 81, image_repetition=(1,) * 11, video_repetition=(1,) * 11)
    assert s.num_steps == 22 and all(st.is_last_rep for st in s.steps)
    with pytest.raises(ValueError):
        build_schedule("0.06M", "16:9", 81, video_repetition=(1, 2))


@pytest.mark.parametrize("pn", ["0.06M", "0.25M", "0.40M", "0.90M"])
def test_detail_token_threshold_agrees_with_the_detail_scales(pn):
    """The tokenizer side (the official encoder and BSQ pick 16 or 64 bits by h*w against detail_scale_min_tokens)
    and the AR side (the head by scale index: the last 3 of a clip are detail) must name the same scales, for every
    aspect template, or an encoded condition's codes would be scaled for the other bit width."""
    for h_div_w in aspect_templates():
        s = build_schedule(pn, h_div_w, 81)
        for step in s.steps:
            by_area = step.h * step.w >= s.detail_scale_min_tokens
            assert by_area == (not step.is_semantic), (pn, h_div_w, step.si, step.h * step.w,
                                                       s.detail_scale_min_tokens)


def test_schedules_equal_the_official_tables(official_path):
    """Every aspect template, resolution and length (image, 1 to 5 s by the second, 10 and 15 s) against the
    official schedule tables: the same scales, clip split, reference scales and frame ranges (needs
    INFINITYSTAR_OFFICIAL_PATH)."""
    from bench_loader import load_benchmark

    official = load_benchmark("official")
    mod = official.import_official(official_path)
    checked = 0
    tables, _ = mod.get_dynamic_resolution_meta("infinity_elegant_clip20frames_v2", 241)  # the 15 s table
    assert sorted(tables) == sorted(aspect_templates())
    for frames in (1, 17, 33, 49, 65, 81, 161, 241):
        for h_div_w, by_pn in tables.items():
            for pn in ("0.06M", "0.25M", "0.40M", "0.90M"):
                theirs = [tuple(s) for s in by_pn[pn]["pt2scale_schedule"][(frames - 1) // 4 + 1]]
                ours = build_schedule(pn, h_div_w, frames)
                assert ours.latent_frames == 1 + (frames - 1) // 4 and ours.frames == frames
                first_full = mod.get_first_full_spatial_size_scale_index(theirs)
                info = mod.get_scale_pack_info(theirs, first_full, official.official_args(mod, pn, 241, False, ours))
                assert ours.scales == tuple(theirs) and ours.scales_per_clip == first_full + 1, (frames, h_div_w, pn)
                for step in ours.steps:
                    packed = info[step.si]
                    assert list(step.ref_sids) == list(packed["ref_sids"]), (frames, h_div_w, pn, step.si)
                    assert (step.frame_ss, step.frame_ee) == (packed["frame_ss"], packed["frame_ee"])
                checked += 1
    assert checked == 8 * 15 * 4
