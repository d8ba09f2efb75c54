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
