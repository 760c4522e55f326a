"""The prefill attention path (prefill_attention.py): causal flash for the new block, the
clustered prefix by log-sum-exp, padding by slicing. Checked against a float64 reference of the
layer's rule (query i of row b sees slot j <= length_b - T + i, weight size_j), inside models
(one-shot vs chunked prefill, split vs dense path), and for what it must not build."""
import pytest
import torch

import centroidkv
from centroidkv import hf_attention, prefill_attention as pa

from centroidkv.cache import cache_argument
from hf_helpers import VOCAB, tiny_model
from sync_counter import SyncCounter

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEADS = [(4, 4), (8, 2), (6, 1)]  # MHA, GQA, MQA
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def reference(query, key, value, scale, sizes, lengths, padding):
    """float64: row b's query i (not padding) sees slots j <= length_b - T + i with log(size_j);
    the new block's padded slots are masked; padded queries give zeros."""
    batch, q_heads, tokens, _ = query.shape
    group = q_heads // key.shape[1]
    slots = key.shape[2]
    out = torch.zeros(batch, q_heads, tokens, value.shape[3], dtype=torch.float64, device=query.device)
    for b in range(batch):
        length = slots if lengths is None else int(lengths[b])
        start = length - tokens
        size = torch.ones(key.shape[1], slots, dtype=torch.float64, device=query.device)
        if sizes is not None:
            size = sizes[b].double().expand(key.shape[1], -1).clone()
        size[:, start:start + padding[b]] = 0
        logits = query[b].double() @ key[b].double().repeat_interleave(group, 0).transpose(-1, -2) * scale
        logits = logits + size.log().repeat_interleave(group, 0)[:, None, :]
        visible = torch.arange(slots, device=query.device) <= (start + torch.arange(tokens, device=query.device))[:, None]
        logits = logits.masked_fill(~visible, -torch.inf)
        probs = torch.softmax(logits, -1).nan_to_num(0.0)
        out[b] = probs @ value[b].double().repeat_interleave(group, 0)
        out[b, :, :padding[b]] = 0
    return out


def make(device, dtype, heads, tokens, slots, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(3, heads[0], tokens, 64, generator=gen).to(device, dtype)
    k = torch.randn(3, heads[1], slots, 64, generator=gen).to(device, dtype)
    v = torch.randn(3, heads[1], slots, 64, generator=gen).to(device, dtype)
    sizes = torch.randint(1, 30, (3, heads[1], slots), generator=gen).float().to(device)
    return q, k, v, sizes


def check(got, want, dtype):
    assert got.dtype == dtype
    err = (got.double() - want).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, want.abs().max().item()), f"error {err}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("case", ["first", "first padded", "clustered prefix", "unclustered prefix",
                                  "rows of different lengths", "padded over a prefix"])
def test_matches_the_float64_reference(device, dtype, heads, case):
    tokens = 37
    slots = tokens if case.startswith("first") else 100
    q, k, v, sizes = make(device, dtype, heads, tokens, slots, seed=len(case))
    padding = [0, 5, 37] if "padded" in case else [0, 0, 0]  # row 2: nothing real in the block
    lengths = None
    if case == "rows of different lengths":
        lengths = torch.tensor([100, 61, 37], device=device)  # row 2: a first prefill
        sizes[1, :, 61:] = 0  # past a row's length (never visible anyway)
    for row, length in enumerate([slots] * 3 if lengths is None else lengths.tolist()):
        sizes[row, :, length - tokens:length] = 1  # new tokens are original tokens
    all_ones = case in ("first", "first padded", "unclustered prefix")
    given = None if all_ones else sizes
    got = pa.prefill_attention(q, k, v, 0.125, given, lengths, all_ones, padding)
    check(got, reference(q, k, v, 0.125, given, lengths, padding), dtype)


def test_leading_padding():
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]])
    assert pa.leading_padding(mask, 3) == [0, 2, 4]
    assert pa.leading_padding(None, 2) == [0, 0]
    assert pa.leading_padding(torch.tensor([[1, 1, 0, 0]]), 1) is None  # right padding
    assert pa.leading_padding(torch.tensor([[0, 1, 0, 1]]), 1) is None  # holes


def count_dense(monkeypatch):
    """Spies on the dense path: the largest query count a bias was built for, and whether
    attend_torch (the dense SDPA call) ran."""
    seen = {"bias_queries": 0, "dense": 0}
    build, attend = hf_attention.build_bias, hf_attention.attend_torch

    def spy_build(sizes, lengths, batch, queries, *args, **kwargs):
        seen["bias_queries"] = max(seen["bias_queries"], queries)
        return build(sizes, lengths, batch, queries, *args, **kwargs)

    def spy_attend(*args, **kwargs):
        seen["dense"] += 1
        return attend(*args, **kwargs)
    monkeypatch.setattr(hf_attention, "build_bias", spy_build)
    monkeypatch.setattr(hf_attention, "attend_torch", spy_attend)
    return seen


@pytest.mark.parametrize("padded", [False, True])
def test_a_long_prompt_builds_no_dense_mask(monkeypatch, padded):
    # Llama (GQA) with the default policy: the prompt's attention never takes the dense path and
    # the window scores build a bias for the last 32 queries only.
    model = tiny_model("llama", seed=3)
    prompt = torch.randint(1, VOCAB, (2, 300))
    mask = torch.ones_like(prompt)
    if padded:
        mask[1, :50] = 0
    seen = count_dense(monkeypatch)
    cache = centroidkv.CentroidKVCache(ratio=0.75, chunk_size=8, recent=16)
    with torch.no_grad():
        model(prompt, attention_mask=mask, use_cache=True, **{cache_argument(model): cache})
    assert seen["dense"] == 0 and seen["bias_queries"] <= 32


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("padded", [False, True])
def test_chunked_prefill_equals_one_shot_without_clustering(family, padded):
    """ratio 0: a prompt fed in 3 chunks gives the one-shot logits and the same cache."""
    model = tiny_model(family, seed=5)
    torch.manual_seed(5)
    prompt = torch.randint(1, VOCAB, (2, 120))
    mask = torch.ones_like(prompt)
    if padded:
        mask[1, :30] = 0
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    one = centroidkv.CentroidKVCache(ratio=0.0, chunk_size=8)
    chunked = centroidkv.CentroidKVCache(ratio=0.0, chunk_size=8)
    name = cache_argument(model)
    with torch.no_grad():
        want = model(prompt, attention_mask=mask, position_ids=positions, use_cache=True, **{name: one}).logits
        got = []
        for start, stop in ((0, 50), (50, 90), (90, 120)):
            got.append(model(prompt[:, start:stop], attention_mask=mask[:, :stop],
                             position_ids=positions[:, start:stop], use_cache=True, **{name: chunked}).logits)
    got = torch.cat(got, 1)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)
    for a, b in zip(one.layers, chunked.layers):
        assert a.lengths == b.lengths
        for row, used in enumerate(a.lengths):  # slots past a row's length are never read
            torch.testing.assert_close(a.keys[row, :, :used], b.keys[row, :, :used], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a.values[row, :, :used], b.values[row, :, :used], atol=1e-5, rtol=1e-5)
            assert torch.equal(a.sizes[row, :, :used], b.sizes[row, :, :used])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_split_path_equals_dense_path_over_clustered_slots(monkeypatch, family):
    """ratio 0.75, chunked prefill: the second and third chunks attend to clustered slots; the
    split path (flash + log-sum-exp) gives the dense path's logits for the same cache."""
    model = tiny_model(family, seed=6)
    torch.manual_seed(6)
    prompt, continuation = torch.randint(1, VOCAB, (2, 160)), torch.randint(1, VOCAB, (2, 8))

    def run():
        cache = centroidkv.CentroidKVCache(ratio=0.75, chunk_size=8, recent=16)
        kwargs = {cache_argument(model): cache, "use_cache": True}
        with torch.no_grad():
            logits = [model(prompt[:, a:b], **kwargs).logits for a, b in ((0, 70), (70, 130), (130, 160))]
            steps = [model(continuation[:, i:i + 1], **kwargs).logits for i in range(continuation.shape[1])]
        assert cache.layers[0]._clustered_any
        return torch.cat(logits, 1), torch.cat(steps, 1)
    split = run()
    monkeypatch.setattr(hf_attention, "prefill_attention", lambda *args: None)  # dense path
    dense = run()
    for a, b in zip(split, dense):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("padded", [False, True])
def test_a_clustering_prefill_stays_on_the_device(monkeypatch, padded):
    """A prompt's forward with clustering (default policy, plain forward) reads nothing back to
    the host: no Python-level sync without padding, and with padding only its bookkeeping (not
    one per clustering pass); the cache's merges take the op variant that does not read the
    sizes back (on CUDA a sync per pass)."""
    model = tiny_model("llama", seed=8)
    prompt = torch.randint(1, VOCAB, (2, 700))
    mask = torch.ones_like(prompt)
    mask[1, :40] = 0
    cache = centroidkv.CentroidKVCache(ratio=0.75)
    counter = SyncCounter(monkeypatch)
    counter.active = True
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(prompt, attention_mask=mask if padded else None, use_cache=True, **{cache_argument(model): cache})
    counter.active = False
    assert cache.layers[0]._clustered_any
    if padded:  # the mask's padding once, then per layer the padding drop and its row groups
        layers = len(cache.layers)
        assert counter.calls[0] == "tolist" and len(counter.calls) <= 1 + 7 * layers, counter.calls
    else:
        assert counter.calls == []
    ops = {e.name for e in prof.events() if e.name.startswith("centroidkv::")}
    assert ops == {"centroidkv::_merge_unchecked"}


def test_padding_is_read_once_per_mask_and_again_after_a_change():
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    assert hf_attention.new_token_padding(mask, 6, 2) == [0, 2]
    mask[0, :3] = 0  # in place: the memo must not answer for the old values
    assert hf_attention.new_token_padding(mask, 6, 2) == [3, 2]
    assert hf_attention.new_token_padding(mask, 4, 2) == [1, 0]
    assert hf_attention.new_token_padding(None, 4, 2) == [0, 0]
