import pytest
import torch

from infinitystar.kv_cache import TEXT_KEY, ScaleKVCache


def test_store_gather_release_and_peak():
    cache = ScaleKVCache(num_layers=2)
    k, v = torch.zeros(2, 1, 3, 4), torch.ones(2, 1, 3, 4)
    for layer in range(2):
        cache.store(TEXT_KEY, layer, k, v)
        cache.store(10, layer, k, v)
    assert cache.keys() == [TEXT_KEY, 10] and 10 in cache
    ks, vs = cache.gather(1, [10, TEXT_KEY])
    assert len(ks) == 2 and vs[0] is v
    assert cache.nbytes() == 2 * 2 * 2 * k.numel() * 4
    cache.release(10)
    assert 10 not in cache and cache.nbytes() == 2 * 2 * k.numel() * 4
    assert cache.peak_nbytes == 2 * 2 * 2 * k.numel() * 4
    with pytest.raises(KeyError, match="no entry"):
        cache.gather(0, [10])
    cache.clear()
    assert cache.keys() == [] and cache.nbytes() == 0
