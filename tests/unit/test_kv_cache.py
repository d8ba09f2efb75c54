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


def test_offload_keeps_scales_on_the_host_and_text_resident():
    cache = ScaleKVCache(num_layers=2, offload=True)
    k, v = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    per_layer = 2 * k.numel() * 4
    for layer in range(2):
        cache.store(TEXT_KEY, layer, k, v)
        cache.store(7, layer, k, v)
    assert cache.nbytes() == 2 * per_layer  # text only
    assert cache.offloaded_nbytes() == 2 * per_layer and cache.peak_offloaded_nbytes == 2 * per_layer
    ks, vs = cache.gather(0, [7, TEXT_KEY])
    assert ks[1] is k and ks[0] is not k and torch.equal(ks[0], k) and torch.equal(vs[0], v)  # a host copy
    k.add_(1)  # the copy does not alias the step's tensor, which the caller goes on using
    assert not torch.equal(cache.gather(0, [7])[0][0], k)
    cache.store(7, 0, k, v)  # overwrite: accounted once
    assert cache.offloaded_nbytes() == 2 * per_layer
    cache.release(7)
    assert 7 not in cache and cache.offloaded_nbytes() == 0 and cache.nbytes() == 2 * per_layer


def test_offload_keeps_resident_keys_on_the_device():
    cache = ScaleKVCache(num_layers=2, offload=True, resident=["semantic"])
    k, v = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    for layer in range(2):
        for key in (TEXT_KEY, "semantic", 3):
            cache.store(key, layer, k, v)
    per_layer = 2 * k.numel() * 4
    assert cache.nbytes() == 2 * 2 * per_layer and cache.offloaded_nbytes() == 2 * per_layer  # scale 3 only
    assert cache.gather(1, ["semantic"])[0][0] is k and cache.gather(1, [3])[0][0] is not k


def test_partial_offload_keeps_the_first_layers_on_the_host():
    cache = ScaleKVCache(num_layers=3, offload=2)
    k, v = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    per_layer = 2 * k.numel() * 4
    for layer in range(3):
        cache.store(TEXT_KEY, layer, k, v)
        cache.store(5, layer, k, v)
    assert cache.offload and cache.offload_layers == 2
    assert cache.offloaded_nbytes() == 2 * per_layer  # scale 5 of layers 0 and 1
    assert cache.nbytes() == 3 * per_layer + per_layer  # text of every layer, scale 5 of layer 2
    assert cache.gather(0, [5])[0][0] is not k and cache.gather(2, [5])[0][0] is k
    cache.release(5)
    assert cache.offloaded_nbytes() == 0 and cache.nbytes() == 3 * per_layer
    assert not ScaleKVCache(3, offload=0).offload and ScaleKVCache(3, offload=True).offload_layers == 3


@pytest.mark.parametrize("bad", [-1, 4, 1.5, "some"])
def test_offload_count_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match=r"offload_kv must be .* layer count in \[0, 3\]"):
        ScaleKVCache(num_layers=3, offload=bad)


def test_concat_to_equals_cat():
    from infinitystar.kv_cache import concat_to

    parts = [torch.randn(2, 1, n, 4) for n in (3, 1, 5)]
    assert torch.equal(concat_to(parts, torch.device("cpu")), torch.cat(parts, dim=2))


class _Pinned(torch.Tensor):
    """A host tensor that says it is pinned (pinning needs a CUDA build)."""

    def is_pinned(self, *args, **kwargs):
        return True


@pytest.mark.parametrize("pinned", [True, False])
def test_clear_returns_pinned_memory_also_after_every_entry_was_released(monkeypatch, pinned):
    """A finished run has released its offloaded entries after their last reader, which leaves their pinned
    buffers in torch's host cache: clear() must still hand that memory back to the system (≈10 GB at 480p 10 s)."""
    import infinitystar.kv_cache as kv

    emptied = []
    monkeypatch.setattr(kv, "_empty_host_cache", lambda: emptied.append(1))
    if pinned:
        monkeypatch.setattr(kv, "_to_host", lambda t: t.clone().as_subclass(_Pinned))
    cache = ScaleKVCache(num_layers=2, offload=True)
    k, v = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    for layer in range(2):
        cache.store(TEXT_KEY, layer, k, v)
        cache.store(7, layer, k, v)
    cache.release(7)  # the last reader has run: only the device-resident text is left
    cache.clear()
    assert emptied == ([1] if pinned else [])
    cache.clear()  # once per pinning run, not again
    assert len(emptied) == (1 if pinned else 0)


def test_attention_sees_the_references_in_order_then_the_step_itself():
    """The official concat order: the reference scales in ref order (text 't0' among them, last), then the current
    step's own K/V. Each entry here is filled with its own marker, so the order can be read off."""
    from infinitystar.transformer import Attention, StepContext

    cache = ScaleKVCache(num_layers=1)

    def kv(mark, length):
        return torch.full((1, 2, length, 4), float(mark)), torch.full((1, 2, length, 4), -float(mark))

    cache.store(("s", 0), 0, *kv(1, 1))
    cache.store(("s", 1), 0, *kv(2, 4))
    cache.store(TEXT_KEY, 0, *kv(3, 2))
    ctx = StepContext(rope=(None, None), cache=cache, store_key=("s", 2), ref_keys=[("s", 1), ("s", 0), TEXT_KEY])
    k, v = Attention.with_context(*kv(4, 3), ctx, layer=0)
    assert k[0, 0, :, 0].tolist() == [2, 2, 2, 2, 1, 3, 3, 4, 4, 4]
    assert torch.equal(v, -k)
    assert cache.gather(0, [("s", 2)])[0][0][0, 0, :, 0].tolist() == [4, 4, 4]  # stored for later steps
