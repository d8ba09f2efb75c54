"""Fixtures for the host tests: a real ComfyUI checkout found through COMFYUI_PATH, imported in-process with
``--cpu`` semantics, and the pack imported by file path exactly as ComfyUI's custom-node loader does.

Every test here is skipped, with the reason, when COMFYUI_PATH is unset or ComfyUI cannot be imported in this
Python environment (it needs ComfyUI's own requirements, e.g. aiohttp, torchsde, av, alembic).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACK_MODULE = "comfyui_infinitystar_pack"  # any name works: ComfyUI keys packs by their path


def comfyui_path() -> Path | None:
    value = os.environ.get("COMFYUI_PATH")
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    return path if (path / "main.py").is_file() and (path / "comfy").is_dir() else None


def _skip_reason() -> str | None:
    if not os.environ.get("COMFYUI_PATH"):
        return "COMFYUI_PATH is not set (point it at a ComfyUI checkout to run the host tests)"
    if comfyui_path() is None:
        return f"COMFYUI_PATH={os.environ['COMFYUI_PATH']} is not a ComfyUI checkout (no main.py / comfy/)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _skip_reason()
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.host)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def comfy():
    """Import ComfyUI in-process on the CPU; returns ``comfy.model_management``."""
    root = str(comfyui_path())
    # ComfyUI's top-level ``nodes`` module must win over this repository's ``nodes`` package on sys.path.
    sys.path.insert(0, root)
    loaded = sys.modules.get("nodes")
    if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(root):
        del sys.modules["nodes"]
    try:
        from comfy.cli_args import args

        args.cpu = True  # must precede comfy.model_management (no GPU driver here)
        import comfy.model_management as mm
        import comfy.utils  # noqa: F401
        import folder_paths  # noqa: F401
        from comfy_api.latest import io  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"ComfyUI at {root} does not import in this environment: {exc}")
    return mm


@pytest.fixture(scope="session")
def pack(comfy):
    """The repository imported as a ComfyUI pack (root ``__init__.py``, relative imports); returns its nodes."""
    if PACK_MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_MODULE, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_MODULE] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{PACK_MODULE}.nodes")


@pytest.fixture(scope="session")
def comfy_dirs(comfy, tiny_models, tmp_path_factory):
    """Point ComfyUI's models/infinitystar at the tiny set and its input/output folders at temp folders."""
    import folder_paths

    out = tmp_path_factory.mktemp("comfy_output")
    inp = tmp_path_factory.mktemp("comfy_input")
    folder_paths.set_output_directory(str(out))
    folder_paths.set_input_directory(str(inp))
    folder_paths.add_model_folder_path("infinitystar", str(tiny_models["root"]), is_default=True)
    return {"output": out, "input": inp, "models": Path(tiny_models["root"])}


@pytest.fixture(scope="session")
def core(pack):
    """``core("pipeline")`` -> the core module as the pack sees it (``<pack>.infinitystar.pipeline``): class
    identity matters for isinstance checks, and the top-level ``infinitystar`` is a separate copy."""
    return lambda name: importlib.import_module(f"{PACK_MODULE}.infinitystar.{name}")


@pytest.fixture(scope="module")
def loaded(pack, comfy_dirs):
    """The tiny 720p transformer, text encoder and tokenizer through the loader nodes, and one prompt's conditioning."""
    from node_kit import run

    nodes = pack
    model = run(nodes.loaders.InfinityStarModelLoader, model_name="infinitystar_8b_720p_weights",
                weight_dtype="default", compute_dtype="auto", attention="auto")[0]
    te = run(nodes.loaders.InfinityStarTextEncoderLoader, encoder_name="text_encoder/flan-t5-xl-official",
             dtype="auto")[0]
    vae = run(nodes.loaders.InfinityStarVAELoader, vae_name="infinitystar_videovae.pth", dtype="auto")[0]
    cond = run(nodes.conditioning.InfinityStarTextEncode, text_encoder=te, prompt="a red fox running in snow",
               negative_prompt="", duration_tag="auto")[0]
    return {"model": model, "te": te, "vae": vae, "cond": cond}
