"""Text conditioning of the official model (spec §4): prompt decoration and flan-t5 encoding.

The prompt gets the duration tag and the closing phrase both official scripts append, is tokenized
to 512 tokens (padding ``max_length``, truncation) and run through the T5 encoder; the features are
compacted to the true length L (including ``</s>``). An empty negative prompt means "use the model's
learned null text" (``cfg_uncond[:L]``), signalled by ``uncond=None``; a non-empty one is encoded the
same way (undecorated, as upstream) and must not be longer than the positive prompt.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

TEXT_MAXLEN = 512
TOKENIZER_FILES = ("spiece.model", "tokenizer.json")  # either holds the vocabulary
TEXT_ENCODER_HINT = ("Expected the hub folder text_encoder/flan-t5-xl-official/ as published; get it with "
                     "`python -m infinitystar download --components text_encoder --dest DIR` or the Download Models "
                     "node (components text_encoder)")
CLOSING_PHRASE = ", Close-up on big objects, emphasize scale and detail"


def decorate_prompt(prompt: str, duration_s: int | None, enabled: bool = True, closing: bool = True) -> str:
    """Apply the official decoration: ``<<<t={d}s>>>`` + prompt + closing phrase.

    Images (``duration_s`` 0 or None) get the closing phrase only: there is no official T2I script,
    and the golden T2I case was made this way. Without the duration tag videos degrade badly
    (upstream issue #29), so ``enabled=False`` is for experiments only. ``closing=False`` is the interact
    script's decoration: the tag and the stripped prompt, no closing phrase.
    """
    if not enabled:
        return prompt
    text = f"{prompt}{CLOSING_PHRASE}" if closing else prompt.strip()
    if duration_s:
        text = f"<<<t={int(duration_s)}s>>>{text}"
    return text


def duration_from_frames(frames: int) -> int | None:
    """Seconds tag for a pixel-frame count at 16 fps: 1 -> None (image), 81 -> 5, 161 -> 10."""
    if frames <= 1:
        return None
    return (frames - 1) // 16


def compact_features(features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(1, 512, C) T5 output + (1, 512) mask -> (L, C) fp32, L = number of valid tokens incl. ``</s>``."""
    length = int(attention_mask[0].sum().item())
    return features[0, :length].float()


def _check_folder(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a T5 text-encoder folder (no config.json). {TEXT_ENCODER_HINT}")
    return path


def checked_folder(path: str | Path) -> Path:
    """A text-encoder folder with its config and its tokenizer's vocabulary (without it, recent transformers build
    an empty tokenizer that turns every word into ``<unk>``)."""
    path = _check_folder(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{path}: no tokenizer files ({' or '.join(TOKENIZER_FILES)}); without them every word "
                         f"would become <unk>. {TEXT_ENCODER_HINT}")
    return path


def load_encoder_module(path: str | Path, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu",
                        ops=torch.nn, callback=None) -> torch.nn.Module:
    """The flan-t5 encoder of a Hugging Face folder (:mod:`infinitystar.t5`, built from ``ops``), without grads;
    ``callback(done_bytes, total_bytes)`` per tensor read (progress, cancel)."""
    from .t5 import load_t5_encoder

    path = _check_folder(path)
    try:
        module = load_t5_encoder(path, dtype=dtype, ops=ops, device=device, callback=callback)
    except FileNotFoundError as exc:
        raise ValueError(f"{path}: cannot load the T5 weights ({str(exc).rstrip('.')}). {TEXT_ENCODER_HINT}") from exc
    except ValueError as exc:  # a truncated or damaged file, foreign keys, a broken config
        raise ValueError(f"{path}: cannot load the T5 weights: {str(exc).rstrip('.')}. If a weight file is damaged or "
                         f"incomplete, delete the folder's *.safetensors and download them again. {TEXT_ENCODER_HINT}"
                         ) from exc
    logger.info("text encoder %s loaded (%s, d_model %d)", path, dtype, module.config.d_model)
    return module


def official_autocast_dtype(device: torch.device, weight_dtype: torch.dtype) -> torch.dtype | None:
    """The official scripts call T5 (fp16 weights) inside their bf16 autocast, so its matmuls run in bf16: the same
    for half-precision weights on a CUDA GPU that runs bf16 (Turing emulates it, slower but fine for T5, and flan-t5
    is prone to overflow in pure fp16; Pascal's cuBLAS refuses it). fp32 weights (chosen, or on the CPU) run as they
    are."""
    from .ops import native_bf16

    device = torch.device(device)
    if weight_dtype not in (torch.float16, torch.bfloat16) or device.type != "cuda":
        return None
    runs_bf16 = native_bf16(device) or (torch.version.hip is None and torch.cuda.get_device_capability(device) >= (7, 5))
    return torch.bfloat16 if runs_bf16 else None


def _config_vocab_size(path: Path) -> int:
    """``vocab_size`` of the folder's config.json (0 when it cannot be read: the model load then says why)."""
    import json

    try:
        return int(json.loads((path / "config.json").read_text(encoding="utf-8")).get("vocab_size", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def _check_sentencepiece(folder: Path) -> None:
    """Where spiece.model is the only vocabulary, a damaged one is said as such: transformers would go on to try
    other tokenizer formats and end with advice to install tiktoken."""
    spiece = folder / "spiece.model"
    if (folder / "tokenizer.json").is_file() or not spiece.is_file():
        return
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=str(spiece))
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"{spiece} ({spiece.stat().st_size:,} bytes) cannot be read by sentencepiece ({exc}); it is "
                         f"damaged or incomplete. {TEXT_ENCODER_HINT}") from None


class TextEncoder:
    """flan-t5 encoder plus its tokenizer, loaded from a Hugging Face folder (``text_encoder/flan-t5-xl-official``)."""

    def __init__(self, module: torch.nn.Module, tokenizer, max_length: int = TEXT_MAXLEN,
                 folder: Path | None = None):
        self.module = module
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.folder = folder

    @classmethod
    def from_folder(cls, path: str | Path, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu",
                    ops=torch.nn, callback=None) -> TextEncoder:
        """Load the encoder (built from ``ops``) and ``AutoTokenizer`` from ``path`` offline (no hub access). The tokenizer is
        checked first (it is cheap): without its vocabulary, recent transformers build an empty one that turns
        every word into ``<unk>``, so every prompt would give the same video."""
        from transformers import AutoTokenizer

        path = checked_folder(path)
        _check_sentencepiece(path)
        try:
            # never the folder's own code: a shared folder's tokenizer_config.json may name a Python class in it
            tokenizer = AutoTokenizer.from_pretrained(str(path), legacy=True, local_files_only=True,
                                                      trust_remote_code=False)
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: no usable tokenizer files ({' / '.join(TOKENIZER_FILES)}): "
                             f"{str(exc).rstrip('.')}. {TEXT_ENCODER_HINT}") from exc
        vocab = _config_vocab_size(path)
        if vocab and len(tokenizer) < vocab // 2:
            raise ValueError(f"{path}: the tokenizer knows {len(tokenizer)} tokens but the T5 model {vocab}; its files "
                             f"are damaged or belong to another model. {TEXT_ENCODER_HINT}")
        module = load_encoder_module(path, dtype=dtype, device=device, ops=ops, callback=callback)
        return cls(module, tokenizer, folder=path)

    @property
    def channels(self) -> int:
        return int(self.module.config.d_model)

    def tokenize(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both (1, 512) int64, exactly as the official ``encode_prompt``."""
        tokens = self.tokenizer(text=[text], max_length=self.max_length, padding="max_length", truncation=True,
                                return_tensors="pt")
        if int(tokens.attention_mask.sum()) == self.max_length:  # full: see whether anything was cut
            length = len(self.tokenizer(text=text, truncation=False).input_ids)
            if length > self.max_length:
                logger.warning("a text of %d T5 tokens (with its decoration): only the first %d are used, as in the "
                               "official code, so its end is cut: shorten the prompt", length, self.max_length)
        return tokens.input_ids, tokens.attention_mask

    @torch.no_grad()
    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      device: str | torch.device | None = None) -> torch.Tensor:
        """Run T5 on (1, 512) ids/mask and return compacted (L, C) fp32 features on CPU.

        Right padding is cut off first: the mask keeps every valid token from seeing a pad, so the L valid tokens
        alone give the same features, several times faster than all 512."""
        device = torch.device(device if device is not None else self.module.shared.weight.device)
        length = int(attention_mask[0].sum())
        if bool(attention_mask[0, :length].all()):
            input_ids, attention_mask = input_ids[:, :length], attention_mask[:, :length]
        autocast = official_autocast_dtype(device, self.module.shared.weight.dtype)
        with torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext():
            out = self.module(input_ids.to(device), attention_mask.to(device))
        return compact_features(out, attention_mask).cpu()

    def encode_text(self, text: str, device: str | torch.device | None = None) -> torch.Tensor:
        """Encode an already decorated string to (L, C) fp32 features."""
        return self.encode_tokens(*self.tokenize(text), device=device)

    def encode(self, prompt: str, negative_prompt: str = "", duration_s: int | None = 5, decorate: bool = True,
               device: str | torch.device | None = None, closing: bool = True):
        """Decorate and encode a prompt; returns ``infinitystar.sampler.TextCondition`` (fp32, on CPU).

        ``duration_s`` is the clip length tag (5 or 10; 0/None for an image). An empty negative prompt gives
        ``uncond=None`` (the model's ``cfg_uncond[:L]``); a non-empty one is encoded undecorated.
        ``closing=False``: no closing phrase (the interact script's prompts).
        """
        from .sampler import TextCondition

        self.check_negative(prompt, negative_prompt, duration_s, decorate, closing)
        cond = self.encode_text(decorate_prompt(prompt, duration_s, enabled=decorate, closing=closing),
                                device=device)
        uncond = self.encode_text(negative_prompt, device=device) if negative_prompt else None
        return TextCondition(cond=cond, uncond=uncond)

    def token_count(self, text: str) -> int:
        """Tokens the encoder sees of ``text`` (its features' length), counted by the tokenizer alone."""
        return len(self.tokenizer(text=text, max_length=self.max_length, truncation=True).input_ids)

    def check_negative(self, prompt: str, negative_prompt: str, duration_s: int | None = 5, decorate: bool = True,
                       closing: bool = True) -> None:
        """Raise ValueError when the negative prompt is longer in tokens than the decorated prompt: the official
        sampler pads the negative to the prompt's length and cannot shorten it. The tokenizer alone tells, so a
        host can refuse it before loading the encoder."""
        if not negative_prompt:
            return
        cond = self.token_count(decorate_prompt(prompt, duration_s, enabled=decorate, closing=closing))
        uncond = self.token_count(negative_prompt)
        if uncond > cond:
            raise ValueError(
                f"negative prompt is {uncond} tokens but the (decorated) prompt is only {cond}; the official sampler "
                "pads the negative to the prompt's length and cannot shorten it. Shorten the negative prompt or "
                "lengthen the prompt.")
