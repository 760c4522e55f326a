"""CentroidKVCache and the "centroidkv" attention at the cache level and on a tiny Llama."""

import pytest
import torch

from hf_helpers import VOCAB, teacher_forced_logits, tiny_model

import centroidkv
from centroidkv import reference
from centroidkv.cache import cache_argument
from centroidkv.hf_attention import centroidkv_attention
from centroidkv.policies import PlainClustering, Policy, Segment

transformers = pytest.importorskip("transformers")


def test_clustering_off_matches_dynamic_cache():
    """ratio 0: prefill + 50 decode steps give DynamicCache's logits (stock SDPA model)."""
    torch.manual_seed(1)
    ours, stock = tiny_model("llama"), tiny_model("llama", attn="sdpa")
    prompt = torch.randint(0, VOCAB, (1, 150))
    continuation = torch.randint(0, VOCAB, (1, 50))
    got = teacher_forced_logits(ours, centroidkv.CentroidKVCache(ratio=0.0), prompt, continuation)
    want = teacher_forced_logits(stock, transformers.DynamicCache(config=stock.config), prompt, continuation)
    # Same math, different kernels (SDPA with a zero bias vs causal SDPA): fp32 rounding only.
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


class _FakeAttention(torch.nn.Module):
    training = False


def _pairs(batch, heads, n_pairs, dim):
    base = torch.randn(batch, heads, n_pairs, dim)
    return base.repeat_interleave(2, dim=2)  # identical adjacent pairs: k0 k0 k1 k1 ...


@pytest.mark.parametrize("q_heads,kv_heads", [(2, 2), (4, 2)])
def test_identical_pairs_clustered_at_half_match_unclustered(q_heads, kv_heads):
    """Each pair merges into one slot of size 2; with log(size) the attention is unchanged."""
    torch.manual_seed(2)
    keys, values = _pairs(1, kv_heads, 24, 16), _pairs(1, kv_heads, 24, 16)
    cache = centroidkv.CentroidKVCache(ratio=0.5, chunk_size=8, sink=0, recent=0,
                                       policy=centroidkv.PlainClustering())
    k_view, v_view = cache.update(keys, values, 0)
    query = torch.randn(1, q_heads, 48, 16)
    centroidkv_attention(_FakeAttention(), query, k_view, v_view, None, scaling=0.25)  # settles
    layer = cache.layers[0]
    assert layer.lengths == [24]
    assert torch.equal(layer.sizes[0, :, :24], torch.full((kv_heads, 24), 2.0))

    new_k, new_v = torch.randn(1, kv_heads, 1, 16), torch.randn(1, kv_heads, 1, 16)
    q = torch.randn(1, q_heads, 1, 16)
    k_view, v_view = cache.update(new_k, new_v, 0)
    got = centroidkv_attention(_FakeAttention(), q, k_view, v_view, None, scaling=0.25)[0]
    want = reference.attention(q, torch.cat([keys, new_k], 2), torch.cat([values, new_v], 2), scale=0.25)
    # fp32 vs the float64 reference; the only difference is rounding of log 2 and the softmax.
    torch.testing.assert_close(got.transpose(1, 2), want, atol=1e-5, rtol=1e-5)


def test_batch_with_left_padding_equals_each_prompt_alone():
    torch.manual_seed(3)
    model = tiny_model("llama")
    lengths = [180, 131, 97]
    prompts = [torch.randint(1, VOCAB, (n,)) for n in lengths]
    width = max(lengths)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, p in enumerate(prompts):
        batch[row, width - len(p):], mask[row, width - len(p):] = p, 1
    continuation = torch.randint(1, VOCAB, (len(prompts), 40))
    options = dict(ratio=0.75, chunk_size=8, sink=2, recent=16)
    together = teacher_forced_logits(model, centroidkv.CentroidKVCache(**options), batch, continuation, mask)
    for row, p in enumerate(prompts):
        alone = teacher_forced_logits(model, centroidkv.CentroidKVCache(**options), p[None],
                                      continuation[row:row + 1])
        # Same slots, same order; only the batched kernels' summation order differs.
        torch.testing.assert_close(together[row], alone[0], atol=2e-4, rtol=2e-4)


def test_generate_with_padding_matches_alone():
    model = tiny_model("llama", seed=4)
    torch.manual_seed(4)
    long, short = torch.randint(1, VOCAB, (1, 150)), torch.randint(1, VOCAB, (1, 90))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 60, dtype=torch.long), short], 1)])
    mask = (torch.arange(150)[None] >= torch.tensor([[0], [60]])).long()
    options = dict(ratio=0.75, chunk_size=8, recent=16)
    out = model.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         **{cache_argument(model): centroidkv.CentroidKVCache(**options)})
    for row, prompt in enumerate([long, short]):
        alone = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0,
                               **{cache_argument(model): centroidkv.CentroidKVCache(**options)})
        assert torch.equal(out[row, -12:], alone[0, -12:])


def test_memory_after_long_prefill_is_about_a_quarter():
    model = tiny_model("llama", seed=5)
    prompt = torch.randint(1, VOCAB, (1, 2048))
    # The paper's policy, whose slot count has a closed form (the default also keeps scores).
    cache = centroidkv.CentroidKVCache(ratio=0.75, policy=centroidkv.PlainClustering())
    stock = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt, use_cache=True, **{cache_argument(model): cache})
        tiny_model("llama", attn="sdpa", seed=5)(prompt, use_cache=True, **{cache_argument(model): stock})
    full = centroidkv.cache.dynamic_cache_bytes(stock).total
    held = cache.memory_bytes()
    options = cache.options
    block = options.block
    assert block == 64  # two passes of c = 32 need 64-token blocks
    # Live slots: sink + a quarter of the whole blocks + the recent window (< recent + block).
    clustered = (2048 - options.sink - options.recent) // block * block
    live = cache.live_slots(0)[0]
    assert live == options.sink + clustered // 4 + (2048 - options.sink - clustered)
    # Bytes: live slots plus at most one block and alignment of headroom; sizes add 4 bytes/slot.
    per_slot = full / 2048 * (1 + 4 / (2 * 16 * 4))  # head_dim 16, fp32 keys+values, + sizes
    assert held.total <= per_slot * (live + block + 32)
    assert held.total < 0.4 * full
    assert len(held.per_layer) == 2 and sum(held.per_layer) == held.total


def test_positions_continue_from_uncompressed_length():
    model = tiny_model("llama", seed=6)
    prompt = torch.randint(1, VOCAB, (1, 300))
    cache = centroidkv.CentroidKVCache(ratio=0.75, chunk_size=8, recent=16)
    name = cache_argument(model)
    with torch.no_grad():
        model(prompt, use_cache=True, **{name: cache})
        assert cache.get_seq_length() == 300 and cache.live_slots(0)[0] < 150
        token = torch.tensor([[5]])
        implicit = model(token, use_cache=True, **{name: cache}).logits
        cache_again = centroidkv.CentroidKVCache(ratio=0.75, chunk_size=8, recent=16)
        model(prompt, use_cache=True, **{name: cache_again})
        explicit = model(token, position_ids=torch.tensor([[300]]), use_cache=True, **{name: cache_again}).logits
    torch.testing.assert_close(implicit, explicit, atol=0, rtol=0)


def test_decoding_clusters_blocks_leaving_the_recent_window():
    torch.manual_seed(7)
    cache = centroidkv.CentroidKVCache(ratio=0.5, chunk_size=4, sink=2, recent=8)
    for step in range(40):
        k, v = cache.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), 0)
        centroidkv_attention(_FakeAttention(), torch.randn(1, 2, 1, 8), k, v, None)
        layer = cache.layers[0]
        recent = layer.lengths[0] - layer.head_end[0]
        assert recent < 8 + 4  # the window never holds a whole block beyond `recent`
    # 40 tokens: sink 2, then blocks of 4 -> 2 slots while the window keeps >= 8 tokens.
    clustered_tokens = (40 - 2 - 8) // 4 * 4
    assert layer.lengths[0] == 2 + clustered_tokens // 2 + (40 - 2 - clustered_tokens)
    assert float(layer.sizes[0, 0, :layer.lengths[0]].sum()) == 40.0  # sizes add up to the tokens


def test_budget_mode_keeps_rows_within_budget():
    model = tiny_model("llama", seed=8)
    cache = centroidkv.CentroidKVCache(budget=120, chunk_size=8, sink=4, recent=16)
    model.generate(torch.randint(1, VOCAB, (1, 400)), max_new_tokens=30, do_sample=False, pad_token_id=0,
                   **{cache_argument(model): cache})
    layer = cache.layers[0]
    assert cache.get_seq_length() == 429
    assert max(layer.lengths) <= 120
    assert float(layer.sizes[0, 0, :layer.lengths[0]].sum()) == 429.0


class _KeepFirstHalf(Policy):
    """A test policy: keeps the first half of each block exact, drops the rest."""

    score_window = 4

    def __init__(self):
        self.seen_scores = []

    def compress(self, segment, *, ratio, chunk_size):
        self.seen_scores.append(segment.scores)
        half = segment.length // 2
        return Segment(segment.keys[:, :, :half], segment.values[:, :, :half], segment.sizes[:, :, :half],
                       segment.scores[:, :, :half])


def test_custom_policy_receives_observation_scores():
    model = tiny_model("llama", seed=9)
    policy = _KeepFirstHalf()
    cache = centroidkv.CentroidKVCache(ratio=0.5, chunk_size=8, sink=4, recent=16, policy=policy)
    with torch.no_grad():
        model(torch.randint(1, VOCAB, (1, 100)), use_cache=True, **{cache_argument(model): cache})
    assert len(policy.seen_scores) == 2  # one call per layer
    scores = policy.seen_scores[0]
    assert scores.shape == (1, 2, 80) and bool((scores >= 0).all()) and float(scores.sum()) > 0
    assert cache.live_slots(0) == [4 + 40 + 16]


class _KeepFirstHalfAccumulating(_KeepFirstHalf):
    accumulate_scores = True


@pytest.mark.parametrize("policy_type", [_KeepFirstHalf, _KeepFirstHalfAccumulating])
def test_window_policies_observe_prefill_only(policy_type):
    # A SnapKV-style window ranks tokens by the prompt's last queries: decode steps leave the
    # scores alone (no extra pass over the cache); an accumulating (H2O-style) policy adds to them.
    model = tiny_model("llama", seed=9)
    cache = centroidkv.CentroidKVCache(ratio=0.5, chunk_size=8, sink=4, recent=16, policy=policy_type())
    name = cache_argument(model)
    with torch.no_grad():
        model(torch.randint(1, VOCAB, (1, 40)), use_cache=True, **{name: cache})
        layer = cache.layers[0]
        before = layer.scores[:, :, :layer.lengths[0]].clone()
        model(torch.randint(1, VOCAB, (1, 1)), position_ids=torch.tensor([[40]]), use_cache=True,
              **{name: cache})
    after = layer.scores[:, :, :before.shape[2]]
    assert float(before.sum()) > 0
    if policy_type.accumulate_scores:
        assert bool((after > before).any())
    else:
        assert torch.equal(after, before)


@pytest.mark.parametrize("kwargs,match", [
    (dict(ratio=1.0), "ratio"), (dict(ratio=-0.1), "ratio"), (dict(chunk_size=7), "chunk_size"),
    (dict(sink=-1), "sink"), (dict(budget=10), "budget"), (dict(policy="plain"), "policy"),
    (dict(ratio="0.5"), "ratio must be a number"), (dict(ratio=torch.tensor(0.5)), "ratio must be a number"),
    (dict(chunk_size=8.0), "chunk_size must be an integer"), (dict(recent=True), "recent must be an integer"),
])
def test_bad_options_are_rejected(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        centroidkv.CentroidKVCache(**kwargs)


def test_numpy_numbers_are_numbers():
    numpy = pytest.importorskip("numpy")
    cache = centroidkv.CentroidKVCache(numpy.float32(0.5), chunk_size=numpy.int64(8), sink=numpy.int32(2))
    assert (cache.options.ratio, cache.options.chunk_size, cache.options.sink) == (0.5, 8, 2)
    assert type(cache.options.chunk_size) is int


def test_plain_policy_block_sizes():
    policy = PlainClustering()
    assert policy.block_size(0.5, 32) == 32
    assert policy.block_size(0.75, 32) == 64
    assert policy.block_size(0.875, 32) == 128
    with pytest.raises(ValueError, match="metric"):
        PlainClustering(metric="values")


@pytest.mark.parametrize("search", [dict(num_beams=3), dict(num_beams=3, num_return_sequences=2),
                                    dict(do_sample=True, top_k=5, num_return_sequences=2)])
def test_beam_search_and_several_sequences_reorder_the_cache(search):
    model = tiny_model("llama", seed=3)
    name = cache_argument(model)
    torch.manual_seed(0)
    short, long = torch.randint(1, VOCAB, (2, 40)), torch.randint(1, VOCAB, (2, 300))
    options = dict(ratio=0.5, chunk_size=8)

    def generate(prompt, **cache):
        torch.manual_seed(1)
        return model.generate(prompt, max_new_tokens=8, pad_token_id=0, **search, **cache)

    # Nothing leaves the recent window: beams reordered in the cache must give stock's output.
    assert torch.equal(generate(short, **{name: centroidkv.CentroidKVCache(**options, recent=64)}), generate(short))
    if search.get("do_sample"):
        return
    # Clustered prompts: rows stay independent through the beams' reordering.
    both = generate(long, **{name: centroidkv.CentroidKVCache(**options, recent=16)})
    per_row = both.shape[0] // 2
    for row in range(2):
        alone = generate(long[row:row + 1], **{name: centroidkv.CentroidKVCache(**options, recent=16)})
        assert torch.equal(both[row * per_row:(row + 1) * per_row], alone)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_other_attention_implementations_are_refused_not_approximated(attn):
    model = tiny_model("llama", attn=attn, seed=2)
    cache = centroidkv.CentroidKVCache(ratio=0.5, chunk_size=8, recent=16)
    with pytest.raises(ValueError, match="attn_implementation='centroidkv'"):
        centroidkv.prefill(model, torch.randint(1, VOCAB, (1, 100)), cache)
    # generate: the first forward is exact (nothing clustered yet); the next one would not be.
    with pytest.raises(RuntimeError, match="attn_implementation='centroidkv'"):
        model.generate(torch.randint(1, VOCAB, (1, 100)), max_new_tokens=3, do_sample=False, pad_token_id=0,
                       **{cache_argument(model): cache})


def test_reset_forgets_everything_a_model_left_and_another_model_is_refused():
    gemma, llama = tiny_model("gemma3", seed=6), tiny_model("llama", seed=6)
    prompt = torch.randint(1, VOCAB, (1, 120))
    cache = centroidkv.CentroidKVCache(ratio=0.0)
    with torch.no_grad():
        gemma(prompt, use_cache=True, **{cache_argument(gemma): cache})
        assert cache.layers[0].sliding_window is not None
        half = tiny_model("llama", seed=6).half()
        with pytest.raises(ValueError, match="one cache per model and dtype"):
            half(prompt, use_cache=True, **{cache_argument(half): cache})
        cache.reset()
        ours = llama(prompt, use_cache=True, **{cache_argument(llama): cache}).logits
    assert all(layer.sliding_window is None for layer in cache.layers)
    assert max(cache.live_slots(0)) == 120  # no window left over from Gemma's sliding layer
    stock = tiny_model("llama", attn="sdpa", seed=6)(prompt).logits
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)
