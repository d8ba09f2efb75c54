"""Transformer configuration of the official ``infinity_qwen8b`` model (spec §2.1), presets and
detection from checkpoint tensor shapes; plus the precision layout (spec §2.2), declared once."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

# Modules kept in fp32 whatever the blocks run in (upstream casts only the blocks to bf16).
FP32_MODULES = ("word_embed", "text_proj", "head", "semantic_head2", "norm_hidden_sates", "cfg_uncond", "sos_token")


@dataclass(frozen=True)
class TransformerConfig:
    depth: int = 36  # number of Qwen-style blocks
    block_chunks: int = 6  # blocks are grouped as block_chunks.{c}.module.{j} in the state dict (one: blocks.{i})
    width: int = 4096  # residual width C
    num_heads: int = 32  # query heads
    num_kv_heads: int = 8  # key/value heads (GQA)
    mlp_hidden: int = 16384  # SwiGLU intermediate size
    text_channels: int = 2048  # T5 feature size (flan-t5-xl)
    text_maxlen: int = 512  # rows of cfg_uncond; also the RoPE scale-axis offset of visual steps
    codebook_dim: int = 64  # channels of the accumulated codes fed to word_embed
    semantic_dim: int = 16  # bits of the semantic head
    detail_dim: int = 64  # bits of the detail head
    norm_eps: float = 1e-6
    rope_base: float = 10000.0

    def __post_init__(self):
        if self.depth % self.block_chunks:
            raise ValueError(f"depth {self.depth} is not a multiple of block_chunks {self.block_chunks}")
        if self.width % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"width {self.width}, heads {self.num_heads}, kv heads {self.num_kv_heads} do not divide")
        if self.head_dim % 8:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 8 (4 RoPE axes of pairs)")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def blocks_per_chunk(self) -> int:
        return self.depth // self.block_chunks

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads


_8B = TransformerConfig()
TRANSFORMER_PRESETS: dict[str, TransformerConfig] = {
    "8b": _8B,
    "8b-720p": _8B,  # the released 720p and 480p models share one architecture
    "8b-480p": _8B,
    "tiny": TransformerConfig(depth=2, block_chunks=2, width=64, num_heads=2, num_kv_heads=1, mlp_hidden=256,
                              text_channels=32),
}

_BLOCK_KEY = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.")
_ONE_CHUNK_KEY = re.compile(r"^blocks\.(\d+)\.")  # the official model names its blocks so when block_chunks is 1


def is_block_key(key: str) -> bool:
    """Whether ``key`` is a transformer block's, in either official layout (``block_chunks.{c}.module.{j}.`` or,
    with one chunk, ``blocks.{i}.``)."""
    return bool(_BLOCK_KEY.match(key) or _ONE_CHUNK_KEY.match(key))


def detect_transformer_config(shapes: Mapping[str, tuple]) -> TransformerConfig:
    """Read the architecture from state-dict key -> shape (tensors or shapes both work)."""
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()}
    need = ("word_embed.weight", "text_proj.weight", "head.weight", "semantic_head2.weight", "cfg_uncond")
    missing = [k for k in need if k not in shapes]
    chunks = {m.group(1, 2) for k in shapes if (m := _BLOCK_KEY.match(k))}
    single = {m.group(1) for k in shapes if (m := _ONE_CHUNK_KEY.match(k))}
    if missing or not (chunks or single):
        raise ValueError(f"not an InfinityStar transformer state dict: missing {missing or ['block_chunks.*']}; "
                         f"first keys: {list(shapes)[:5]}")
    if chunks:
        num_chunks = 1 + max(int(c) for c, _ in chunks)
        per_chunk = 1 + max(int(j) for _, j in chunks)
        p = "block_chunks.0.module.0."
    else:
        num_chunks, per_chunk, p = 1, 1 + max(int(i) for i in single), "blocks.0."
    head_dim = shapes[p + "attn.q_norm.weight"][0]
    width, codebook_dim = shapes["word_embed.weight"]
    return TransformerConfig(
        depth=num_chunks * per_chunk, block_chunks=num_chunks, width=width,
        num_heads=shapes[p + "attn.q_proj.weight"][0] // head_dim,
        num_kv_heads=shapes[p + "attn.k_proj.weight"][0] // head_dim,
        mlp_hidden=shapes[p + "mlp.gate_proj.weight"][0],
        text_channels=shapes["text_proj.weight"][1],  # text_maxlen stays 512: a RoPE constant
        codebook_dim=codebook_dim, semantic_dim=shapes["semantic_head2.weight"][0] // 2,
        detail_dim=shapes["head.weight"][0] // 2)


def is_released_size(config: TransformerConfig) -> bool:
    """The released 8B model's shapes (the 720p, 480p and interact weights all have them, hence the name checks)."""
    return config == TRANSFORMER_PRESETS["8b"]


def with_overrides(config: TransformerConfig, **kwargs) -> TransformerConfig:
    return replace(config, **kwargs)
