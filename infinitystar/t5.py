"""The flan-t5 text encoder, built from the injectable ``ops`` and loaded from a Hugging Face T5 folder (spec §4).

Why not ``transformers.T5EncoderModel``, which the official scripts run: its layers are plain ``torch.nn``, so a host
can neither cast, offload nor partially load them (ComfyUI would have to hold all 2.4 GB on the GPU at once). This is
the same arithmetic, op for op, under the same autocast: an RMS norm with fp32 statistics cast back to the weight's
half dtype, unscaled attention plus one bucketed relative-position bias computed by the first layer and shared by all,
a gated-GELU feed-forward whose output projection stays fp32 when the rest is half (as Hugging Face keeps ``wo``), and
fp16 activations clamped below infinity. The modules are named as in the published files (``encoder.block.N.layer...``),
so the checkpoint loads without renaming; decoder and LM-head tensors of full encoder-decoder folders are skipped.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attend
from .checkpoint_files import INDEX_FILES
from .ops import WeightNorm, norm_layer

logger = logging.getLogger(__name__)

def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """flan-t5's GELU, the tanh approximation written out as Hugging Face computes it: the fused
    ``F.gelu(approximate="tanh")`` rounds differently in half precision, and under CUDA's bf16 autocast ``pow`` runs
    in fp32, so this keeps an fp32 result where the fused kernel would round to bf16 (1e-2 apart at the features)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": gelu_new,
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}
FP32_KEPT = ("wo",)  # kept in fp32 when the rest is half: T5's feed-forward output overflows fp16


@dataclass(frozen=True)
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_heads: int
    num_layers: int
    eps: float = 1e-6
    buckets: int = 32
    max_distance: int = 128
    gated: bool = True
    activation: str = "gelu_new"

    @classmethod
    def from_folder(cls, folder: str | Path) -> T5Config:
        """Read ``config.json`` as Hugging Face does: ``feed_forward_proj`` 'gated-gelu' means gated ``gelu_new``."""
        path = Path(folder) / "config.json"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            proj = str(raw.get("feed_forward_proj", "relu"))
            gated, act = proj.startswith("gated-"), proj.rpartition("-")[2]
            act = "gelu_new" if proj == "gated-gelu" else act
            config = cls(vocab_size=int(raw["vocab_size"]), d_model=int(raw["d_model"]), d_kv=int(raw["d_kv"]),
                         d_ff=int(raw["d_ff"]), num_heads=int(raw["num_heads"]), num_layers=int(raw["num_layers"]),
                         eps=float(raw.get("layer_norm_epsilon", 1e-6)),
                         buckets=int(raw.get("relative_attention_num_buckets", 32)),
                         max_distance=int(raw.get("relative_attention_max_distance", 128)), gated=gated, activation=act)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: not a T5 config ({type(exc).__name__}: {exc})") from exc
        if raw.get("model_type", "t5") != "t5":
            raise ValueError(f"{path}: a {raw.get('model_type')!r} model, not T5")
        if act not in ACTIVATIONS:
            raise ValueError(f"{path}: feed_forward_proj {proj!r} is not supported (T5 uses relu or gated-gelu)")
        if min(config.vocab_size, config.d_model, config.d_kv, config.d_ff, config.num_heads, config.num_layers) < 1:
            raise ValueError(f"{path}: sizes must be positive ({config})")
        return config


def relative_position_bucket(relative: torch.Tensor, buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bidirectional buckets for ``key - query`` offsets: half the buckets per direction, exact up to a quarter
    of them, then logarithmic up to ``max_distance``, beyond which all offsets share the last bucket."""
    half = buckets // 2
    bucket = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    far = exact + (torch.log(distance.clamp_min(1).float() / exact) / math.log(max_distance / exact)
                   * (half - exact)).long()
    return bucket + torch.where(distance < exact, distance, far.clamp_max(half - 1))


class T5LayerNorm(WeightNorm):
    """Scale-only RMS norm: statistics in fp32, the normalized input cast to the weight's dtype when that is half."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        dtype = self.weight.dtype
        if dtype in (torch.float16, torch.bfloat16):
            x = x.to(dtype)
        return self.weight_as(x, dtype) * x


class SelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, ops, relative_bias: bool, device=None, dtype=None):
        super().__init__()
        inner, kw = cfg.num_heads * cfg.d_kv, dict(bias=False, device=device, dtype=dtype)
        self.cfg = cfg
        self.q, self.k, self.v = (ops.Linear(cfg.d_model, inner, **kw) for _ in range(3))
        self.o = ops.Linear(inner, cfg.d_model, **kw)
        if relative_bias:
            self.relative_attention_bias = ops.Embedding(cfg.buckets, cfg.num_heads, device=device, dtype=dtype)

    def position_bias(self, length: int, device: torch.device) -> torch.Tensor:
        """(1, heads, L, L) bias of each key offset, from the first layer's table."""
        positions = torch.arange(length, device=device)
        buckets = relative_position_bucket(positions[None, :] - positions[:, None], self.cfg.buckets,
                                           self.cfg.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[:2]
        q, k, v = (proj(x).view(b, n, -1, self.cfg.d_kv).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = attend(q, k, v, bias=bias, scale=1.0)  # T5 folds 1/sqrt(d) into its weights
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: T5Config, ops, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        if cfg.gated:
            self.wi_0 = ops.Linear(cfg.d_model, cfg.d_ff, **kw)
            self.wi_1 = ops.Linear(cfg.d_model, cfg.d_ff, **kw)
        else:
            self.wi = ops.Linear(cfg.d_model, cfg.d_ff, **kw)
        self.wo = ops.Linear(cfg.d_ff, cfg.d_model, **kw)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if hasattr(self, "wi_0") else self.act(self.wi(x))
        stored = self.wo.weight.dtype
        if stored.is_floating_point and stored.itemsize >= 2 and h.dtype != stored:
            h = h.to(stored)  # the fp32 output projection takes fp32 input (as Hugging Face's)
        return self.wo(h)


class AttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config, ops, relative_bias: bool, device=None, dtype=None):
        super().__init__()
        self.SelfAttention = SelfAttention(cfg, ops, relative_bias, device=device, dtype=dtype)
        self.layer_norm = norm_layer(ops, T5LayerNorm)(cfg.d_model, cfg.eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class FeedForwardLayer(nn.Module):
    def __init__(self, cfg: T5Config, ops, device=None, dtype=None):
        super().__init__()
        self.DenseReluDense = FeedForward(cfg, ops, device=device, dtype=dtype)
        self.layer_norm = norm_layer(ops, T5LayerNorm)(cfg.d_model, cfg.eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """fp16 activations kept finite (Hugging Face's T5 guard): clamped to the largest fp16 value, or 1000 below it
    when one overflowed (no sync: the limit is a tensor); other dtypes as they are."""
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), top - 1000, top).to(x.dtype)
    return x.clamp(-limit, limit)


class Block(nn.Module):
    def __init__(self, cfg: T5Config, ops, first: bool, device=None, dtype=None):
        super().__init__()
        self.layer = nn.ModuleList([AttentionLayer(cfg, ops, first, device=device, dtype=dtype),
                                    FeedForwardLayer(cfg, ops, device=device, dtype=dtype)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = _clamp_fp16(self.layer[0](x, bias))
        return _clamp_fp16(self.layer[1](x))


class Stack(nn.Module):
    def __init__(self, cfg: T5Config, ops, device=None, dtype=None):
        super().__init__()
        self.block = nn.ModuleList([Block(cfg, ops, i == 0, device=device, dtype=dtype)
                                    for i in range(cfg.num_layers)])
        self.final_layer_norm = norm_layer(ops, T5LayerNorm)(cfg.d_model, cfg.eps, device=device, dtype=dtype)


class T5Encoder(nn.Module):
    """flan-t5's encoder: token ids (B, L) -> features (B, L, d_model)."""

    def __init__(self, cfg: T5Config, ops=nn, device=None, dtype=None):
        super().__init__()
        self.config = cfg
        self.shared = ops.Embedding(cfg.vocab_size, cfg.d_model, device=device, dtype=dtype)
        self.encoder = Stack(cfg, ops, device=device, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.shared(input_ids)
        first = self.encoder.block[0].layer[0].SelfAttention
        bias = first.position_bias(input_ids.shape[1], input_ids.device)
        if attention_mask is not None:  # padded keys get the dtype's lowest value, as Hugging Face's extended mask
            blocked = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
            bias = bias + blocked
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


def state_dict_key(key: str) -> str | None:
    """The encoder's name for a key of a Hugging Face T5 file, None for what it does not use (decoder, LM head)."""
    if key == "encoder.embed_tokens.weight":
        return "shared.weight"
    return key if key == "shared.weight" or key.startswith("encoder.") else None


def storage(dtype: torch.dtype):
    """``target(key, tensor) -> dtype`` of the encoder's tensors for storage ``dtype``: ``wo`` stays fp32 under half
    storage, as Hugging Face keeps it (``_keep_in_fp32_modules``)."""
    half = dtype in (torch.float16, torch.bfloat16)

    def target(key: str, tensor: torch.Tensor) -> torch.dtype:
        return torch.float32 if half and key.rsplit(".", 2)[-2] in FP32_KEPT else dtype
    return target


def weight_files(folder: Path) -> Path:
    """What :class:`~infinitystar.checkpoint_files.CheckpointReader` should read: the folder (an index or
    ``*.safetensors``), or its ``pytorch_model.bin`` when it has no safetensors. ``.bin`` files, one or sharded
    under ``pytorch_model.bin.index.json``, are read weights-only."""
    if any(folder.glob("*.safetensors")) or any((folder / name).is_file() for name in INDEX_FILES):
        return folder
    legacy = folder / "pytorch_model.bin"
    if legacy.is_file():
        return legacy
    raise FileNotFoundError(f"{folder} holds no T5 weights (model.safetensors or its shards, pytorch_model.bin or "
                            "its shards)")


def checked_t5(folder: str | Path, ops=nn, dtype: torch.dtype | None = None):
    """(encoder on the meta device, reader of the folder's weights), the encoder tensors' keys and shapes checked
    against ``config.json`` before any is read."""
    from .checkpoint import check_keys
    from .checkpoint_files import CheckpointReader

    folder = Path(folder)
    cfg = T5Config.from_folder(folder)
    reader = CheckpointReader(weight_files(folder))
    with torch.device("meta"):
        model = T5Encoder(cfg, ops=ops, dtype=dtype)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {}
    for key, shape in reader.shapes.items():
        name = state_dict_key(key)
        if name is not None and name not in found:
            found[name] = shape
    check_keys(expected, found, folder, f"T5 encoder of {folder / 'config.json'}",
               f"{len(found)} encoder tensors of another model")
    return model, reader


def load_t5_encoder(folder: str | Path, *, dtype: torch.dtype = torch.float16, ops=nn, device="cpu",
                    callback=None) -> T5Encoder:
    """Build the encoder on the meta device and fill it tensor by tensor from the folder's files, each cast to
    ``dtype`` (``wo`` kept fp32 when ``dtype`` is half); keys and shapes are checked against the config first.
    ``callback(done_bytes, total_bytes)`` as :func:`~infinitystar.checkpoint.stream_into` calls it."""
    from .checkpoint import drop_tensors, stream_into

    model, reader = checked_t5(folder, ops, dtype)
    try:
        stream_into(model, reader, storage(dtype), device, rename=state_dict_key, callback=callback)
    except BaseException:  # a cancel included: the traceback keeps this frame, and so the model, alive
        drop_tensors(model)
        raise
    return model.eval().requires_grad_(False)
