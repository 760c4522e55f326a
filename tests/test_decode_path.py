"""The per-step decode path of CentroidKVCache + the "centroidkv" attention stays on the device.

On a GPU every host-device synchronisation in a decode step (Tensor.item, .tolist, bool(t), a
tensor built from a Python list, boolean-mask indexing) stalls the launch queue once per layer.
These tests count such calls on the CPU, where they are the same Python calls: a decode step in
which no block leaves the recent window must make none, must hand the attention op the cache's
own buffers (no copies) and must not reallocate them.
"""
from __future__ import annotations

import pytest
import torch

from centroidkv.cache import CentroidKVCache
from centroidkv.hf_attention import centroidkv_attention
from sync_counter import SyncCounter


LAYERS, KV_HEADS, GROUP, DIM = 2, 2, 2, 16


class _Module(torch.nn.Module):
    pass


def _step(cache, tokens, mask, module):
    """One forward's cache + attention calls for every layer, as a decoder would make them."""
    batch, new = tokens.shape[0], tokens.shape[2]
    outputs = []
    for layer in range(LAYERS):
        keys, values = cache.update(tokens, tokens * 0.5, layer)
        query = torch.randn(batch, KV_HEADS * GROUP, new, DIM)
        outputs.append(centroidkv_attention(module, query, keys, values, mask)[0])
    return outputs


@pytest.mark.parametrize("static", [False, True])  # host-driven, or the captured path run eagerly
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("ratio", [0.0, 0.75])
def test_no_cluster_decode_step_makes_no_host_sync(monkeypatch, ratio, padded, static):
    batch, prompt, steps = 3, 150, 90
    cache = CentroidKVCache(ratio=ratio, recent=16, chunk_size=8, max_cache_len=prompt + steps if static else None)
    module = _Module().eval()
    mask = torch.ones(batch, prompt + steps, dtype=torch.long)
    if padded:  # left padding of different widths: rows end up with different slot counts
        mask[0, :7] = 0
        mask[2, :30] = 0
    counter = SyncCounter(monkeypatch)
    quiet_steps = clustering_steps = 0
    with torch.inference_mode():
        _step(cache, torch.randn(batch, KV_HEADS, prompt, DIM), mask[:, :prompt], module)
        layer = cache.layers[0]
        assert (len(set(layer.lengths)) > 1) == padded
        for step in range(steps):
            before = list(layer.lengths)
            counter.active, counter.calls = True, []
            outputs = _step(cache, torch.randn(batch, KV_HEADS, 1, DIM), mask[:, :prompt + step + 1], module)
            counter.active = False
            assert all(torch.isfinite(out).all() for out in outputs)
            if layer.lengths == [n + 1 for n in before]:  # nothing clustered in this step
                quiet_steps += 1
                assert counter.calls == [], f"step {step}: host syncs {counter.calls}"
            else:
                clustering_steps += 1
    assert quiet_steps > 0
    assert clustering_steps > 0 or ratio == 0.0  # both kinds of steps were exercised


def test_attention_reads_the_cache_buffers_in_place(monkeypatch):
    batch, prompt = 2, 100
    cache = CentroidKVCache(ratio=0.75, recent=16, chunk_size=8)
    module = _Module().eval()
    seen = []
    original = torch.ops.centroidkv.attention

    def spy(q, k, v, sizes, scale, lengths):
        seen.append((k, v, sizes, lengths))
        return original(q, k, v, sizes, scale, lengths)

    with torch.inference_mode():
        _step(cache, torch.randn(batch, KV_HEADS, prompt, DIM), None, module)
        monkeypatch.setattr(torch.ops.centroidkv, "attention", spy)
        _step(cache, torch.randn(batch, KV_HEADS, 1, DIM), None, module)
    assert len(seen) == LAYERS
    for (k, v, sizes, lengths), layer in zip(seen, cache.layers):
        assert k.data_ptr() == layer.keys.data_ptr() and v.data_ptr() == layer.values.data_ptr()
        assert sizes.data_ptr() == layer.sizes.data_ptr()
        assert k.stride() == layer.keys.stride()  # a view of the buffer, not a copy
        assert lengths is None or lengths.data_ptr() == layer.lengths_dev.data_ptr()


def test_decode_between_clustering_events_never_reallocates():
    batch, prompt = 2, 300
    cache = CentroidKVCache(ratio=0.75, recent=16, chunk_size=8)
    module = _Module().eval()
    with torch.inference_mode():
        _step(cache, torch.randn(batch, KV_HEADS, prompt, DIM), None, module)
        layer = cache.layers[0]
        block = cache.options.block
        assert layer.capacity >= max(layer.lengths) + block  # room for a block of growth
        reallocations, pointer = 0, layer.keys.data_ptr()
        for _ in range(5 * block):
            _step(cache, torch.randn(batch, KV_HEADS, 1, DIM), None, module)
            reallocations += layer.keys.data_ptr() != pointer
            pointer = layer.keys.data_ptr()
    assert reallocations == 0
