"""The InfinityStar autoregressive transformer (official ``Infinity(arch='qwen')``, spec §2).

Qwen3-style pre-norm blocks (GQA self-attention with QK-norm and 4D RoPE, SwiGLU MLP), text as a
prefix in the same self-attention, ``word_embed`` over the 64-channel accumulated codes, and two
bit heads (16-bit semantic, 64-bit detail). There is no adaLN, no cross-attention and no timestep
embedding. Parameter names equal the official checkpoint's; the model runs one AR step per call
(the sampler owns the loop). Parity-tested against the golden cases.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import shutil
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attend, prepare_kv
from .config import FP32_MODULES, TransformerConfig
from .kv_cache import ScaleKVCache, concat_to
from .ops import WeightNorm, norm_layer
from .rope import apply_rope

logger = logging.getLogger(__name__)


def _linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Call a Linear; plain torch.nn layers whose weight dtype differs from x get a cast copy."""
    w = getattr(layer, "weight", None)
    if (isinstance(w, torch.Tensor) and w.dtype != x.dtype and w.device.type != "meta"
            and not getattr(layer, "comfy_cast_weights", False) and type(layer) is nn.Linear):
        b = layer.bias.to(x.dtype) if layer.bias is not None else None
        return F.linear(x, w.to(x.dtype), b)
    return layer(x)


HALF_DTYPES = (torch.bfloat16, torch.float16)


def _autocast_linear(layer: nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A Linear with fp32 weights (text_proj, word_embed) as the official GPU run computes it.

    Its scripts run the model under CUDA autocast, which multiplies these fp32 layers in bf16: input, weight and
    bias rounded to bf16, a bf16 result. Computing them in fp32 and rounding only the result, as an fp32 run
    would, leaves each token a bf16 rounding away from the official one, which the 36 blocks amplify.
    """
    if dtype not in HALF_DTYPES:
        return _linear(layer, x)
    x = x.to(dtype)
    if getattr(layer, "comfy_cast_weights", False):
        return layer(x)  # ComfyUI casts (and moves) the weights to the input's dtype itself
    # plain, ours and ComfyUI's non-casting Linears alike (the latter would multiply fp32 weights with x as they are)
    b = layer.bias.to(dtype) if layer.bias is not None else None
    return F.linear(x, layer.weight.to(dtype), b)


def _round_bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


class RMSNorm(WeightNorm):
    """Weight-only RMS norm computed in fp32, cast back to the input dtype (official FastRMSNorm).

    The weight is moved to the input's device at call time, so offloaded weights work.
    """

    fused = True  # see InfinityStarTransformer.use_fused_norms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.is_cuda and _FUSED_RMS_NORM and self.weight.dtype == x.dtype:
            return fused_rms_norm(x, self.weight_as(x, x.dtype), self.eps)
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight_as(x, torch.float32)).to(x.dtype)


_FUSED_RMS_NORM = hasattr(F, "rms_norm")


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.rms_norm`` in x's dtype: one fused kernel on CUDA in recent torch (statistics in fp32 inside),
    instead of an fp32 copy of x and five passes over it. The official model uses flash-attn's fused
    norm there; on the CPU the composite above keeps the official fp32 arithmetic bit for bit."""
    return F.rms_norm(x, (x.shape[-1],), weight.to(device=x.device, dtype=x.dtype), eps)


@dataclass
class StepContext:
    """What one forward step needs besides its tokens."""

    rope: tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (L, head_dim/2) fp32
    cache: ScaleKVCache | None = None
    store_key: Hashable | None = None  # store this step's K/V under this key
    ref_keys: Sequence[Hashable] = ()  # cached entries to attend to, in order
    attn_backend: str = "sdpa"
    round_qkv_bf16: bool = True
    chunk_tokens: int | None = None  # > 0: run steps longer than this in query/token blocks (exact)
    compile: bool = False  # run the block parts around attention through torch.compile


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig, ops=nn, device=None, dtype=None):
        super().__init__()
        C, D = cfg.width, cfg.head_dim
        self.head_dim = D
        self.q_proj = ops.Linear(C, cfg.num_heads * D, bias=False, device=device, dtype=dtype)
        self.k_proj = ops.Linear(C, cfg.num_kv_heads * D, bias=False, device=device, dtype=dtype)
        self.v_proj = ops.Linear(C, cfg.num_kv_heads * D, bias=False, device=device, dtype=dtype)
        self.o_proj = ops.Linear(cfg.num_heads * D, C, bias=False, device=device, dtype=dtype)
        self.q_norm = norm_layer(ops, RMSNorm)(D, cfg.norm_eps, device=device, dtype=dtype)
        self.k_norm = norm_layer(ops, RMSNorm)(D, cfg.norm_eps, device=device, dtype=dtype)

    def project_q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Normed, rotated queries (B, N, L, D) of normed tokens x (B, L, C)."""
        q = self.q_norm(_linear(self.q_proj, x).view(*x.shape[:2], -1, self.head_dim)).transpose(1, 2)
        return apply_rope(q, cos, sin)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normed, rotated keys and values (B, Nkv, L, D) of normed tokens x (B, L, C)."""
        shape = (*x.shape[:2], -1, self.head_dim)
        k = self.k_norm(_linear(self.k_proj, x).view(shape)).transpose(1, 2)
        v = _linear(self.v_proj, x).view(shape).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    @staticmethod
    def with_context(k: torch.Tensor, v: torch.Tensor, ctx: StepContext, layer: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's K/V if asked and prepend the cached references (and text)."""
        if ctx.cache is not None:
            if ctx.store_key is not None:
                ctx.cache.store(ctx.store_key, layer, k, v)
            if ctx.ref_keys:
                ks, vs = ctx.cache.gather(layer, ctx.ref_keys)  # offloaded entries come from the host
                k, v = concat_to([*ks, k], k.device), concat_to([*vs, v], v.device)
        return k, v

    def output(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StepContext,
               dtype: torch.dtype, round_qkv_bf16: bool | None = None) -> torch.Tensor:
        """Attend q (B, N, l, D) over k, v and project back: (B, l, C)."""
        rnd = ctx.round_qkv_bf16 if round_qkv_bf16 is None else round_qkv_bf16
        o = attend(q, k, v, backend=ctx.attn_backend, round_qkv_bf16=rnd)
        B, _, L, _ = o.shape
        return _linear(self.o_proj, o.transpose(1, 2).reshape(B, L, -1).to(dtype))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, cfg: TransformerConfig, ops=nn, device=None, dtype=None):
        super().__init__()
        self.gate_proj = ops.Linear(cfg.width, cfg.mlp_hidden, bias=False, device=device, dtype=dtype)
        self.up_proj = ops.Linear(cfg.width, cfg.mlp_hidden, bias=False, device=device, dtype=dtype)
        self.down_proj = ops.Linear(cfg.mlp_hidden, cfg.width, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.silu(_linear(self.gate_proj, x), inplace=True)  # in place: two (L, hidden) tensors, not three
        return _linear(self.down_proj, gate.mul_(_linear(self.up_proj, x)))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, ops=nn, device=None, dtype=None):
        super().__init__()
        self.input_layernorm = norm_layer(ops, RMSNorm)(cfg.width, cfg.norm_eps, device=device, dtype=dtype)
        self.attn = Attention(cfg, ops, device=device, dtype=dtype)
        self.post_attention_layernorm = norm_layer(ops, RMSNorm)(cfg.width, cfg.norm_eps, device=device, dtype=dtype)
        self.mlp = MLP(cfg, ops, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, ctx: StepContext, layer: int) -> torch.Tensor:
        n = ctx.chunk_tokens
        if n and x.shape[1] > n:
            return self._forward_chunked(x, ctx, layer, n)
        run = compiled if ctx.compile else _eager
        # 1. self-attention over [references, text, own tokens]
        q, k, v = run(attention_inputs)(self, x, *ctx.rope)
        k, v = self.attn.with_context(k, v, ctx, layer)
        h = x + self.attn.output(q, k, v, ctx, x.dtype)
        # 2. feed-forward, added in place (h is this block's own tensor)
        return h.add_(run(feed_forward)(self, h))

    def _forward_chunked(self, x: torch.Tensor, ctx: StepContext, layer: int, n: int) -> torch.Tensor:
        """The same block over token blocks of n: whole K/V, queries and MLP one block at a time.

        Every token's result depends on all K/V but only on its own query/MLP row, so this equals
        the unchunked forward; only (B, n, ·) intermediates are alive instead of (B, L, ·) ones.
        """
        spans = token_spans(x.shape[1], n)
        cos, sin = ctx.rope
        run = compiled if ctx.compile else _eager
        ks, vs = zip(*(run(attention_keys)(self, x[:, s:e], cos[s:e], sin[s:e]) for s, e in spans))
        k, v = torch.cat(ks, dim=2), torch.cat(vs, dim=2)
        del ks, vs
        k, v = self.attn.with_context(k, v, ctx, layer)
        rounding = ctx.round_qkv_bf16 and x.dtype == torch.float32
        if rounding:  # round the context once, not once per query block (attend would copy it each time)
            k, v = _round_bf16(k), _round_bf16(v)
        h = torch.empty_like(x)
        for i, (s, e) in enumerate(spans):
            q = run(attention_queries)(self, x[:, s:e], cos[s:e], sin[s:e])
            if i == 0:  # GQA K/V repeated to the query heads once per layer, not once per block
                k, v = prepare_kv(q, k, v, ctx.attn_backend)
            q = _round_bf16(q) if rounding else q
            torch.add(x[:, s:e], self.attn.output(q, k, v, ctx, x.dtype, round_qkv_bf16=False), out=h[:, s:e])
        del k, v
        for s, e in spans:  # in place: no copy of each block's result into h
            part = h[:, s:e]
            part.add_(run(feed_forward)(self, part))
        return h


def token_spans(tokens: int, n: int, align: int = 128) -> list[tuple[int, int]]:
    """(start, end) of the fewest token blocks of at most ``n`` tokens, of balanced sizes (multiples of ``align``
    where the last block keeps at least n/2): no small last block.

    Why balanced: a short last block (160 of 20,640 tokens at 480p with blocks of 5,120) is a call shape the
    unchunked official forward never makes. FlashAttention-2 most likely runs so few queries with split K/V (its
    heuristic fills the GPU that way), which sums in another order, and the bf16 rounding differences then spread
    to every token through the next layers' keys (H200: relative logit error 2.4e-2 at that step, 1.1e-6 with
    balanced blocks).
    Balanced blocks hold at least n/2 tokens, in as many blocks as fixed-size ones would take.
    """
    if tokens <= n:
        return [(0, tokens)]
    count = -(-tokens // n)
    size = -(-tokens // count)
    aligned = -(-size // align) * align
    if aligned <= n and tokens - (count - 1) * aligned >= n // 2:  # aligned, and the last block still large
        return [(s, min(s + aligned, tokens)) for s in range(0, tokens, aligned)]
    bounds = [i * tokens // count for i in range(count + 1)]  # sizes differ by at most one token
    return list(zip(bounds[:-1], bounds[1:]))


# The parts of a block around its attention call and K/V cache: plain functions of (block, tokens, ...), so that
# ``compile=True`` runs each through one torch.compile'd function for every block and token count (Inductor fuses
# the norms, RoPE and SwiGLU around the matmuls: fewer passes over the tokens and fewer kernel launches).

def attention_inputs(block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotated queries and keys and the values (B, N, L, D) of tokens x (B, L, C), input norm applied once."""
    normed = block.input_layernorm(x)
    return (block.attn.project_q(normed, cos, sin), *block.attn.project_kv(normed, cos, sin))


def attention_queries(block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return block.attn.project_q(block.input_layernorm(x), cos, sin)


def attention_keys(block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    return block.attn.project_kv(block.input_layernorm(x), cos, sin)


def feed_forward(block: Block, h: torch.Tensor) -> torch.Tensor:
    """Second half of a block without its residual: MLP(RMSNorm(h)). The caller adds it to h in place (the same
    single rounding as h + ..., without a copy of the sum into the token block's rows of h)."""
    return block.mlp(block.post_attention_layernorm(h))


def _eager(fn):
    return fn


def compiled(fn):
    """``fn`` through torch.compile, built on first use, one per function (dynamic token counts).

    Why ``emulate_precision_casts``: by default Inductor drops the bf16 rounding between the ops it fuses (the
    QK-norm's output before RoPE, RoPE's partial products, SiLU's output before the gate product). That is more
    precise, but it is not the official arithmetic: in a bf16 block 37 % of the rotated queries and 55 % of the
    feed-forward outputs differed from the eager path's (CPU, Inductor C++), and the official per-step logits
    drifted 1e-3 from the first step with 2 blocks. Kept roundings leave about 5e-4 of the elements differing, all
    from the RMSNorm's mean of squares, which Inductor sums in another order (with that mean left eager the parts
    were bit-exact on the CPU; keeping it eager costs a materialised fp32 copy of every normed tensor).
    """
    if fn not in _COMPILED:
        _COMPILED[fn] = _or_eager(fn, torch.compile(fn, dynamic=True, options=_compile_options()))
    return _COMPILED[fn]


def _or_eager(fn, built):
    """``built`` (fn compiled), or ``fn`` itself from the first call whose compilation fails: an Inductor or Dynamo
    bug of the installed torch (torch 2.9's C++ backend cannot build the bf16 parts with kept roundings, say) costs
    the speed-up, with a warning, not the run. A compilation fails before anything runs, so the call is made again
    eagerly; other errors (out of memory, a wrong shape) are raised as they are."""
    current = [built]

    def run(*args, **kwargs):
        try:
            return current[0](*args, **kwargs)
        except Exception as exc:
            if current[0] is fn or not type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise
            reason = (str(exc).strip().splitlines() or [""])[0][:300]
            logger.warning("torch.compile of %s failed in this torch %s (%s: %s); it runs uncompiled from here on",
                           fn.__name__, torch.__version__, type(exc).__name__, reason)
            current[0] = fn
            return fn(*args, **kwargs)

    run.compiled = lambda: current[0] is not fn  # False once it fell back
    return run


@functools.cache  # one warning, not one per compiled part
def _compile_options() -> dict | None:
    from torch._inductor import config as inductor_config

    if hasattr(inductor_config, "emulate_precision_casts"):  # torch >= 2.5
        return {"emulate_precision_casts": True}
    logger.warning("this torch's Inductor cannot keep bf16 roundings between fused ops (emulate_precision_casts, "
                   "torch >= 2.5): compiled blocks round less often than the official code")
    return None


_COMPILED: dict = {}


def compile_unavailable(device: torch.device | str) -> str | None:
    """Why torch.compile cannot build the block parts for ``device`` here, or None when it can: Inductor
    generates Triton kernels on a GPU and C++ on the CPU, and fails at the first call without them."""
    device = torch.device(device)
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile on a GPU needs Triton (pip install triton; on Windows pip install triton-windows)"
    if device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device) < (7, 0):
        return "torch.compile's Triton kernels need an NVIDIA GPU of compute capability 7.0 or newer (not GTX 10xx)"
    if device.type == "mps":
        return "torch.compile of the blocks is not supported on Apple's MPS here"
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++", "cl")):
        return "torch.compile on the CPU needs a C++ compiler (g++, clang++ or MSVC's cl) on PATH"
    return None


class BlockChunk(nn.Module):
    """Only here to give the official key layout ``block_chunks.{c}.module.{j}``."""

    def __init__(self, blocks: list[Block]):
        super().__init__()
        self.module = nn.ModuleList(blocks)


class InfinityStarTransformer(nn.Module):
    """The AR transformer; one call of :meth:`forward_blocks` is one step (text or visual)."""

    fp32_modules = FP32_MODULES

    def __init__(self, config: TransformerConfig, ops=nn, device=None, dtype=None):
        super().__init__()
        cfg = self.config = config
        kw = dict(device=device, dtype=dtype)
        self.cfg_uncond = nn.Parameter(torch.empty(cfg.text_maxlen, cfg.text_channels, **kw))  # learned null text
        self.sos_token = nn.Parameter(torch.empty(1, 1, cfg.width, **kw))  # in the checkpoint, unused
        self.text_proj = ops.Linear(cfg.text_channels, cfg.width, bias=True, **kw)
        self.word_embed = ops.Linear(cfg.codebook_dim, cfg.width, bias=True, **kw)
        self.norm_hidden_sates = norm_layer(ops, RMSNorm)(cfg.width, cfg.norm_eps, **kw)  # (sic) official key name
        self.head = ops.Linear(cfg.width, 2 * cfg.detail_dim, bias=True, **kw)
        self.semantic_head2 = ops.Linear(cfg.width, 2 * cfg.semantic_dim, bias=True, **kw)
        per = cfg.blocks_per_chunk
        if cfg.block_chunks == 1:  # the official layout for one chunk: blocks.{i} (set past the property below)
            self._modules["blocks"] = nn.ModuleList(Block(cfg, ops, **kw) for _ in range(per))
        else:
            self.block_chunks = nn.ModuleList(
                BlockChunk([Block(cfg, ops, **kw) for _ in range(per)]) for _ in range(cfg.block_chunks))
        if self.cfg_uncond.device.type != "meta":
            with torch.no_grad():
                nn.init.trunc_normal_(self.cfg_uncond, std=1.2)
                self.cfg_uncond.div_(cfg.text_channels ** 0.5)
                nn.init.normal_(self.sos_token, std=0.02)

    @property
    def block_stack(self) -> nn.ModuleList:
        """The module that holds every block: ``block_chunks``, or ``blocks`` with one chunk."""
        return self._modules["block_chunks" if "block_chunks" in self._modules else "blocks"]

    @property
    def blocks(self) -> Sequence[Block]:
        """Every block in order; with one chunk the ``blocks`` module itself (so ``get_submodule`` finds it)."""
        if "blocks" in self._modules:
            return self._modules["blocks"]
        return [b for chunk in self.block_chunks for b in chunk.module]

    def use_fused_norms(self, fused: bool = True) -> InfinityStarTransformer:
        """On CUDA, half-precision norms run PyTorch's fused ``F.rms_norm`` (default: one kernel, no fp32 copy of
        the tokens) or, with ``fused=False``, the official composite (fp32 statistics, x * rsqrt(mean) * w), which
        the official code runs without flash-attn's fused norm. The two differ in the last bf16 bit of a few
        elements in a million; the CPU always runs the composite."""
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.fused = fused
        return self

    def block_dtype(self) -> torch.dtype:
        return self.blocks[0].attn.q_proj.weight.dtype

    def apply_precision_layout(self, block_dtype: torch.dtype = torch.bfloat16) -> InfinityStarTransformer:
        """Official layout: blocks in ``block_dtype``, FP32_MODULES in fp32 (spec §2.2)."""
        self.block_stack.to(block_dtype)
        for name in self.fp32_modules:
            module = getattr(self, name)
            if isinstance(module, nn.Parameter):
                module.data = module.data.float()
            else:
                module.float()
        return self

    # ---- embeddings ----
    def text_prefix(self, cond: torch.Tensor, uncond: torch.Tensor | None = None,
                    dtype: torch.dtype | None = None, guided: bool = True) -> torch.Tensor:
        """Prefix tokens (2, L, C): [conditional, unconditional], fp32, or ``dtype`` when that is half precision.

        cond: (L, C_text) compacted T5 features. uncond: (L_neg, C_text) negative-prompt features
        with L_neg <= L, projected then zero-padded to L (spec §4); None -> ``cfg_uncond[:L]``.
        ``dtype`` bf16/fp16: the projection runs as under the official scripts' autocast (see :func:`_autocast_linear`).
        ``guided`` False: (1, L, C), the conditional branch alone (guidance 1 at every scale; ``uncond`` unused).
        """
        L = cond.shape[0]
        dev = self.text_proj.weight.device if self.text_proj.weight.device.type != "meta" else cond.device
        cond = cond.to(dev, torch.float32)
        if not guided:
            return _autocast_linear(self.text_proj, cond, dtype)[None]
        if uncond is None:
            uncond = self.cfg_uncond[:L].to(dev, torch.float32)
        elif uncond.shape[0] > L:
            raise ValueError(f"negative prompt has {uncond.shape[0]} tokens, more than the prompt's {L}; "
                             "the official model pads the negative prompt to the prompt length and cannot truncate")
        uncond = uncond.to(dev, torch.float32)
        proj = _autocast_linear(self.text_proj, torch.cat([cond, uncond], dim=0), dtype)
        prefix = proj.new_zeros(2, L, proj.shape[-1])
        prefix[0] = proj[:L]
        prefix[1, : uncond.shape[0]] = proj[L:]
        return prefix

    def embed_codes(self, codes: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Codes (B, 64, t, h, w) -> tokens (B, t*h*w, C), row-major over (t, h, w); fp32, or ``dtype`` when
        that is half precision (as under autocast, see :func:`_autocast_linear`)."""
        x = codes.flatten(2).transpose(1, 2).to(torch.float32)  # [B, thw, 64]
        return _autocast_linear(self.word_embed, x, dtype)

    # ---- one step ----
    def forward_blocks(self, x: torch.Tensor | list[torch.Tensor], ctx: StepContext,
                       compute_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Run every block over tokens x (B, L, C); returns the hidden states in the compute dtype.

        ``x`` may come as a one-element list the caller keeps no other reference to: it is emptied here, so
        the input is freed once the first block has run (0.6 GB in bf16 at the largest 720p step).
        """
        if isinstance(x, list):
            x = x.pop()
        x = x.to(compute_dtype or self.block_dtype())
        if ctx.compile:  # the compiled block parts are built for dense tokens (a step's CFG pair comes expanded)
            x = x.contiguous()
        for i, block in enumerate(self.blocks):
            x = block(x, ctx, i)
        return x

    def head_logits(self, hidden: torch.Tensor, semantic: bool, chunk_tokens: int | None = None) -> torch.Tensor:
        """Final norm then the semantic (2*16) or detail (2*64) head, in fp32: (B, L, 2d).

        ``chunk_tokens``: run over token blocks so the fp32 copy of the hidden states is never whole.
        """
        head = self.semantic_head2 if semantic else self.head
        L = hidden.shape[1]
        if not chunk_tokens or L <= chunk_tokens:
            return _linear(head, self.norm_hidden_sates(hidden).float())
        return torch.cat([_linear(head, self.norm_hidden_sates(hidden[:, s:e]).float())
                          for s, e in token_spans(L, chunk_tokens)], dim=1)


def load_transformer_state_dict(model: InfinityStarTransformer, state_dict: Mapping[str, torch.Tensor],
                                assign: bool = False) -> None:
    """Strictly load an official-layout state dict; raise ValueError listing key/shape problems.

    ``cfg_uncond`` with another row count is truncated or extended like the official loader does.
    """
    own = model.state_dict()
    sd = dict(state_dict)
    if "cfg_uncond" in sd and "cfg_uncond" in own and sd["cfg_uncond"].shape != own["cfg_uncond"].shape:
        old, new = sd["cfg_uncond"], own["cfg_uncond"]
        if old.shape[1:] == new.shape[1:]:
            n = min(old.shape[0], new.shape[0])
            rest = new[n:].to(old.dtype) if new.device.type != "meta" else old.new_zeros(new.shape[0] - n, *new.shape[1:])
            sd["cfg_uncond"] = torch.cat([old[:n], rest.to(old.device)]) if n < new.shape[0] else old[:n]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mis = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
           for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mis:
        def few(xs):
            return ", ".join(xs[:5]) + (f" … (+{len(xs) - 5})" if len(xs) > 5 else "")
        looks = f"{len(sd)} tensors, e.g. {few(list(sd))}"
        raise ValueError(
            f"transformer state dict does not match the InfinityStar layout ({model.config}). "
            + (f"missing {len(missing)}: {few(missing)}. " if missing else "")
            + (f"unexpected {len(unexpected)}: {few(unexpected)}. " if unexpected else "")
            + (f"mis-shaped {len(mis)}: {few(mis)}. " if mis else "")
            + f"The file has {looks}.")
    model.load_state_dict(sd, strict=True, assign=assign)
