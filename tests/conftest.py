"""Shared fixtures: the tiny model set in the official layout, written once per test run."""
import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Paths dict from ``infinitystar.tiny.write_tiny_models`` (root, transformer_720p, transformer_480p, vae,
    text_encoder), written once into a session temp folder with seed 0."""
    from infinitystar.tiny import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tiny_models"), seed=0)


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: on a small shared CPU, thread synchronisation costs more than the convolutions."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def official_path():
    """INFINITYSTAR_OFFICIAL_PATH, an official checkout importable here (benchmarks/official.py), or a skip; the
    modules the official import registered (its packages, the flash_attn stand-in) are dropped afterwards."""
    import os
    import sys

    from bench_loader import load_benchmark

    path = os.environ.get("INFINITYSTAR_OFFICIAL_PATH")
    if not path:
        pytest.skip("set INFINITYSTAR_OFFICIAL_PATH to an official InfinityStar checkout to run the tests against "
                    "the official code")
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    try:
        official = load_benchmark("official")
        official.import_official(path)
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"official code not importable here: {e}")
    yield path
    sys.path[:] = saved_path
    for name in set(sys.modules) - saved_modules:
        if name.split(".")[0] in ("flash_attn", "infinity"):
            del sys.modules[name]
