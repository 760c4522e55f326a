"""Token-surprisal protection: protection_scores, the cache's deferred clustering, centroidkv.prefill."""
import pytest
import torch

pytest.importorskip("transformers")

import centroidkv  # noqa: E402
from centroidkv.cache import cache_argument  # noqa: E402
from centroidkv.policies import ProtectedClustering  # noqa: E402
from centroidkv.policies.protection import (pooled_scores, protection_scores, run_minimum,  # noqa: E402
                                            spread_scores, top_tokens, window_ranking)


def _scores(heads=2, length=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, heads, length, generator=g), 5 * torch.rand(1, 1, length, generator=g)


@pytest.mark.parametrize("taper", [1.0, 0.5, 0.0])
def test_pooled_scores_taper_matches_its_definition(taper):
    """Each token takes the largest of its neighbours' scores, weighted 1 within core // 2 and
    `taper` within kernel // 2 (the edges see only real tokens)."""
    scores = torch.rand(1, 2, 67, generator=torch.Generator().manual_seed(3))
    expected = torch.empty_like(scores)
    for j in range(67):
        near = [scores[..., i] * (1.0 if abs(i - j) <= 3 else taper) for i in range(max(0, j - 15), min(67, j + 16))]
        expected[..., j] = torch.stack(near, -1).amax(-1)
    torch.testing.assert_close(pooled_scores(scores, 31, taper, core=7), expected)


@pytest.mark.parametrize("span", [(0, 12), (2, 12), (5, 0), (7, 7), (0, 0), (40, 3)])
def test_spread_scores_matches_its_definition(span):
    """Token j takes the largest score of the tokens that lend to it: those at most span[1]
    before it and span[0] after it (a token lends backward span[0], forward span[1])."""
    before, after = span
    scores = torch.randn(2, 3, 37, generator=torch.Generator().manual_seed(5))
    expected = torch.stack([scores[..., max(0, j - after):j + before + 1].amax(-1) for j in range(37)], -1)
    torch.testing.assert_close(spread_scores(scores, span), expected)
    if before == after:
        torch.testing.assert_close(spread_scores(scores, span), pooled_scores(scores, 2 * before + 1))


def test_info_span_reaches_forward_from_a_surprising_token():
    """With info_span (0, 12) the protected slots are a surprising token and the 12 after it,
    nothing before it; the symmetric default spends half of them before it."""
    info = torch.zeros(1, 1, 100)
    info[0, 0, 40] = 9.0
    window = torch.zeros(1, 2, 100)
    forward = top_tokens(protection_scores(window, info, 13, info_share=1.0, info_span=(0, 12)), 13)[0]
    assert forward[0, 0].tolist() == list(range(40, 53))
    both = top_tokens(protection_scores(window, info, 13, info_share=1.0, info_span=(6, 6)), 13)[0]
    assert both[0, 1].tolist() == list(range(34, 47))


@pytest.mark.parametrize("run", [1, 3, 7])
def test_run_minimum_matches_its_definition(run):
    """Each token takes the smallest score within run // 2 of it (the edges see only real tokens)."""
    scores = torch.randn(2, 3, 29, generator=torch.Generator().manual_seed(6))
    expected = torch.stack([scores[..., max(0, j - run // 2):j + run // 2 + 1].amin(-1) for j in range(29)], -1)
    torch.testing.assert_close(run_minimum(scores, run), expected)


def test_info_run_prefers_a_run_of_unpredictable_tokens_to_one_rare_word():
    """Prose-like surprisal (a predictable token every third position, one rare word of 12 nats)
    and a seven-digit code of 2.5 nats each: by surprisal alone the rare word ranks first, by
    runs of seven the code does (its middle digit, the one token whose run is all code), and
    info_span (10, 4) keeps the ten tokens before that and four after: the code and the seven
    tokens before it (its name)."""
    info = torch.tensor([3.0, 4.0, 0.2] * 40)[None, None]
    info[0, 0, 30] = 12.0
    info[0, 0, 80:87] = 2.5
    info[0, 0, [79, 87]] = 0.2  # "is" before it, "." after it
    window = torch.zeros(1, 1, 120)
    rare_first = top_tokens(protection_scores(window, info, 1, info_share=1.0, info_span=(0, 0)), 1)[0]
    assert rare_first.flatten().tolist() == [30]
    kept = top_tokens(protection_scores(window, info, 15, info_share=1.0, info_span=(10, 4), info_run=7), 15)[0]
    assert kept.flatten().tolist() == list(range(73, 88))


@pytest.mark.parametrize("taper", [0.0, 0.25])
@pytest.mark.parametrize("wide_share", [0.0, 0.3, 1.0])
def test_window_ranking_tiers_match_their_definition(wide_share, taper):
    """The top round(wide_share * slots) by the untapered pool rank first; every other token keeps
    its tapered-pool score, below them."""
    window = torch.rand(1, 2, 150, generator=torch.Generator().manual_seed(6))
    ranking = window_ranking(window, 60, pool=31, taper=taper, wide_share=wide_share)
    tapered, wide = pooled_scores(window, 31, taper), pooled_scores(window, 31)
    torch.testing.assert_close(window_ranking(window, 60, pool=7, taper=taper, wide_share=wide_share),
                               pooled_scores(window, 7))  # a pool no wider than the core: one tier
    count = round(wide_share * 60)
    if count == 0:
        torch.testing.assert_close(ranking, tapered)
        return
    top = ranking > tapered.amax(-1, keepdim=True)
    assert (top.sum(-1) == count).all()
    torch.testing.assert_close(ranking[~top], tapered[~top])
    for h in range(2):  # the wide tier is the best by the untapered pool
        assert wide[0, h][top[0, h]].min() >= wide[0, h][~top[0, h]].max()


def test_protection_scores_split_between_window_and_surprisal():
    window, info = _scores()
    protect = 40
    ranking = protection_scores(window, info, protect, info_share=0.25, pool=7, info_span=(15, 15))
    kept = set(top_tokens(ranking, protect)[0][0, 1].tolist())
    by_window = top_tokens(pooled_scores(window, 7), 30)[0][0, 1].tolist()
    assert set(by_window) <= kept and len(kept) == protect
    rest = pooled_scores(info.expand(1, 2, -1), 31)[0, 1].clone()
    rest[by_window] = float("-inf")
    assert kept - set(by_window) == set(rest.sort(descending=True, stable=True).indices[:10].tolist())


def test_protection_scores_fall_back_to_the_window():
    window, info = _scores()
    expected = pooled_scores(window, 7)
    for missing in (None, torch.zeros_like(info)):  # no surprisal handed over: window only
        assert torch.equal(protection_scores(window, missing, 40, info_share=0.5, pool=7), expected)
    assert torch.equal(protection_scores(window, info, 40, info_share=0.0, pool=7), expected)


def _model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="centroidkv")
    return LlamaForCausalLM(config).eval()


def test_prefill_hands_the_cache_each_tokens_surprisal(monkeypatch):
    model = _model()
    ids = torch.randint(0, 97, (2, 300), generator=torch.Generator().manual_seed(1))
    seen = {}
    monkeypatch.setattr(centroidkv.CentroidKVCache, "observe_tokens",
                        lambda self, scores, real=None: seen.update(scores=scores, real=real))
    cache = centroidkv.CentroidKVCache(ratio=0.5, policy=ProtectedClustering(info_share=0.5))
    last = centroidkv.prefill(model, ids, cache, logits_chunk=64)  # several chunks, a short last one
    with torch.no_grad():
        logits = model(ids).logits.float()
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(seen["scores"][:, 1:], nll, atol=1e-4, rtol=1e-4)
    assert (seen["scores"][:, 0] == 0).all() and seen["real"] is None
    torch.testing.assert_close(last, logits[:, -1], atol=1e-4, rtol=1e-4)


def test_clustering_waits_for_token_scores_only_inside_prefill(monkeypatch):
    model = _model()
    ids = torch.randint(0, 97, (1, 300), generator=torch.Generator().manual_seed(2))
    window_only = centroidkv.CentroidKVCache(ratio=0.75, policy=ProtectedClustering(info_share=0.0))
    with torch.no_grad():
        model(ids, **{cache_argument(model): window_only})
    clustered = window_only.live_slots()[0]
    assert clustered < 300

    # A plain forward clusters at once; with no token scores the window ranks everything.
    plain = centroidkv.CentroidKVCache(ratio=0.75, policy=ProtectedClustering(info_share=0.5))
    with torch.no_grad():
        model(ids, **{cache_argument(model): plain})
    assert plain.live_slots() == [clustered]
    assert torch.equal(plain.layers[1].keys[:, :, :clustered], window_only.layers[1].keys[:, :, :clustered])

    # Inside prefill the layers hold the prompt until the scores arrive, then cluster it.
    held = []
    observe = centroidkv.CentroidKVCache.observe_tokens
    monkeypatch.setattr(centroidkv.CentroidKVCache, "observe_tokens",
                        lambda self, *a, **k: (held.append(self.live_slots()), observe(self, *a, **k)))
    handed = centroidkv.CentroidKVCache(ratio=0.75, policy=ProtectedClustering(info_share=0.5))
    centroidkv.prefill(model, ids, handed)
    assert held == [[300]] and handed.live_slots() == [clustered]  # same budget
    assert handed.memory_bytes().total == plain.memory_bytes().total  # and the prompt's buffers freed
    assert not handed.token_score_gate.waiting
    with pytest.raises(ValueError, match="token scores"):
        handed.observe_tokens(torch.zeros(1, 7))
    with pytest.raises(RuntimeError, match="token_score_gate"):  # already clustered: slots moved
        handed.observe_tokens(torch.zeros(1, 300))


def test_surprisal_protects_the_surprising_tokens():
    """With every protected slot ranked by surprisal, the tokens handed the highest scores stay exact."""
    model = _model()
    ids = torch.randint(0, 97, (1, 300), generator=torch.Generator().manual_seed(3))
    cache = centroidkv.CentroidKVCache(ratio=0.5, sink=4, recent=64,
                                       policy=ProtectedClustering(info_share=1.0, num_merge=None))
    cache.token_score_gate.waiting = True  # as inside centroidkv.prefill
    with torch.no_grad():
        model(ids, **{cache_argument(model): cache})
    cache.token_score_gate.waiting = False
    keys_before = cache.layers[0].keys[0, :, :300].clone()
    scores = torch.zeros(1, 300)
    scores[0, 100] = 50.0  # one surprising token in the clustered region
    cache.observe_tokens(scores)
    layer = cache.layers[0]
    live = layer.keys[0, :, :layer.lengths[0]]
    for head in range(live.shape[0]):  # the key of token 100 survives exactly, with size 1
        match = (live[head] == keys_before[head, 100]).all(-1)
        assert match.any() and layer.sizes[0, head, :layer.lengths[0]][match].eq(1).all()


@pytest.mark.parametrize("policy", [lambda: ProtectedClustering(info_share=0.5), ProtectedClustering.query_agnostic],
                         ids=["info_share=0.5", "query_agnostic"])
def test_prefill_with_padding_and_generate(policy):
    model = _model()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 97, (2, 260), generator=g)
    mask = torch.ones(2, 260, dtype=torch.long)
    mask[1, :40] = 0  # row 1 is left-padded
    cache = centroidkv.CentroidKVCache(ratio=0.5, policy=policy())
    centroidkv.prefill(model, ids[:, :-1], cache, attention_mask=mask[:, :-1])
    alone = centroidkv.CentroidKVCache(ratio=0.5, policy=policy())
    centroidkv.prefill(model, ids[1:, 40:-1], alone)
    assert cache.live_slots()[1] == alone.live_slots()[0]  # padding dropped, same layout as alone
    out = model.generate(ids, attention_mask=mask, **{cache_argument(model): cache}, max_new_tokens=4,
                         do_sample=False)
    assert out.shape == (2, 264)


def test_prefill_without_token_scores_is_a_plain_prefill():
    model = _model()
    ids = torch.randint(0, 97, (1, 200), generator=torch.Generator().manual_seed(5))
    cache = centroidkv.CentroidKVCache(ratio=0.5, policy=ProtectedClustering(info_share=0.0))
    last = centroidkv.prefill(model, ids, cache)
    reference = centroidkv.CentroidKVCache(ratio=0.5, policy=ProtectedClustering(info_share=0.0))
    with torch.no_grad():
        logits = model(ids, **{cache_argument(model): reference}).logits[:, -1]
    torch.testing.assert_close(last, logits)
    assert cache.live_slots() == reference.live_slots() and cache.layers[0].info is None


def test_prefill_validates_arguments():
    model = _model()
    with pytest.raises(TypeError, match="cache"):
        centroidkv.prefill(model, torch.zeros(1, 5, dtype=torch.long), object())
    cache = centroidkv.CentroidKVCache(ratio=0.5)
    with pytest.raises(ValueError, match="input_ids"):
        centroidkv.prefill(model, torch.zeros(5, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="attention_mask"):
        centroidkv.prefill(model, torch.zeros(1, 5, dtype=torch.long), cache, attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="info_share"):
        ProtectedClustering(info_share=1.5)


def test_query_agnostic_preset_ranks_every_protected_slot_by_surprisal():
    policy = ProtectedClustering.query_agnostic(pool=7)
    assert policy == ProtectedClustering(info_share=1.0, pool=7, info_run=7, info_span=(10, 4), size_bias=0.5)
    assert policy.token_scores
    window = torch.rand(1, 2, 200, generator=torch.Generator().manual_seed(5))
    info = torch.zeros(1, 1, 200)
    info[..., 117:124] = 3.0  # a run of seven unpredictable tokens; the window favours others everywhere
    info[..., 40] = 12.0  # one rare word: not a run
    ranking = protection_scores(window, info, 40, policy.info_share, policy.pool, policy.info_span,
                                info_run=policy.info_run)
    around = torch.zeros(200, dtype=torch.bool)
    before, after = policy.info_span
    around[120 - before:121 + after] = True  # the run's centre and its span are protected in both heads
    chosen = ranking == ranking.amax(-1, keepdim=True)
    assert chosen[..., around].all() and chosen.sum(-1).eq(40).all()
    window_only = protection_scores(window, None, 40, 0.0, policy.pool)
    assert not (window_only[..., around].amin(-1) > window_only[..., ~around].amax(-1)).any()
    with pytest.raises(ValueError, match="info_share"):
        ProtectedClustering.query_agnostic(info_share=2.0)
