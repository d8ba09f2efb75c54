"""Tiny random-weight checkpoints in the official file layout (spec §7), for tests, demos and CI.

``write_tiny_models(outdir)`` writes, deterministically for a seed:

- ``infinitystar_8b_720p_weights/`` and ``infinitystar_8b_480p_weights/``: the tiny transformer as sharded
  fp32 safetensors with ``model.safetensors.index.json``, official key names;
- ``infinitystar_videovae.pth``: ``{"vae": state_dict}`` of the tiny video tokenizer;
- ``text_encoder/flan-t5-xl-official/``: a tiny ``T5EncoderModel`` (d_model = the tiny transformer's
  text channels) with a small sentencepiece tokenizer trained on the spot, loadable offline.

The loaders recognise these files from their shapes, so the CLI and the nodes run on them unchanged.
Run ``python -m infinitystar.tiny OUTDIR [--seed N]``.
"""
from __future__ import annotations

import io
import logging
import random
import string
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

TRANSFORMER_DIRS = {"720p": "infinitystar_8b_720p_weights", "480p": "infinitystar_8b_480p_weights"}
VAE_FILE = "infinitystar_videovae.pth"
TEXT_ENCODER_DIR = "text_encoder/flan-t5-xl-official"
SHARDS = 2

_WORDS = ("a the of and in on with under over through near red green blue yellow white black bright dark "
          "cat dog fox bird horse tree river city street night day sun snow rain car ocean mountain forest "
          "running walking flying glass vase tulip flower close-up big objects emphasize scale detail camera "
          "slowly moving light shadow cinematic realistic").split()


def train_sentencepiece(seed: int = 0, vocab_size: int = 256) -> bytes:
    """A small unigram sentencepiece model (pad 0, eos 1, unk 2, like T5's), deterministic for a seed."""
    import sentencepiece as spm

    rng = random.Random(seed)
    corpus = [" ".join(string.printable[:95])] * 3  # every printable ASCII character gets a piece
    corpus += [" ".join(rng.choice(_WORDS) for _ in range(8)) for _ in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2,
        hard_vocab_limit=False, shuffle_input_sentence=False)
    return buf.getvalue()


def write_tiny_text_encoder(folder: str | Path, d_model: int = 32, seed: int = 0) -> Path:
    """Write a tiny T5 encoder + tokenizer folder that ``TextEncoder.from_folder`` loads offline."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(train_sentencepiece(seed))
    tokenizer = T5Tokenizer.from_pretrained(str(folder), extra_ids=0, legacy=True, local_files_only=True)
    tokenizer.save_pretrained(str(folder))
    config = T5Config(vocab_size=len(tokenizer) + 8, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                      num_heads=max(1, d_model // 8), feed_forward_proj="gated-gelu", dropout_rate=0.0,
                      is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config).eval()
    model.save_pretrained(str(folder))
    return folder
