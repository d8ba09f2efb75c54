"""Tiny random-weight checkpoints in the official file layout (spec §7), for tests, demos and CI.

``write_tiny_models(outdir)`` writes, deterministically for a seed:

- ``infinitystar_8b_720p_weights/`` and ``infinitystar_8b_480p_weights/``: the tiny transformer as sharded
  fp32 safetensors with ``model.safetensors.index.json``, official key names;
- ``infinitystar_videovae.pth``: ``{"vae": state_dict}`` of a slim tiny video tokenizer (``tiny_set_vae_config``);
- ``text_encoder/flan-t5-xl-official/``: a tiny ``T5EncoderModel`` (d_model = the tiny transformer's
  text channels) with a small sentencepiece tokenizer trained on the spot, loadable offline.

The loaders recognise these files from their shapes, so the CLI and the nodes run on them unchanged.
Run ``python -m infinitystar.tiny OUTDIR [--seed N]``.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import random
import string
import sys
from pathlib import Path

import torch

from .download import TEXT_ENCODER_DIR, TRANSFORMER_DIRS, VAE_FILE

logger = logging.getLogger(__name__)

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


def _init_like_official(model: torch.nn.Module) -> None:
    """Linear weights N(0, 0.02) and zero biases, as the official ``special_init``."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)


def tiny_transformer_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """fp32 state dict of the tiny transformer preset with official key names."""
    from .checkpoint import initial_cfg_uncond
    from .config import TRANSFORMER_PRESETS
    from .transformer import InfinityStarTransformer

    config = TRANSFORMER_PRESETS["tiny"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InfinityStarTransformer(config)
        _init_like_official(model)
        torch.nn.init.normal_(model.sos_token, std=0.02)
    with torch.no_grad():
        model.cfg_uncond.copy_(initial_cfg_uncond(config.text_maxlen, config.text_channels))
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def tiny_set_vae_config():
    """The tokenizer of the tiny set: the "tiny" preset slimmed to 4 channels and 1 resnet per block.

    CPU conv3d is slow at full frame size (81 x 192 x 336 pixels), and decode dominates a tiny run;
    this keeps the end-to-end CLI tests at seconds. The key layout is the official one all the same.
    """
    from dataclasses import replace

    from .vae import VAE_PRESETS

    return replace(VAE_PRESETS["tiny"], block_out_channels=(4,) * 5, layers_per_block=1)


def tiny_tokenizer_state_dict(seed: int = 0, config=None) -> dict[str, torch.Tensor]:
    """State dict of a tiny video tokenizer (default: the "tiny" preset) with official key names."""
    from .vae import VAE_PRESETS, VideoTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VideoTokenizer(config or VAE_PRESETS["tiny"])
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def write_sharded_safetensors(folder: str | Path, state_dict: dict[str, torch.Tensor], shards: int = SHARDS,
                              metadata: dict | None = None) -> Path:
    """Write ``model-0000k-of-0000n.safetensors`` shards plus ``model.safetensors.index.json`` (HF layout)."""
    from safetensors.torch import save_file

    from .video_io import written_whole

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state_dict)
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    groups: list[list[str]] = [[] for _ in range(shards)]
    running = 0
    for key in keys:  # contiguous split by cumulative bytes, like HF's shard writer
        groups[min(shards - 1, running * shards // max(total, 1))].append(key)
        running += state_dict[key].numel() * state_dict[key].element_size()
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        with written_whole(folder / name) as part:  # safetensors alone would leave it 0600
            save_file({k: state_dict[k] for k in group}, str(part), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
    index = {"metadata": {"total_size": total, **(metadata or {})}, "weight_map": weight_map}
    with written_whole(folder / "model.safetensors.index.json") as part:  # last: the folder is whole once it is there
        part.write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder


def write_tiny_models(outdir: str | Path, seed: int = 0, overwrite: bool = False) -> dict[str, Path]:
    """Write the whole tiny model set in the official layout; returns the paths by component.

    The names are the official files', so a folder that holds any of them (a real download) is refused unless
    ``overwrite``: random weights would replace the real ones."""
    from .config import TRANSFORMER_PRESETS
    from .video_io import written_whole

    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise ValueError(f"{outdir} is a file; give a folder for the tiny model set")
    taken = [name for name in (*TRANSFORMER_DIRS.values(), VAE_FILE, TEXT_ENCODER_DIR) if (outdir / name).exists()]
    if taken and not overwrite:
        raise ValueError(f"{outdir} already holds {', '.join(taken)}; the tiny random weights would replace them. "
                         "Choose an empty folder (or pass --force to replace them)")
    outdir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"root": outdir}
    for offset, (variant, name) in enumerate(TRANSFORMER_DIRS.items()):
        paths[f"transformer_{variant}"] = write_sharded_safetensors(
            outdir / name, tiny_transformer_state_dict(seed + offset))
    paths["vae"] = outdir / VAE_FILE
    with written_whole(paths["vae"]) as part:
        torch.save({"vae": tiny_tokenizer_state_dict(seed, tiny_set_vae_config())}, part)
    paths["text_encoder"] = write_tiny_text_encoder(
        outdir / TEXT_ENCODER_DIR, d_model=TRANSFORMER_PRESETS["tiny"].text_channels, seed=seed)
    logger.info("tiny models written to %s", outdir)
    return paths


def main(argv: list[str] | None = None) -> int:
    from .cli import tolerant_output

    tolerant_output()
    parser = argparse.ArgumentParser(prog="python -m infinitystar.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", help="folder to write the tiny model set into")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--force", action="store_true", help="replace model files the folder already holds")
    args = parser.parse_args(argv)
    try:
        written = write_tiny_models(args.outdir, seed=args.seed, overwrite=args.force)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for component, path in written.items():
        print(f"{component:18s} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
