"""The bitwise spacetime AR sampler of the official model (``ar_infer_infinity_elegant``, spec §5).

One text step fills the 't0' K/V; then every (scale, repetition) step embeds the area-downsampled
clip accumulator, runs the blocks (batch 2: conditional, unconditional; batch 1 when no scale is guided),
takes the semantic or
detail head, multiplies by 1/tau, applies guidance over the whole step and draws all bits with
ONE ``torch.multinomial`` call on a generator seeded once. Teacher-forced steps (I2V, V2V) still
draw, so the random stream matches the official sampler. Parity-tested against the golden cases.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .bsq import LATENT_CHANNELS, accumulate, downsample_accumulator
from .cuda_graphs import StepGraphs, step_graphs
from .guidance import GuidanceConfig, guide
from .kv_cache import TEXT_KEY, ScaleKVCache, offloaded_layers
from .rope import text_rope, visual_rope
from .schedule import ScaleStep, Schedule
from .transformer import InfinityStarTransformer, StepContext

logger = logging.getLogger(__name__)


@dataclass
class TextCondition:
    """Compacted T5 features of the prompt, and optionally of a negative prompt.

    cond: (L, C_text) fp32. uncond: (L_neg <= L, C_text) or None for the learned ``cfg_uncond[:L]``;
    a negative prompt is projected then zero-padded to L (spec §4).
    """

    cond: torch.Tensor
    uncond: torch.Tensor | None = None


@dataclass(frozen=True)
class PrefixCondition:
    """Codes run through the blocks once, after the text, and attended to by every step (keys in list order,
    after the text's): the interact model's semantic and detail conditions (:mod:`infinitystar.interact`)."""

    key: str  # K/V cache key; the official names are 'semantic_condition' and 'detail_condition'
    codes: torch.Tensor  # (1, 64, t, h, w) fp32
    scale_pos: int  # RoPE scale-axis position, counted like ``ScaleStep.real_sid`` (the text offset comes on top)
    frames: tuple[int, ...]  # RoPE frame positions of the t frames

    @property
    def num_tokens(self) -> int:
        return int(self.codes[0, 0].numel())


@dataclass
class SampleResult:
    bits: list[torch.Tensor]  # per step, uint8 (1, t, h, w, d) on CPU
    accumulators: list[torch.Tensor]  # per clip, fp32 (1, 64, T_clip, H, W)
    summed_codes: torch.Tensor  # accumulators concatenated along T: (1, 64, T_total, H, W)
    kv_peak_bytes: int = 0  # largest device-resident K/V cache size during the run
    kv_offloaded_bytes: int = 0  # largest K/V kept in host memory (offload_kv)
    kv_offloaded_layers: int = 0  # layers whose reference K/V was kept in host memory


@dataclass
class StepRecord:
    """What :func:`sample` shows a ``step_hook`` after each step (tensors on the compute device)."""

    step: ScaleStep
    logits: torch.Tensor  # (2, t*h*w, 2d) fp32 head output before 1/tau: [cond, uncond]; (1, ...) unguided
    guided: torch.Tensor  # (1, t*h*w, 2d) fp32, the sampler input
    drawn: torch.Tensor  # (1, t, h, w, d) uint8, the bits drawn
    bits: torch.Tensor  # (1, t, h, w, d) uint8, the bits used (drawn or teacher)


def draw_bits(guided: torch.Tensor, shape: Sequence[int], generator: torch.Generator,
              finite: torch.Tensor | None = None) -> torch.Tensor:
    """One multinomial over every (class 0, class 1) pair of a step: guided (1, L, 2d) -> uint8 shape.

    parity: softmax over pairs then exactly one ``torch.multinomial(probs, 1, replacement=True)``.
    ``finite`` (a bool tensor on the step's device) is cleared when the probabilities are not all finite, which are
    then drawn as coin flips: a NaN would stop CUDA's multinomial with a device-side assert that leaves the process's
    GPU unusable. The caller checks it once after the loop (no sync per step); finite steps draw exactly as without.
    """
    probs = guided.reshape(1, -1, 2).softmax(dim=-1).view(-1, 2)
    if finite is not None:
        ok = torch.isfinite(probs).all()
        finite &= ok
        probs = torch.where(ok, probs, 0.5)
    if probs.device != generator.device:
        probs = probs.to(generator.device)
    idx = torch.multinomial(probs, num_samples=1, replacement=True, generator=generator)
    return idx.view(*shape).to(device=guided.device, dtype=torch.uint8)


def _check_finite(finite: torch.Tensor, dtype: torch.dtype) -> None:
    """Raise when a step's logits were not finite (:func:`draw_bits`'s flag): one sync, after the loop."""
    if bool(finite):
        return
    advice = ("compute in fp32 (the Model Loader's compute_dtype fp32; the CLI computes fp32 blocks in fp32: --dtype "
              "fp32), or in bf16 on GPUs that have it (NVIDIA RTX 30xx / Ampere or newer): fp16 is too narrow for "
              "this model"
              if dtype == torch.float16 else "the weights may be damaged or not InfinityStar's")
    raise FloatingPointError(f"the transformer's output overflowed in {str(dtype).removeprefix('torch.')} (inf / NaN "
                             f"logits), so the video would be noise: {advice}.")


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> CUDA copies through pinned memory, asynchronously (no sync in the step loop)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _to_cpu(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Move a list of small tensors to the CPU with one copy (one sync instead of one per step)."""
    if not tensors or all(t.device.type == "cpu" for t in tensors):
        return tensors
    flat = torch.cat([t.reshape(-1).to(tensors[0].device) for t in tensors]).cpu()
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def resolve_chunk_tokens(chunk_tokens: int | str | None, config, dtype: torch.dtype, batch: int = 2) -> int | None:
    """``"auto"`` -> :func:`infinitystar.memory.auto_chunk_tokens`; ``None``/0 -> no chunking."""
    if chunk_tokens == "auto":
        from .memory import auto_chunk_tokens

        return auto_chunk_tokens(config, batch, dtype)
    if isinstance(chunk_tokens, str):
        raise ValueError(f"chunk_tokens must be 'auto', a token count or None, got {chunk_tokens!r}")
    return int(chunk_tokens) if chunk_tokens else None


def resolve_offload_kv(offload_kv: bool | int | str, model: InfinityStarTransformer, schedule: Schedule,
                       text: TextCondition, dtype: torch.dtype, chunk_tokens: int | None,
                       extra_tokens: int = 0, batch: int = 2, attn_backend: str = "sdpa") -> int:
    """How many layers keep their reference K/V in host memory. ``"auto"``: none off CUDA; on CUDA the
    fewest that let the run fit the device's free memory less ``AUTO_HEADROOM``
    (:func:`infinitystar.memory.choose_kv_offload`). ``extra_tokens``: prefix-condition tokens every step reads
    (counted like text)."""
    depth = model.config.depth
    if offload_kv != "auto":
        return offloaded_layers(offload_kv, depth)
    device = model_device(model)
    if device.type != "cuda":
        return 0
    from .attention import takes_gqa
    from .memory import choose_kv_offload

    available = cuda_available_bytes(device)
    layers = choose_kv_offload(model.config, schedule, available - AUTO_HEADROOM, batch=batch, dtype=dtype,
                               text_tokens=text.cond.shape[0] + extra_tokens, chunk_tokens=chunk_tokens,
                               weight_dtype=model.block_dtype(),
                               native_gqa=takes_gqa(device, dtype, model.config.head_dim, attn_backend))
    if layers:
        logger.info("reference K/V of %d of %d layers kept in host memory: the run would not fit the %.1f GB free "
                    "on %s otherwise", layers, depth, available / 1e9, device)
    return layers


def resolve_graphs(cuda_graphs: bool | StepGraphs, model: InfinityStarTransformer) -> StepGraphs | None:
    """``sample``'s ``cuda_graphs``: the model's own StepGraphs for True (a CUDA model only), None for False."""
    if isinstance(cuda_graphs, StepGraphs):
        return cuda_graphs
    if not cuda_graphs:
        return None
    device = model_device(model)
    if device.type != "cuda":
        raise ValueError(f"cuda_graphs needs the model on a CUDA device; it is on {device}. Leave cuda_graphs off")
    return step_graphs(model)


def cuda_index(device: torch.device | int) -> int:
    """The CUDA device's index: some torch.cuda memory functions refuse a bare ``torch.device("cuda")``."""
    if isinstance(device, int):
        return device
    return device.index if device.index is not None else torch.cuda.current_device()


def cuda_available_bytes(device: torch.device) -> int:
    """Bytes this process may still allocate on a CUDA device: free memory plus what torch's allocator holds
    unused, within a per-process memory fraction (a cap set by the host or a benchmark)."""
    device = cuda_index(device)
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    available = free + torch.cuda.memory_reserved(device) - allocated
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if fraction is not None:
        available = min(available, int(fraction(device) * total) - allocated)
    return available


AUTO_HEADROOM = 1 << 30  # bytes "auto" choices leave free for allocator fragmentation and the estimate's error


def default_compute_dtype(device: torch.device, stored: torch.dtype | None = None) -> torch.dtype:
    """bf16 blocks on a GPU that has bf16 (the official layout), fp16 on older CUDA GPUs (Turing, Pascal: bf16 is
    emulated there, or refused), fp32 elsewhere, and fp32 for blocks ``stored`` in fp32 (asked for: the CLI's
    ``--dtype fp32`` is the way out of an fp16 overflow)."""
    from .ops import native_bf16

    if device.type != "cuda" or stored == torch.float32:
        return torch.float32
    return torch.bfloat16 if native_bf16(device) else torch.float16


def model_device(model: InfinityStarTransformer) -> torch.device:
    """Where the transformer runs: the device of its (fp32) input embedding."""
    return model.word_embed.weight.device


def _as_step_bits(bits: torch.Tensor, step: ScaleStep, device) -> torch.Tensor:
    bits = bits if bits.dim() == 5 else bits[None]
    want = (1, step.t, step.h, step.w, step.d)
    if tuple(bits.shape) != want:
        raise ValueError(f"bits for step {step.index} have shape {tuple(bits.shape)}, expected {want}")
    return bits.to(device=device, dtype=torch.uint8)


class _Runner:
    """State of one generation: KV cache, accumulators, schedule bookkeeping."""

    def __init__(self, model, schedule, text, compute_dtype, attn_backend, round_qkv_bf16,
                 chunk_tokens=None, compile=False, offload_kv: bool | int | str = False, graphs=None,
                 conditions: Sequence[PrefixCondition] = (), batch: int = 2):
        self.model, self.schedule = model, schedule
        self.device = model_device(model)
        stored = model.block_dtype() if callable(getattr(model, "block_dtype", None)) else None
        self.dtype = compute_dtype or default_compute_dtype(self.device, stored)
        self.batch = batch  # 2: [conditional, unconditional]; 1: the conditional branch alone
        self.attn_backend, self.round_qkv_bf16 = attn_backend, round_qkv_bf16
        self.chunk_tokens = resolve_chunk_tokens(chunk_tokens, model.config, self.dtype, batch)
        self.compile = compile
        self.conditions = tuple(conditions)
        if self.conditions and graphs is not None:
            raise ValueError("cuda_graphs cannot replay steps with prefix conditions (interact model); leave them off")
        offload = resolve_offload_kv(offload_kv, model, schedule, text, self.dtype, self.chunk_tokens,
                                     sum(c.num_tokens for c in self.conditions), batch, attn_backend)
        self.graphs = graphs
        if graphs is not None:
            graphs.begin(model, self.dtype)
        self.cache = ScaleKVCache(model.config.depth, offload=offload, homes=graphs,
                                  resident=[c.key for c in self.conditions])
        self.last_use = schedule.ref_last_use()
        self.accumulators: list[torch.Tensor] = []
        self.text = text
        _, self.h_final, self.w_final = schedule.scales[-1]

    def ctx(self, rope, store_key=None, ref_keys=()):
        rope = tuple(_to_device(t, self.device) for t in rope)  # once per step, not once per layer
        return StepContext(rope, self.cache, store_key, tuple(ref_keys), self.attn_backend, self.round_qkv_bf16,
                           self.chunk_tokens, self.compile)

    def text_step(self):
        prefix = self.model.text_prefix(self.text.cond.to(self.device),
                                        None if self.text.uncond is None else self.text.uncond.to(self.device),
                                        dtype=self.dtype, guided=self.batch == 2)
        rope = text_rope(prefix.shape[1], self.model.config.head_dim, self.model.config.rope_base)
        self.model.forward_blocks(prefix, self.ctx(rope, store_key=TEXT_KEY), self.dtype)

    def condition_steps(self):
        """Cache each prefix condition's K/V: it attends only to itself, like the text step."""
        cfg = self.model.config
        for c in self.conditions:
            _, _, t, h, w = c.codes.shape
            if len(c.frames) != t:
                raise ValueError(f"condition {c.key!r}: {t} frames but {len(c.frames)} frame positions")
            x = self.model.embed_codes(c.codes.to(self.device), dtype=self.dtype).expand(self.batch, -1, -1)
            rope = visual_rope(cfg.text_maxlen + c.scale_pos, 0, 0, h, w, self.h_final, self.w_final, cfg.head_dim,
                               cfg.rope_base, frames=c.frames)
            handed = [x]
            del x
            self.model.forward_blocks(handed, self.ctx(rope, store_key=c.key), self.dtype)

    def accumulator(self, clip: int) -> torch.Tensor:
        while len(self.accumulators) <= clip:
            t, H, W = self.schedule.clip_size(len(self.accumulators))
            # fp32 in every precision: the official GPU run starts them in its prefix tokens' dtype (bf16 under
            # autocast), but its first trilinear re-sizing of the accumulator runs in fp32 under CUDA autocast
            # (upsample_trilinear3d is on autocast's fp32 list), so from then on it sums in fp32
            self.accumulators.append(torch.zeros(1, LATENT_CHANNELS, t, H, W, device=self.device))
        return self.accumulators[clip]

    def forward(self, step: ScaleStep, acc: torch.Tensor) -> torch.Tensor:
        """Run the blocks for one step from the accumulator before it; returns (batch, thw, C) hidden."""
        cfg = self.model.config
        # in the compute dtype already (no fp32 copy is kept); both guidance branches get identical visual tokens
        x = self.model.embed_codes(downsample_accumulator(acc, (step.t, step.h, step.w)), dtype=self.dtype)
        x = x.expand(self.batch, -1, -1)
        rope = visual_rope(cfg.text_maxlen + step.real_sid, step.frame_ss, step.frame_ee, step.h, step.w,
                           self.h_final, self.w_final, cfg.head_dim, cfg.rope_base)
        store = step.si if step.is_last_rep and step.si in self.last_use else None
        handed = [x]  # forward_blocks takes the only reference: the embedding is freed after the first block
        del x
        ctx = self.ctx(rope, store, (*step.ref_sids, TEXT_KEY, *(c.key for c in self.conditions)))
        if self.graphs is not None:
            return self.graphs.forward(self.model, handed, ctx, self.dtype)
        return self.model.forward_blocks(handed, ctx, self.dtype)

    def release_after(self, index: int):
        for key, last in self.last_use.items():
            if last <= index and key in self.cache:
                self.cache.release(key)

    def replay_prefix(self, prefix_bits: Sequence[torch.Tensor]) -> int:
        """Rebuild accumulators and the reference K/V chain from the bits of whole leading clips.

        Only the last step of each clip is run (it is the only K/V a later clip reads). Returns the
        index of the first step to generate.
        """
        n = len(prefix_bits)
        clips = [c for c in range(self.schedule.num_clips) if self.schedule.steps_before_clip(c + 1) == n]
        if not clips:
            raise ValueError(f"prefix of {n} steps does not end at a clip boundary; clip ends: "
                             f"{[self.schedule.steps_before_clip(c + 1) for c in range(self.schedule.num_clips)]}")
        for step in self.schedule.steps[:n]:
            bits = _as_step_bits(prefix_bits[step.index], step, self.device)
            if step.is_last_rep and step.si in self.last_use:
                self.forward(step, self.accumulator(step.clip))
            self.accumulators[step.clip] = accumulate(self.accumulator(step.clip), bits)
            self.release_after(step.index)
        return n


def sample(model: InfinityStarTransformer, text: TextCondition, schedule: Schedule, *, seed: int,
           guidance: GuidanceConfig = GuidanceConfig(), tau_image: float = 1.0, tau_video: float = 0.4,
           teacher_bits: Sequence[torch.Tensor] | None = None, prefix_bits: Sequence[torch.Tensor] | None = None,
           callback: Callable[[int, int, list[torch.Tensor]], None] | None = None,
           step_hook: Callable[[StepRecord], None] | None = None, generator_device: str = "cpu",
           compute_dtype: torch.dtype | None = None, attn_backend: str = "sdpa",
           round_qkv_bf16: bool = True, chunk_tokens: int | str | None = "auto",
           compile: bool = False, offload_kv: bool | int | str = "auto",
           cuda_graphs: bool | StepGraphs = False, conditions: Sequence[PrefixCondition] = ()) -> SampleResult:
    """Generate the bits of every step of ``schedule``.

    teacher_bits: bits (t, h, w, d) or (1, t, h, w, d) of the first N steps; they replace the drawn
      bits but every step still draws (I2V: the image steps; V2V: image + clip-1 steps).
    prefix_bits: bits of whole leading clips (video extension): those clips are not sampled and
      no random numbers are drawn for them; only each clip's last step is replayed to rebuild the
      reference K/V chain.
    callback(step_index, total_steps, accumulators) runs after each step (the list is live: read,
      don't modify); an exception raised in it propagates (the K/V cache is freed either way).
    step_hook(StepRecord) sees each step's raw logits, guided logits and bits (parity tests, previews).
    compute_dtype: the blocks' dtype (default bf16 on CUDA, fp32 elsewhere); embeddings, heads,
      guidance and accumulators always run in fp32.
    chunk_tokens: steps with more tokens run their attention queries, MLP and heads in blocks of
      this many tokens (exact; bounds the activations, see infinitystar.memory); "auto" sizes the
      block from ``memory.CHUNK_BUDGET``, None or 0 disables it.
    compile: run the parts of each block around attention (norms, projections, RoPE, feed-forward) through
      torch.compile (off by default).
    offload_kv: keep the reference scales' K/V of every layer (True) or of the first n layers (n) in host
      memory (exact; costs one host-to-device copy of the references per offloaded layer and step); "auto"
      offloads on CUDA only as many layers as the run needs to fit the free memory.
    cuda_graphs: replay the small steps as CUDA graphs (exact; see infinitystar.cuda_graphs). True keeps the
      graphs on the model, so that later generations of the same size and prompt length replay them all
      (``release_step_graphs(model)`` frees them); a StepGraphs object is used as it is.
    conditions: prefix conditions run once after the text and read by every step (the interact model's, see
      :mod:`infinitystar.interact`); not with cuda_graphs.
    generator_device: where the bits are drawn; "cuda" with a CUDA model keeps the loop free of
      host-device syncs (the official sampler uses a CUDA generator); "cpu" matches the CPU goldens.
    """
    if len(guidance.per_scale) > schedule.scales_per_clip:
        logger.warning("the guidance schedule lists %d values; a clip's pyramid has %d scales, so the last %d are "
                       "unused", len(guidance.per_scale), schedule.scales_per_clip,
                       len(guidance.per_scale) - schedule.scales_per_clip)
    runner = _Runner(model, schedule, text, compute_dtype, attn_backend, round_qkv_bf16, chunk_tokens, compile,
                     offload_kv, resolve_graphs(cuda_graphs, model), conditions,
                     guidance.branches(schedule.scales_per_clip))
    generator = torch.Generator(generator_device).manual_seed(int(seed))
    teacher = list(teacher_bits or [])
    bits_out: list[torch.Tensor] = []
    finite = torch.ones((), dtype=torch.bool, device=runner.device)
    try:
        with torch.inference_mode():
            runner.text_step()
            runner.condition_steps()
            start = 0
            if prefix_bits:
                start = runner.replay_prefix(prefix_bits)
                bits_out = [_as_step_bits(b, s, "cpu") for b, s in zip(prefix_bits, schedule.steps)]
            for step in schedule.steps[start:]:
                acc = runner.accumulator(step.clip)
                hidden = runner.forward(step, acc)
                logits = model.head_logits(hidden, step.is_semantic, runner.chunk_tokens)  # [batch, thw, 2d] fp32
                del hidden
                tau = tau_image if step.clip == 0 else tau_video
                scaled = logits * (1 / tau)  # parity: multiply by the Python reciprocal, spec §5.3 step 4
                guided = guide(scaled[:1], scaled[1:], guidance.at(step.si % schedule.scales_per_clip))
                drawn = draw_bits(guided, (1, step.t, step.h, step.w, step.d), generator, finite)
                bits = _as_step_bits(teacher[step.index], step, drawn.device) if step.index < len(teacher) else drawn
                if step_hook is not None:
                    step_hook(StepRecord(step, logits, guided, drawn, bits))
                runner.accumulators[step.clip] = accumulate(acc, bits)
                runner.release_after(step.index)
                bits_out.append(bits)  # moved to the CPU after the loop: no sync per step
                if callback is not None:
                    callback(step.index, schedule.num_steps, runner.accumulators)
        _check_finite(finite, runner.dtype)
        accs = [a.float() for a in runner.accumulators]
        bits_out = _to_cpu(bits_out)
        return SampleResult(bits_out, accs, torch.cat(accs, dim=2), runner.cache.peak_nbytes,
                            runner.cache.peak_offloaded_nbytes, runner.cache.offload_layers)
    finally:
        runner.cache.clear()
