"""Drive the official FoundationVision/InfinityStar sampler from a checkout, for side-by-side timings.

Nothing of the official code is copied here: this imports its ``Infinity`` class from the given
checkout, builds it with the same architecture, copies OUR random weights into it (the key names
are identical), and calls its ``ar_infer_infinity_elegant`` with the official script settings.
It needs the checkout's import-time dependencies (timm, torchvision, typed-argument-parser, pytz,
opencv, einops, imageio, requests). When ``flash_attn`` is not installed, a stand-in computing the
same unmasked attention with torch SDPA is registered (spec §9.1), after transformers' T5 import.
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

MISSING_HINT = ("the official code needs: pip install timm==0.9.6 torchvision typed-argument-parser pytz "
                "opencv-python-headless einops imageio requests (use a separate virtual environment)")
PN_CODES = {"720p": "0.90M", "480p": "0.40M"}


# The stand-in's CUDA kernel: "flash" = PyTorch's FlashAttention-2, the kernel family of the flash-attn 2 package
# the official code calls (its speed and its rounding); "sdpa" = whatever SDPA picks, which is cuDNN on an H200 with
# torch 2.11 (the official code never runs that kernel: it pins torch 2.5.1 and calls flash-attn); "cudnn" = cuDNN's
# kernel only, on contiguous (B, H, L, D) copies, so that it cannot fall back to another kernel unnoticed (an error
# instead). On a CPU all three compute in fp32.
STANDIN_KERNELS = ("flash", "sdpa", "cudnn")
STANDIN_KERNEL = "flash"
_FORCED = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION"}


def _flash_attn_stub() -> types.ModuleType:
    """A ``flash_attn`` module whose ``flash_attn_func`` is SDPA: (B, L, H, D) in and out."""
    mod = types.ModuleType("flash_attn")
    mod.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
        work = q.dtype if q.is_cuda else torch.float32  # bf16 SDPA on CPU is slow; flash-attn accumulates in fp32
        args = [t.transpose(1, 2).to(work) for t in (q, k, v)]
        kernel = contextlib.nullcontext()
        if q.is_cuda and STANDIN_KERNEL in _FORCED:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            kernel = sdpa_kernel([getattr(SDPBackend, _FORCED[STANDIN_KERNEL])])
            if STANDIN_KERNEL == "cudnn":
                args = [t.contiguous() for t in args]
        with kernel:
            out = F.scaled_dot_product_attention(*args, scale=softmax_scale, is_causal=causal).transpose(1, 2)
        # the real kernel returns bf16; without autocast the caller's o_proj wants its own dtype (fp32)
        cuda_autocast = q.is_cuda and torch.is_autocast_enabled("cuda")
        return out.to(q.dtype if cuda_autocast else torch.float32)

    def flash_attn_qkvpacked_func(*_, **__):  # imported next to flash_attn_func, never called at inference
        raise NotImplementedError("flash_attn stand-in: packed attention is not provided")

    mod.flash_attn_func = flash_attn_func
    mod.flash_attn_qkvpacked_func = flash_attn_qkvpacked_func
    return mod


def import_official(path: str | Path) -> types.SimpleNamespace:
    """Import the official modules from a checkout; raise ImportError with what to install."""
    root = Path(path).resolve()
    if not (root / "infinity" / "models" / "infinity.py").is_file():
        raise FileNotFoundError(f"{root} is not an InfinityStar checkout (no infinity/models/infinity.py)")
    import transformers.models.t5  # noqa: F401  (must precede the flash_attn stand-in, spec §9.1)

    if importlib.util.find_spec("flash_attn") is None and "flash_attn" not in sys.modules:
        sys.modules["flash_attn"] = _flash_attn_stub()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from infinity.models import infinity as model_module
        from infinity.models.videovae.models import load_vae_bsq_wan_absorb_patchify as vae_loader
        from infinity.schedules import dynamic_resolution, infinity_elegant
        from infinity.utils import arg_util, dist
    except ImportError as e:
        raise ImportError(f"cannot import the official code from {root}: {e}; {MISSING_HINT}") from e
    return types.SimpleNamespace(
        Infinity=model_module.Infinity, Args=arg_util.Args, dist=dist, vae_loader=vae_loader,
        get_dynamic_resolution_meta=dynamic_resolution.get_dynamic_resolution_meta,
        get_first_full_spatial_size_scale_index=dynamic_resolution.get_first_full_spatial_size_scale_index,
        get_scale_pack_info=infinity_elegant.get_scale_pack_info,
        get_visual_rope_embeds=infinity_elegant.get_visual_rope_embeds)


def official_args(mod, pn: str, frames: int, bf16: bool, schedule):
    """The official scripts' settings (tools/infer_video_*.py) for one case; ``schedule`` (ours, for pn and frames)
    gives the repetitions and head split."""
    args = mod.Args()
    args.pn = PN_CODES.get(pn, pn)
    args.video_frames = frames
    args.model_type = "infinity_qwen8b"
    args.dynamic_scale_schedule = "infinity_elegant_clip20frames_v2"
    args.bf16 = int(bf16)
    args.use_apg, args.use_cfg, args.cfg, args.apg_norm_threshold = 1, 0, 34, 0.05
    args.tau_image, args.tau_video = 1, 0.4
    args.image_scale_repetition = json.dumps(list(schedule.image_repetition))
    args.video_scale_repetition = json.dumps(list(schedule.video_repetition))
    args.use_two_stage_lfq = 1
    args.detail_scale_min_tokens = schedule.detail_scale_min_tokens
    args.semantic_scales = schedule.semantic_scales
    args.max_repeat_times = 10000
    args.videovae = 10
    return args


def official_interact_args(mod, pn: str, clip_schedule, bf16: bool = False, script_precision: bool = False):
    """The interact script's settings (tools/infer_interact_480p.py): plain CFG 3, tau 0.5, the interact schedule
    and RoPE tables (1000 scale positions); ``clip_schedule`` (ours) gives the repetitions and head split.
    Precision: pure fp32 by default (the golden arithmetic); ``script_precision``: the script's own, fp32 blocks
    under the bf16 autocast of ``gen_one_example``; ``bf16``: bf16 blocks under that autocast, as the T2V scripts."""
    args = mod.Args()
    args.pn = PN_CODES.get(pn, pn)
    args.video_frames = 161
    args.model_type = "infinity_qwen8b"
    args.dynamic_scale_schedule = "infinity_star_interact"
    args.bf16 = int(bf16)
    args.autocast_bf16 = int(bf16 or script_precision)  # OfficialRunner: run under the scripts' bf16 autocast
    args.use_apg, args.use_cfg, args.cfg, args.apg_norm_threshold = 0, 1, 3, 0.05
    args.tau = 0.5
    args.image_scale_repetition = json.dumps(list(clip_schedule.video_repetition))
    args.video_scale_repetition = args.image_scale_repetition
    args.use_two_stage_lfq = 1
    args.detail_scale_min_tokens = clip_schedule.detail_scale_min_tokens
    args.semantic_scales = clip_schedule.semantic_scales
    args.max_repeat_times = 1000
    args.context_frames, args.frames_inner_clip, args.context_interval, args.context_from_largest_no = 1000, 20, 2, 1
    args.videovae = 10
    return args


@contextlib.contextmanager
def _checkpoint_file(state_dict: dict | None = None):
    """video_vae_model always torch.loads its checkpoint; hand it ``state_dict`` (or nothing) instead."""
    real = torch.load
    torch.load = lambda *a, **k: {"vae": dict(state_dict or {})}
    try:
        yield
    finally:
        torch.load = real


def official_tokenizer(mod, args, state_dict: dict) -> torch.nn.Module:
    """The official video tokenizer (``AutoencoderKLCogVideoX``) on the CPU holding ``state_dict``, our tokenizer's
    weights under their official key names (it loads non-strictly: raise on anything left unloaded)."""
    with _checkpoint_file(state_dict), contextlib.redirect_stdout(sys.stderr):
        vae = mod.vae_loader.video_vae_model("<ours>", "dynamic", args.vae_type, global_args=args, test_mode=True)
    theirs = vae.state_dict()
    missing = sorted(k for k in theirs if k not in state_dict)
    unused = sorted(k for k in state_dict if k not in theirs)
    shapes = sorted(k for k in theirs if k in state_dict and tuple(theirs[k].shape) != tuple(state_dict[k].shape))
    if missing or unused or shapes:
        raise ValueError(f"our tokenizer's keys do not fill the official one: missing {missing[:5]}, unused "
                         f"{unused[:5]}, mis-shaped {shapes[:5]}")
    return vae


def official_decode(vae, summed_codes: torch.Tensor, bf16: bool) -> torch.Tensor:
    """The official decode of summed codes (B, 64, T, h, w): ``vae.decode(codes, slice=True)`` (its 3+2+2...
    latent chunks with conv caches), under the scripts' bf16 autocast; raw RGB (B, 3, frames, H, W)."""
    device = summed_codes.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    cpu_guards = _cpu_autocast_guards() if bf16 and device.type == "cpu" else contextlib.nullcontext()
    with autocast, cpu_guards, torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        return vae.decode(summed_codes, slice=True)


class OfficialRunner:
    """The official transformer (+ the tokenizer's quantizer, which its sampler calls) on a device."""

    def __init__(self, mod, config, args, device: torch.device, state_dict, text_channels: int):
        with contextlib.redirect_stdout(sys.stderr):  # the official code prints its settings; stdout is for tables
            self._build(mod, config, args, device, state_dict, text_channels)

    def _build(self, mod, config, args, device: torch.device, state_dict, text_channels: int):
        self.mod, self.args, self.device = mod, args, torch.device(device)
        if self.device.type == "cuda":
            mod.dist.set_gpu_id(self.device.index or 0)
        with _checkpoint_file():
            vae = mod.vae_loader.video_vae_model("<random>", "dynamic", args.vae_type, global_args=args, test_mode=True)
        vae.quantizer.to(self.device)  # the sampler only uses the quantizer; the rest stays on the CPU
        self.vae = vae
        infinity_module = sys.modules[mod.Infinity.__module__]
        rope_fn = infinity_module.precompute_rope4d_freqs_grid

        def rope_on_cpu(*a, **k):  # the model is built on the meta device, its RoPE tables are data
            with torch.device("cpu"):
                return rope_fn(*a, **k)

        infinity_module.precompute_rope4d_freqs_grid = rope_on_cpu
        try:
            with torch.device("meta"):  # weights are copied in below; the 8B model never exists in fp32
                model = mod.Infinity(
                    vae, arch="qwen", depth=config.depth, block_chunks=config.block_chunks, embed_dim=config.width,
                    num_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                    mlp_ratio=config.mlp_hidden / config.width, drop_path_rate=0, text_channels=text_channels,
                    text_maxlen=512, raw_scale_schedule=None, checkpointing="full-block", pad_to_multiplier=128,
                    use_flex_attn=False, add_lvl_embeding_on_first_block=0, num_of_label_value=2,
                    rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2, pn=args.pn, apply_spatial_patchify=0,
                    inference_mode=True, train_h_div_w_list=[0.571, 1.0], video_frames=args.video_frames,
                    other_args=args)
        finally:
            infinity_module.precompute_rope4d_freqs_grid = rope_fn
        if round(config.width * (config.mlp_hidden / config.width) / 256) * 256 != config.mlp_hidden:
            raise ValueError("the official MLP width is round(C*ratio/256)*256; pick mlp_hidden accordingly")
        model.to_empty(device=self.device)
        model.load_state_dict({k: v for k, v in state_dict.items()}, strict=False)
        if args.bf16:
            for block in model.unregistered_blocks:
                block.bfloat16()
        model.eval().requires_grad_(False)
        model.rng = torch.Generator(device=self.device)
        self.model = model

    def run(self, cond: torch.Tensor, seed: int, gt_leak: int = 0, gt_bits=None):
        """One T2V generation from compacted text features cond (L, C_text); returns summed codes. ``gt_leak``
        leading scales take ``gt_bits`` (one (1, t, h, w, d) tensor per step) instead of the drawn bits, as the
        official I2V (image clip) and V2V (image clip + clip 1) scripts do."""
        mod, args = self.mod, self.args
        meta, templates = mod.get_dynamic_resolution_meta(args.dynamic_scale_schedule, args.video_frames)
        h_div_w = templates[abs(templates - 0.571).argmin()]
        schedule = meta[h_div_w][args.pn]["pt2scale_schedule"][(args.video_frames - 1) // 4 + 1]
        first_full = mod.get_first_full_spatial_size_scale_index(schedule)
        args.first_full_spatial_size_scale_index, args.tower_split_index = first_full, first_full + 1
        context_info = mod.get_scale_pack_info(schedule, first_full, args)
        tau = [args.tau_image] * (first_full + 1) + [args.tau_video] * (len(schedule) - first_full - 1)
        L = cond.shape[0]
        text = (cond.to(self.device), [L], torch.tensor([0, L], device=self.device, dtype=torch.int32), L)
        # bf16: the official scripts' CUDA autocast; on a CPU (--cpu-bf16) the CPU autocast stands in for it
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if args.bf16
                    else contextlib.nullcontext())
        cpu_guards = _cpu_autocast_guards() if args.bf16 and self.device.type == "cpu" else contextlib.nullcontext()
        with autocast, cpu_guards, torch.no_grad(), _quiet_tqdm(), contextlib.redirect_stdout(sys.stderr):
            return self.model.ar_infer_infinity_elegant(
                vae=self.vae, scale_schedule=schedule, label_B_or_BLT=text, B=1, g_seed=seed,
                cfg_list=[args.cfg] * len(schedule), tau_list=tau, args=args,
                get_visual_rope_embeds=mod.get_visual_rope_embeds, context_info=context_info,
                return_summed_code_only=True, low_vram_mode=False, gt_leak=gt_leak,
                gt_ls_Bl=None if gt_bits is None else [b.to(self.device).long() for b in gt_bits])


    def run_interact(self, cond: torch.Tensor, seed: int, context: torch.Tensor, first_frame: torch.Tensor,
                     h_div_w: float):
        """One interact clip (``ar_infer_infinity_star_interact``, mode 'second_v_clip') after the context
        (1, 64, 21, H, W) and the story's first latent frame; the runner must be built with
        :func:`official_interact_args`. Returns (the last 21 summed latent frames, the latents it decodes); the decode
        itself is skipped (the tokenizer's parity is tested on its own)."""
        from infinity.schedules import infinity_star_interact as schedule_mod

        mod, args = self.mod, self.args
        meta, templates = mod.get_dynamic_resolution_meta(args.dynamic_scale_schedule, args.video_frames)
        template = templates[abs(templates - h_div_w).argmin()]
        full = meta[template][args.pn]["pt2scale_schedule"][21]
        first_full = mod.get_first_full_spatial_size_scale_index(full)
        args.first_full_spatial_size_scale_index, args.tower_split_index = first_full, first_full + 1
        clip = full[first_full + 1:]
        context_info = schedule_mod.get_scale_pack_info(clip, first_full, args)
        L = cond.shape[0]
        text = (cond.to(self.device), [L], torch.tensor([0, L], device=self.device, dtype=torch.int32), L)
        decoded = []

        def capture_decode(vae, summed_codes):
            decoded.append(summed_codes.clone())
            return torch.zeros(1, 4 * summed_codes.shape[2], 1, 1, 3, dtype=torch.uint8)

        self.model.summed_codes2images = capture_decode
        bf16 = args.autocast_bf16  # set by official_interact_args
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        cpu_guards = _cpu_autocast_guards() if bf16 and self.device.type == "cpu" else contextlib.nullcontext()
        try:
            with autocast, cpu_guards, torch.no_grad(), _quiet_tqdm(), contextlib.redirect_stdout(sys.stderr):
                codes, _ = self.model.ar_infer_infinity_star_interact(
                    vae=self.vae, scale_schedule=clip, label_B_or_BLT=text, B=1, g_seed=seed,
                    cfg_list=[args.cfg] * len(clip), tau_list=[args.tau] * len(clip), args=args,
                    get_visual_rope_embeds=schedule_mod.get_visual_rope_embeds, context_info=context_info,
                    mode="second_v_clip", former_clip_features=context.to(self.device),
                    first_frame_features=first_frame.to(self.device), low_vram_mode=False)
        finally:
            del self.model.summed_codes2images
        return codes, decoded[0]


def interpolate_mode(args: tuple, kwargs: dict) -> str:
    """``mode`` of an ``F.interpolate(input, *args, **kwargs)`` call (its fourth parameter, default "nearest")."""
    return kwargs.get("mode", args[2] if len(args) > 2 else "nearest")


@contextlib.contextmanager
def _cpu_autocast_guards():
    """On a CPU stand-in for the GPU run: make the official ``torch.amp.autocast('cuda', enabled=False)`` regions
    (heads, BSQ) leave the CPU autocast too, so they run in fp32 as on a GPU (spec §9.1), and give
    ``F.interpolate`` CUDA autocast's dtypes instead of the CPU's: the upsampling modes run in fp32 (CUDA's
    fp32 list has ``upsample_trilinear3d`` and the other ``upsample_*`` ops: the official bf16 accumulator
    becomes fp32 at its first re-sizing), area pooling in its input's dtype (CUDA autocast leaves
    ``adaptive_avg_pool3d`` alone; CPU autocast would upcast it)."""
    import torch.nn.functional as F

    real_autocast, real_interpolate = torch.amp.autocast, F.interpolate

    def autocast(device_type, *a, **k):
        if device_type == "cuda" and k.get("enabled", a[1] if len(a) > 1 else True) is False:
            return torch.autocast("cpu", enabled=False)
        return real_autocast(device_type, *a, **k)

    def interpolate(x, *a, **k):
        if (torch.is_autocast_enabled("cpu") and interpolate_mode(a, k) != "area"
                and x.dtype in (torch.bfloat16, torch.float16)):
            x = x.float()
        with torch.autocast("cpu", enabled=False):
            return real_interpolate(x, *a, **k)

    torch.amp.autocast, F.interpolate = autocast, interpolate
    try:
        yield
    finally:
        torch.amp.autocast, F.interpolate = real_autocast, real_interpolate


@contextlib.contextmanager
def _quiet_tqdm():
    import tqdm

    real = tqdm.tqdm

    class Quiet(real):
        def __init__(self, *a, **k):
            k["disable"] = True
            super().__init__(*a, **k)

    tqdm.tqdm = Quiet
    try:
        yield
    finally:
        tqdm.tqdm = real


def isclose_ratio(a: float, b: float) -> float:
    return a / b if b and not math.isclose(b, 0.0) else float("nan")
