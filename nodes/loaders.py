"""Loader nodes: transformer, flan-t5 text encoder, video tokenizer, and the official-files downloader.

Each loader returns its module inside a ComfyUI patcher (``nodes.host``); ComfyUI's output cache keeps the
loaded object for later prompts while the inputs and the files on disk (``fingerprint_inputs``) stay the same, so
nothing is cached in the pack.
"""
from __future__ import annotations

import logging
import os

from comfy_api.latest import io, ui

from . import host, paths
from . import types as T
from .choices import check_choices, check_values

logger = logging.getLogger(__name__)

ATTENTION_CHOICES = ("auto", "sdpa", "cudnn", "sdpa_flash", "flash", "sage")
VAE_DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
TEXT_DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32")


def _missing(name: str | None, resolve) -> bool | str:
    """True when ``resolve`` finds ``name``, else where it looked: one lookup, not a walk of the folders. ``None``
    (left out of an API prompt) passes: ComfyUI has already said "Required input is missing"."""
    if name is None:
        return True
    try:
        resolve(name)
    except FileNotFoundError as exc:
        return str(exc)
    return True


def _pick_attention(choice: str, load_device) -> str:
    from ..infinitystar.attention import auto_backend, backend_unavailable

    if choice == "auto":  # flash matches the official numerics on CUDA; sage changes them, so never automatic
        return auto_backend(load_device)
    why = backend_unavailable(choice, load_device)
    if why:
        raise ValueError(f"attention {choice}: {why}. 'auto' picks what runs here.")
    if choice == "cudnn" and load_device.type != "cuda":
        logger.warning("InfinityStar: attention cudnn is a CUDA kernel; on %s PyTorch's own SDPA pick runs instead",
                       load_device)
    return choice


class InfinityStarModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InfinityStarModelLoader", display_name="InfinityStar Model Loader",
            category="InfinityStar/loaders",
            description="Loads the InfinityStar 8B autoregressive transformer (720p, 480p or interact weights: a "
                        "sharded "
                        "folder or one merged file) from models/infinitystar or models/diffusion_models. "
                        "ComfyUI's memory manager places it; it streams layers when VRAM is short.",
            inputs=[
                io.Combo.Input("model_name", options=paths.transformer_choices(),
                               tooltip="Sharded folder (infinitystar_8b_720p_weights/ with its index json), "
                                       "a merged .safetensors, or a .gguf (python -m infinitystar convert-gguf; "
                                       "Q8_0 ~9 GB, Q4_0 ~5 GB). 720p weights make 5 s clips; 480p weights also "
                                       "make 10 s; interact weights (InfinityStarInteract_24K_iters) feed "
                                       "InfinityStar Interact. Missing? Use the InfinityStar Download Models "
                                       "node."),
                io.Combo.Input("weight_dtype", options=list(host.WEIGHT_DTYPES), default=host.AUTO_WEIGHTS,
                               tooltip="Storage dtype of the blocks. auto = default, except on a CUDA GPU too "
                                       "small for bf16 blocks plus the weights' largest run (720p 5 s; 480p 10 s): "
                                       "there fp8_e4m3fn (e.g. a 16 GB GPU gets fp8, a 24 GB one usually bf16). "
                                       "default = the official scripts' layout: "
                                       "the official fp32 files' blocks in bf16 on a GPU (~17.6 GB; fp32 on the "
                                       "CPU); other files as stored (a .gguf stays quantized: only auto and "
                                       "default apply). "
                                       "fp8 halves that (~9 GB) at a small quality cost; both are upcast layer by layer "
                                       "on any CUDA GPU, and e4m3fn has about half the error of e5m2. "
                                       "fp8_e4m3fn is stored with a per-tensor scale; ComfyUI started with "
                                       "--fast fp8_matrix_mult also multiplies it in fp8 (RTX 40xx and newer). "
                                       "Embeddings and heads stay fp32 as in the official layout. ComfyUI started "
                                       "with --bf16-unet, --fp8_e4m3fn-unet etc. sets auto to that dtype."),
                io.Combo.Input("compute_dtype", options=list(host.COMPUTE_DTYPES), default="auto",
                               tooltip="Dtype the blocks run in. auto = bf16 where supported (official), fp16 "
                                       "on older GPUs, fp32 on CPU. Weights are cast per layer when it differs."),
                io.Combo.Input("attention", options=list(ATTENTION_CHOICES), default="auto",
                               tooltip="Attention kernel. auto = flash-attn if installed on CUDA (the official "
                                       "kernel), else PyTorch SDPA: FlashAttention-2 for small calls, its own pick "
                                       "(cuDNN on Hopper with recent PyTorch) for the large ones. cudnn = cuDNN's "
                                       "kernel for every call (1.6x FlashAttention-2's speed on an H200 at the "
                                       "large steps; a plan per new shape at the small ones). sdpa_flash = "
                                       "PyTorch's FlashAttention-2, the official kernel family (bit-equal bf16 "
                                       "runs). sage is faster but changes the numerics."),
                io.Boolean.Input("compile", default=False, optional=True,
                                 tooltip="torch.compile the blocks' parts around attention (norms, RoPE, SwiGLU fused). "
                                         "Needs Triton on a GPU. The first run compiles (about a minute); later "
                                         "runs reuse it. Off = the plain PyTorch path."),
            ],
            outputs=[T.Model.Output(display_name="model", tooltip="The transformer, held by ComfyUI's model manager "
                                                                  "(loaded to the GPU only while a node samples), for "
                                                                  "Sampler, Extend or Interact.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, model_name: str | None = None, weight_dtype: str | None = None, compute_dtype: str | None = None,
                        attention: str | None = None) -> bool | str:
        checked = check_values({"weight_dtype": host.WEIGHT_DTYPES, "compute_dtype": host.COMPUTE_DTYPES,
                                "attention": ATTENTION_CHOICES}, weight_dtype=weight_dtype,
                               compute_dtype=compute_dtype, attention=attention)
        return _missing(model_name, paths.resolve_transformer) if checked is True else checked

    @classmethod
    def fingerprint_inputs(cls, model_name: str, **_settings) -> str:
        return paths.on_disk(model_name, paths.resolve_transformer)  # replaced files load again

    @classmethod
    @host.shows_warnings
    def execute(cls, model_name: str, weight_dtype: str, compute_dtype: str, attention: str,
                compile: bool = False) -> io.NodeOutput:
        from ..infinitystar.checkpoint import default_block_dtype, inspect_transformer, load_transformer
        from ..infinitystar.transformer import compile_unavailable

        path = paths.resolve_transformer(model_name)
        load_device, offload_device = host.devices("transformer")
        backend = _pick_attention(attention, load_device)
        why = compile_unavailable(load_device) if compile else None
        if why:
            raise ValueError(f"compile is on, but {why}. Install it, or set compile to false.")
        gguf_file = path.suffix.lower() == ".gguf"
        found = host.start_flag("transformer")
        flagged, applied, why_none = found[1] if found else None, [], []
        if compute_dtype == "auto" and flagged in host.COMPUTE_DTYPES:
            if host.computes_in(flagged, load_device):
                compute_dtype = flagged  # --fp32/bf16/fp16-unet: "run it in" (bf16 where the GPU has it, as core)
                applied.append("compute")
            else:
                why_none.append(f"{load_device} does not compute in {flagged}")
        compute = host.resolve_compute_dtype(compute_dtype, load_device)
        if weight_dtype == host.AUTO_WEIGHTS and flagged and not gguf_file:
            weight_dtype = flagged  # and --fp8_e4m3fn/e5m2-unet: "store it in"
            applied.insert(0, "weight")
        elif weight_dtype == host.AUTO_WEIGHTS and gguf_file:
            why_none.append("a GGUF file keeps its own")
        if found and found[1] is None:  # a flag for a dtype not offered: said for what was left on auto
            applied = [name for name, choice in (("weight", weight_dtype), ("compute", compute_dtype)) if choice == "auto"]
        host.say_flag("transformer", found, f"auto {' and '.join(applied)} dtype{'s' * (len(applied) > 1)}"
                      if applied else None, "; ".join(why_none) or "chosen on its loader")
        wdtype = host.WEIGHT_DTYPES[weight_dtype]
        if gguf_file:  # Windows names are case-blind: X.GGUF is listed and read as GGUF
            if wdtype is not None:
                raise ValueError(f"{path.name} is a GGUF file, already quantized: set weight_dtype to auto or default "
                                 f"(it is {weight_dtype}), or pick the official .safetensors weights to store "
                                 "them in another dtype.")
            ops = host.gguf_ops()
        else:
            if weight_dtype == host.AUTO_WEIGHTS:  # bf16, or fp8 where bf16 and the largest run do not fit
                wdtype = host.auto_weight_dtype(inspect_transformer(path), load_device, compute, backend)
            elif wdtype is None:  # the official layout: the fp32 files' blocks in bf16 on a GPU
                wdtype = default_block_dtype(inspect_transformer(path).dtype, load_device, compute)
            host.check_weight_dtype(wdtype, load_device)
            ops = host.pick_ops(wdtype, compute, load_device)
        # progress and cancel per tensor read: a cancel frees what was read (the output is then not cached)
        model, info = load_transformer(path, dtype=wdtype, ops=ops, device=offload_device,
                                       callback=host.ChunkProgress())
        patcher = host.make_patcher(model, "transformer")
        logger.info("InfinityStar transformer %s: variant %s, blocks %s, compute %s, attention %s, compile %s",
                    path.name, info.variant, info.storage, compute, backend, compile)
        return io.NodeOutput(T.LoadedTransformer(patcher, info, compute, backend, compile))


class InfinityStarTextEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InfinityStarTextEncoderLoader", display_name="InfinityStar Text Encoder Loader",
            category="InfinityStar/loaders",
            description="Loads the flan-t5-xl encoder folder (text_encoder/flan-t5-xl-official) from "
                        "models/text_encoders or models/infinitystar. Like core text encoders it stays on the "
                        "GPU after encoding until the transformer needs the room, and small GPUs load it in "
                        "part.",
            inputs=[
                io.Combo.Input("encoder_name", options=paths.text_encoder_choices(),
                               tooltip="Hugging Face folder with config.json, the weights and spiece.model "
                                       "(about 2.4 GB in fp16). Missing? Use the InfinityStar Download Models "
                                       "node."),
                io.Combo.Input("dtype", options=list(TEXT_DTYPE_CHOICES), default="auto",
                               tooltip="auto = fp16 on GPUs (as the official scripts load it), fp32 on CPU "
                                       "where fp16 is slow; ComfyUI's --fp16/bf16/fp32-text-enc set it. bf16 "
                                       "halves memory like fp16 with a wider range."),
            ],
            outputs=[T.TextEncoder.Output(display_name="text_encoder", tooltip="flan-t5-xl, for InfinityStar Text "
                                                                               "Encode.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, encoder_name: str | None = None, dtype: str | None = None) -> bool | str:
        checked = check_values({"dtype": TEXT_DTYPE_CHOICES}, dtype=dtype)
        return _missing(encoder_name, paths.resolve_text_encoder) if checked is True else checked

    @classmethod
    def fingerprint_inputs(cls, encoder_name: str, **_settings) -> str:
        return paths.on_disk(encoder_name, paths.resolve_text_encoder)  # replaced files load again

    @classmethod
    @host.shows_warnings
    def execute(cls, encoder_name: str, dtype: str) -> io.NodeOutput:
        from ..infinitystar.text import TextEncoder

        path = paths.resolve_text_encoder(encoder_name)
        load_device, offload_device = host.devices("text_encoder")
        weights = host.text_encoder_dtype(dtype)
        encoder = TextEncoder.from_folder(path, dtype=weights, device=offload_device,  # progress, cancel per tensor
                                          ops=host.pick_ops(None, weights, load_device), callback=host.ChunkProgress())
        return io.NodeOutput(T.LoadedTextEncoder(host.make_patcher(encoder.module, "text_encoder"), encoder, path))


class InfinityStarVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InfinityStarVAELoader", display_name="InfinityStar Video Tokenizer Loader",
            category="InfinityStar/loaders",
            description="Loads the InfinityStar video tokenizer (infinitystar_videovae.pth or a .safetensors "
                        "conversion) from models/infinitystar or models/vae; it decodes tokens to frames and "
                        "encodes start images / videos.",
            inputs=[
                io.Combo.Input("vae_name", options=paths.vae_choices(),
                               tooltip="The official infinitystar_videovae.pth. Other VAEs are refused with a "
                                       "note of what they look like."),
                io.Combo.Input("dtype", options=list(VAE_DTYPE_CHOICES), default="auto",
                               tooltip="Dtype the decode runs in (weights stay as stored). auto = bf16 where "
                                       "supported (the official decode runs under bf16 autocast), else fp32; "
                                       "ComfyUI's --fp16/bf16/fp32-vae set it. "
                                       "Encoding always runs in fp32, as the official scripts encode."),
            ],
            outputs=[T.VAE.Output(display_name="vae", tooltip="The video tokenizer, for Decode, Encode, Interact "
                                                              "Start, the Sampler's start image and colour previews.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, vae_name: str | None = None, dtype: str | None = None) -> bool | str:
        checked = check_values({"dtype": VAE_DTYPE_CHOICES}, dtype=dtype)
        return _missing(vae_name, paths.resolve_vae) if checked is True else checked

    @classmethod
    def fingerprint_inputs(cls, vae_name: str, **_settings) -> str:
        return paths.on_disk(vae_name, paths.resolve_vae)  # replaced files load again

    @classmethod
    @host.shows_warnings
    def execute(cls, vae_name: str, dtype: str) -> io.NodeOutput:
        from ..infinitystar.checkpoint import load_tokenizer

        path = paths.resolve_vae(vae_name)
        load_device, offload_device = host.devices("vae")
        if dtype == "auto":
            dtype = host.flagged_dtype("video tokenizer") or dtype  # --fp16/bf16/fp32-vae
        compute = host.resolve_compute_dtype(dtype, load_device, fp16_fallback=False)
        tokenizer = load_tokenizer(path, ops=host.pick_ops(None, compute, load_device), device=offload_device)
        tokenizer.compute_dtype = compute
        return io.NodeOutput(T.LoadedVAE(host.make_patcher(tokenizer, "vae"), path))


def typed_path(text: str) -> str | None:
    """A path typed or pasted into a text widget: "Copy as path" quotes and a leading ``~`` are what a shell would
    have removed; empty means none."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return os.path.expanduser(text) if text else None


def check_local_source(source: str) -> None:
    """A workflow or an API prompt names ``local_source``, so it may come from someone else: only a folder of this
    machine given in full, outside the folders ComfyUI lets clients upload to, and not a network share (on Windows,
    merely looking at ``\\\\host\\share`` sends the user's credentials to that host)."""
    if source.startswith(("\\\\", "//")):
        raise ValueError(f"local_source {source!r} is a network path; copy the files to a folder of this machine "
                         "and give that folder.")
    if not os.path.isabs(source):
        raise ValueError(f"local_source {source!r} is not a full path; give the folder's full path (e.g. "
                         "D:\\InfinityStar or /mnt/usb/InfinityStar).")
    if paths.is_upload_folder(source):
        raise ValueError(f"local_source {source!r} is inside ComfyUI's input, output or temp folder, where clients "
                         "can upload files; models are not copied from there.")


class InfinityStarDownloadModels(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InfinityStarDownloadModels", display_name="InfinityStar Download Models",
            category="InfinityStar/loaders",
            description="Downloads the official files from the Hugging Face repo FoundationVision/InfinityStar "
                        "into models/infinitystar, or into the folder extra_model_paths.yaml gives as infinitystar "
                        "(it comes first: a larger disk), resumable; files already there are kept. Queue it once, "
                        "then refresh the loaders' lists (press R).",
            inputs=[
                io.Combo.Input("variant", options=["720p", "480p", "interact"], default="720p",
                               tooltip="720p: 5 s clips at 1280x720 (~35 GB fp32 shards). 480p: 5 or 10 s at "
                                       "848x480. interact: InfinityStar-Interact (480p, one 5 s clip per prompt; "
                                       "folder InfinityStarInteract_24K_iters). The tokenizer and text encoder "
                                       "are shared."),
                io.Combo.Input("components", options=["all", "transformer", "vae", "text_encoder"], default="all",
                               tooltip="What to fetch. all = transformer + video tokenizer + flan-t5-xl "
                                       "(~47 GB in total, ~12 GB without the transformer)."),
                io.String.Input("local_source", default="", optional=True,
                                tooltip="Optional folder of this machine, laid out like the hub repo (a mirror, a "
                                        "USB disk), to copy from instead of downloading: its full path. Empty = "
                                        "download. Files already here are never replaced. Quotes around a pasted "
                                        "path and a leading ~ are understood."),
            ],
            outputs=[io.String.Output(display_name="folder", tooltip="The folder the files are in; the loaders list "
                                                                     "them after a refresh (R).")],
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, variant: str | None = None, components: str | None = None) -> bool | str:
        return check_choices(cls, variant=variant, components=components)

    @classmethod
    def fingerprint_inputs(cls, variant: str, components: str, local_source: str = ""):
        """What is on disk: a queue after the files were deleted or moved runs the download again instead of
        ComfyUI's cache answering "done"."""
        from ..infinitystar.download import model_paths

        wanted = ("transformer", "vae", "text_encoder") if components == "all" else (components,)
        found = model_paths(paths.default_dir(), variant)

        def mtime(path) -> int | None:  # None for a file that is not there or cannot be seen
            try:
                return os.stat(path).st_mtime_ns
            except OSError:
                return None

        return "|".join(f"{c}:{mtime(found[c])}" for c in wanted)

    @classmethod
    @host.shows_warnings
    def execute(cls, variant: str, components: str, local_source: str = "") -> io.NodeOutput:
        try:
            from ..infinitystar.download import download_models
        except ImportError as exc:
            raise RuntimeError(f"the downloader is not available in this install ({exc})") from exc
        wanted = ("transformer", "vae", "text_encoder") if components == "all" else (components,)
        dest = paths.default_dir()
        dest.mkdir(parents=True, exist_ok=True)
        bar = host.ChunkProgress()
        got = {}
        source = typed_path(local_source)
        if source:
            check_local_source(source)
        if source:  # checked whole (every component present, no truncated file) before anything is copied
            got.update(download_models(dest, variant=variant, components=wanted, progress=True,
                                       local_source=source, replace=False, callback=bar))  # per copied chunk
            bar(1, 1)
        for i, component in enumerate(() if source else wanted):
            bar(i, len(wanted))
            try:
                got.update(download_models(dest, variant=variant, components=(component,), progress=True,
                                           replace=False, callback=bar))  # this component's bytes (or files)
            except host.INTERRUPTED:  # Cancel, raised by the bar: not a download error
                raise
            except Exception as exc:  # hub errors differ across huggingface_hub versions
                said = str(exc).rstrip(".")
                offline = "" if "local_source" in said else (
                    ". Without internet access, copy the files there by hand (hub layout: infinitystar_8b_720p_weights/, "
                    "infinitystar_videovae.pth, text_encoder/flan-t5-xl-official/) or set local_source")
                raise RuntimeError(f"could not fetch the InfinityStar {component} ({variant}) into {dest}: "
                                   f"{said}{offline}.") from exc
            bar(i + 1, len(wanted))
        summary = "\n".join(f"{k}: {v}" for k, v in got.items())
        return io.NodeOutput(str(dest), ui=ui.PreviewText(f"{'copied' if source else 'downloaded'} into {dest}\n"
                                                          f"{summary}"))
