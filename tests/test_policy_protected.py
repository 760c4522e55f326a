"""Product recall policies inside CentroidKVCache: lengths, exact protected tokens, generation."""
import pytest
import torch

pytest.importorskip("transformers")

from centroidkv.policies import AbsorbIntoSurvivors, ProtectedClustering, Segment  # noqa: E402


def _segment(length=128, heads=2, seed=0, scores=True):
    g = torch.Generator().manual_seed(seed)
    return Segment(torch.randn(1, heads, length, 16, generator=g), torch.randn(1, heads, length, 8, generator=g),
                   torch.ones(1, heads, length), torch.rand(1, heads, length, generator=g) if scores else None)


@pytest.mark.parametrize("policy", [ProtectedClustering(), ProtectedClustering(protect_fraction=0.5, num_merge=None),
                                    AbsorbIntoSurvivors(), AbsorbIntoSurvivors(protect_fraction=0.0)])
@pytest.mark.parametrize("ratio", [0.5, 0.75])
@pytest.mark.parametrize("with_scores", [True, False])
def test_compress_length_and_weight(policy, ratio, with_scores):
    seg = _segment(scores=with_scores)
    out = policy.compress(seg, ratio=ratio, chunk_size=32)
    assert out.length == round(128 * (1 - ratio))
    torch.testing.assert_close(out.sizes.sum(-1), torch.full((1, 2), 128.0))  # no token's weight lost
    shrunk = policy.shrink(out, chunk_size=32)
    assert shrunk.length == round(out.length / 2)


def test_protected_tokens_are_exact_and_keep_scores():
    seg = _segment()
    out = ProtectedClustering(protect_fraction=0.5, pool=1).compress(seg, ratio=0.5, chunk_size=32)
    top = seg.scores.sort(-1, descending=True).indices[..., :32].sort(-1).values
    assert torch.equal(out.keys[:, :, :32], seg.keys.gather(2, top[..., None].expand(-1, -1, -1, 16)))
    assert torch.equal(out.scores[:, :, :32], seg.scores.gather(2, top))


def _one_strong_many_weak_peaks() -> Segment:
    seg = _segment(length=256, heads=1)
    seg.scores = torch.zeros(1, 1, 256)
    seg.scores[..., 100] = 10.0
    seg.scores[..., 20::60] = 1.0
    return seg


def _exact_tokens(policy: ProtectedClustering, seg: Segment) -> set[int]:
    """Positions of the tokens kept in the exact slots at ratio 0.75 (63 of them)."""
    out = policy.compress(seg, ratio=0.75, chunk_size=32)
    return {t for t in range(256) if (out.keys[0, 0, :63] == seg.keys[0, 0, t]).all(-1).any()}


WEAK_PEAKS = [20, 80, 140, 200]


def test_tapered_pool_protects_the_strong_peaks_sentence():
    """One strong and many weak peaks: with taper the strong peak's 31-token neighbourhood
    stays exact, and the weak peaks' near neighbours fill the rest instead of their far ones."""
    seg = _one_strong_many_weak_peaks()
    exact = _exact_tokens(ProtectedClustering(protect_fraction=1.0, taper=0.25, info_share=0.0), seg)
    assert set(range(85, 116)) <= exact  # the whole pool around the strong peak
    assert all(set(range(p - 3, p + 4)) <= exact for p in WEAK_PEAKS)  # every weak peak's core
    exact_plain = _exact_tokens(ProtectedClustering(protect_fraction=1.0, taper=1.0, info_share=0.0), seg)
    assert not all(set(range(p - 3, p + 4)) <= exact_plain for p in WEAK_PEAKS)  # the plain pool misses some


def test_wide_tier_protects_the_strong_peaks_sentence_and_every_weak_peaks_core():
    """Two tiers on the same scores: half the window slots go to the strongest
    pool-31 neighbourhood, the rest by pool 7 cover every weak peak's 7 nearest tokens."""
    seg = _one_strong_many_weak_peaks()
    exact = _exact_tokens(ProtectedClustering(protect_fraction=1.0, info_share=0.0, wide_share=0.5, taper=0.0), seg)
    assert set(range(85, 116)) <= exact
    assert all(set(range(p - 3, p + 4)) <= exact for p in WEAK_PEAKS)
    exact_narrow = _exact_tokens(ProtectedClustering(protect_fraction=1.0, info_share=0.0, pool=7), seg)
    assert not set(range(85, 116)) <= exact_narrow  # pool 7 alone cuts the sentence


def test_validation():
    with pytest.raises(ValueError, match="protect_fraction"):
        ProtectedClustering(protect_fraction=2.0)
    with pytest.raises(ValueError, match="taper"):
        ProtectedClustering(taper=1.5)
    with pytest.raises(ValueError, match="wide_share"):
        ProtectedClustering(wide_share=-0.1)
    with pytest.raises(ValueError, match="pool"):
        AbsorbIntoSurvivors(pool=2)
    with pytest.raises(TypeError, match="pool must be an integer"):
        ProtectedClustering(pool=31.0)
    with pytest.raises(TypeError, match="protect_fraction must be a number"):
        ProtectedClustering(protect_fraction="0.5")
    with pytest.raises(TypeError, match="num_merge must be an integer"):
        ProtectedClustering(num_merge=1.5)
    for span in (15, (1, 2, 3), "15"):
        with pytest.raises(ValueError, match="info_span must be"):
            ProtectedClustering(info_span=span)
    with pytest.raises(ValueError, match="info_span must be two counts >= 0"):
        ProtectedClustering(info_span=(-1, 4))
    with pytest.raises(TypeError, match="info_span must be an integer"):
        ProtectedClustering(info_span=(1.5, 4))
    assert ProtectedClustering(info_span=[2, 12]).info_span == (2, 12)
    with pytest.raises(ValueError, match="info_run must be odd"):
        ProtectedClustering(info_run=4)
    with pytest.raises(TypeError, match="info_run must be an integer"):
        ProtectedClustering(info_run=7.0)


@pytest.mark.parametrize("policy", [ProtectedClustering(), AbsorbIntoSurvivors()])
def test_generate_with_cache(policy):
    from transformers import LlamaConfig, LlamaForCausalLM

    import centroidkv
    from centroidkv.cache import cache_argument
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="centroidkv")
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 97, (1, 300))
    cache = centroidkv.CentroidKVCache(ratio=0.75, policy=policy)
    out = model.generate(ids, **{cache_argument(model): cache}, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 305)
    assert cache.get_seq_length() == 304  # positions continue from the uncompressed length


@pytest.mark.parametrize("new_tokens", [1, 5])  # a decode step (the attention op), a chunk (prefill attention)
@pytest.mark.parametrize("max_cache_len", [None, 512])  # growing buffers, static ones (captured decode)
def test_size_bias_tempers_attention_not_the_stored_sizes(new_tokens, max_cache_len):
    import centroidkv
    from centroidkv.cache import cache_argument
    from hf_helpers import VOCAB, tiny_model
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    prompt, more = torch.randint(0, VOCAB, (1, 300), generator=g), torch.randint(0, VOCAB, (1, new_tokens), generator=g)
    name = cache_argument(model)

    @torch.no_grad()
    def run(size_bias, temper_stored=1.0):
        cache = centroidkv.CentroidKVCache(ratio=0.75, policy=ProtectedClustering(size_bias=size_bias),
                                           max_cache_len=max_cache_len)
        model(prompt, use_cache=True, **{name: cache})
        for layer in cache.layers:
            layer.sizes.pow_(temper_stored)
        logits = model(more, use_cache=True, **{name: cache}).logits
        return logits, [layer.sizes.clone() for layer in cache.layers]

    spec, spec_sizes = run(1.0)
    tempered, tempered_sizes = run(0.5)
    by_hand, _ = run(1.0, temper_stored=0.5)  # the SPEC bias over sizes tempered by hand
    assert max(s.max() for s in spec_sizes) > 1  # centroids exist: the bias has something to change
    torch.testing.assert_close(tempered, by_hand)
    assert not torch.allclose(tempered, spec, atol=1e-3)
    for true, kept in zip(spec_sizes, tempered_sizes):  # the cache keeps true sizes for later merges
        torch.testing.assert_close(kept, true)
        torch.testing.assert_close(kept.sum(-1), torch.full_like(kept.sum(-1), 300.0 + new_tokens))


def test_size_bias_validation():
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="size_bias must be in"):
            ProtectedClustering(size_bias=bad)
    with pytest.raises(TypeError, match="size_bias must be a number"):
        ProtectedClustering(size_bias="0.5")
    assert ProtectedClustering().size_bias == 1.0  # SPEC.md's proportional attention by default
