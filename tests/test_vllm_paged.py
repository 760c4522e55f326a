"""The vLLM plugin's plan and paged tensor work (no vLLM needed): a request fed through paged
blocks in shuffled order holds, slot for slot, what CentroidKVCache holds for the same tokens."""

import pytest
import torch

import centroidkv
from centroidkv import reference
from centroidkv.vllm.paged import attend, attend_decodes, attend_fresh, cluster_groups, gather_blocks, write_tokens
from centroidkv.vllm.plan import MergePlan
from centroidkv.vllm.step import StepPlan

transformers = pytest.importorskip("transformers")
from centroidkv.hf_attention import centroidkv_attention  # noqa: E402
from centroidkv.policies import PlainClustering  # noqa: E402


class _Module(torch.nn.Module):
    training = False


@pytest.mark.parametrize("ratio, block_size, group, kept", [
    (0.5, 32, 2, 1), (0.75, 32, 4, 1), (0.875, 32, 8, 1), (0.75, 16, 4, 1), (0.75, 64, 4, 1), (0.0, 32, 0, 0)])
def test_plan_groups_fill_whole_blocks(ratio, block_size, group, kept):
    plan = MergePlan.build(block_size=block_size, ratio=ratio, chunk_size=16)
    assert (plan.group_blocks, plan.kept_blocks) == (group, kept)


def test_plan_counts_and_dead_blocks():
    plan = MergePlan.build(block_size=4, ratio=0.75, chunk_size=4, sink=3, recent=6)
    assert (plan.sink_blocks, plan.group_blocks, plan.kept_blocks) == (1, 4, 1)
    # A group (blocks 1-4, positions 4..19) clusters once 19 is `recent` tokens old: n >= 26.
    assert plan.clustered_groups(25) == 0 and plan.clustered_groups(26) == 1
    assert plan.dead_blocks(26) == [2, 3, 4]
    assert plan.live_blocks(26) == [0, 1, 5, 6]
    assert plan.live_tokens(26) == 26 - 12
    assert plan.clustered_groups(42) == 2 and plan.dead_blocks(42) == [2, 3, 4, 6, 7, 8]


@pytest.mark.parametrize("kwargs, match", [
    ({"ratio": 0.99, "chunk_size": 4}, "whole blocks"), ({"ratio": 1.0}, "ratio"), ({"ratio": 0.5, "chunk_size": 3}, "chunk_size"),
    ({"ratio": 0.5, "recent": -1}, "recent"), ({"ratio": "x"}, "ratio")])
def test_plan_rejects_bad_options(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MergePlan.build(block_size=32, **kwargs)


def test_write_tokens_skips_padding_slots():
    keys, values = torch.zeros(3, 2, 4, 5), torch.zeros(3, 2, 4, 5)
    sizes = torch.zeros(3, 2, 4)
    k, v = torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    write_tokens(keys, values, sizes, k, v, torch.tensor([9, -1, 2]))
    assert torch.equal(keys[2, :, 1], k[0]) and torch.equal(values[0, :, 2], v[2])
    assert float(sizes.sum()) == 2 * 2  # two tokens, two heads
    assert gather_blocks(keys, torch.tensor([2, 0]), 6).shape == (2, 6, 5)


@pytest.mark.parametrize("ratio", [0.5, 0.75])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_request_matches_centroidkv_cache(ratio, dtype):
    """Prefill then decode, one layer. The cache clusters smaller blocks as they leave its window,
    the plan whole groups, so both have clustered the same tokens at some lengths only: there the
    live slots are equal, and so is the next step's attention output."""
    torch.manual_seed(11)
    bs, chunk, heads, q_heads, dim, recent = 8, 4, 2, 4, 16, 12
    plan = MergePlan.build(block_size=bs, ratio=ratio, chunk_size=chunk, sink=bs, recent=recent)
    cache = centroidkv.CentroidKVCache(ratio=ratio, chunk_size=chunk, sink=bs, recent=recent,
                                       policy=PlainClustering())
    num_blocks = 40
    key_cache = torch.zeros(num_blocks, heads, bs, dim, dtype=dtype)
    value_cache, sizes = torch.zeros_like(key_cache), torch.zeros(num_blocks, heads, bs)
    table = torch.randperm(num_blocks)[:30]  # the request's blocks, in logical order
    steps = [45, 9] + [1] * 100  # a prefill, a chunk of 9 tokens, then decode steps
    agreed, compared, held = 0, 0, 0
    for new in steps:
        layouts_agree = held == 0 or cache.layers[0].lengths[0] == plan.live_tokens(held)
        k = torch.randn(1, heads, new, dim, dtype=dtype)
        v, q = torch.randn_like(k), torch.randn(1, q_heads, new, dim, dtype=dtype)
        positions = torch.arange(held, held + new)
        slots = table[positions // bs] * bs + positions % bs
        write_tokens(key_cache, value_cache, sizes, k[0].transpose(0, 1), v[0].transpose(0, 1), slots)
        step = StepPlan.build(plan, [held + new], [0, new], table[None])
        if new == 1:
            got = attend_decodes(q[0].transpose(0, 1), key_cache, value_cache, sizes, step.decode_blocks,
                                 step.decode_lengths, 0.25)
        elif held == 0:
            assert step.fresh == [(0, new)] and not step.prefills
            got = attend_fresh(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), 0.25)
        else:
            (_, _, live, live_tokens), = step.prefills
            got = attend(q[0].transpose(0, 1), key_cache, value_cache, sizes, live, live_tokens, 0.25)
        k_view, v_view = cache.update(k, v, 0)
        want = centroidkv_attention(_Module(), q, k_view, v_view, None, scaling=0.25)[0][0]
        if layouts_agree:
            compared += 1
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        cluster_groups(key_cache, value_cache, sizes, step.groups, plan)
        held += new
        layer = cache.layers[0]
        if layer.lengths[0] == plan.live_tokens(held):
            agreed += 1
            live = table[plan.live_blocks(held)]
            n = layer.lengths[0]
            assert torch.equal(gather_blocks(key_cache, live, n), layer.keys[0, :, :n])
            assert torch.equal(gather_blocks(value_cache, live, n), layer.values[0, :, :n])
            assert torch.equal(gather_blocks(sizes, live, n), layer.sizes[0, :, :n])
    assert agreed > 10 and compared > 10 and plan.clustered_groups(held) >= 3
    assert float(gather_blocks(sizes, table[plan.live_blocks(held)], plan.live_tokens(held)).sum()) == heads * held


def test_cluster_groups_keeps_each_head_apart_and_preserves_sums():
    torch.manual_seed(2)
    plan = MergePlan.build(block_size=4, ratio=0.75, chunk_size=4, sink=0, recent=0)
    keys = torch.randn(10, 3, 4, 8)
    values, sizes = torch.randn_like(keys), torch.rand(10, 3, 4) + 0.5
    groups = torch.tensor([[7, 2, 5, 0], [1, 9, 3, 8]])
    before_v = [(gather_blocks(values, g, 16) * gather_blocks(sizes, g, 16)[..., None]).sum(1) for g in groups]
    before_s = [gather_blocks(sizes, g, 16).sum(1) for g in groups]
    expected = []
    for g in groups:  # two reference passes of r = c/2 (SPEC.md: ratio 0.75)
        merged = (gather_blocks(keys, g, 16)[None], gather_blocks(values, g, 16)[None], gather_blocks(sizes, g, 16)[None])
        for _ in range(2):
            merged = reference.merge(*merged, 4, 2)
        expected.append(merged)
    untouched = keys[[4, 6]].clone()
    cluster_groups(keys, values, sizes, groups, plan)
    for g, want, v_sum, s_sum in zip(groups, expected, before_v, before_s):
        kept = g[:1]
        torch.testing.assert_close(gather_blocks(keys, kept, 4), want[0][0])
        torch.testing.assert_close(gather_blocks(sizes, kept, 4), want[2][0])
        torch.testing.assert_close((gather_blocks(values, kept, 4) * gather_blocks(sizes, kept, 4)[..., None]).sum(1), v_sum)
        torch.testing.assert_close(gather_blocks(sizes, kept, 4).sum(1), s_sum)
    assert torch.equal(keys[[4, 6]], untouched)


def test_each_head_clusters_alone_as_a_tensor_parallel_rank_would():
    torch.manual_seed(4)
    plan = MergePlan.build(block_size=8, ratio=0.75, chunk_size=4, sink=0, recent=0)
    keys = torch.randn(12, 3, 8, 16)
    values, sizes = torch.randn_like(keys), torch.ones(12, 3, 8)
    groups = torch.tensor([[3, 1, 7, 10]])
    alone = []
    for head in range(3):  # a rank holding this head only
        k, v, s = (t[:, head:head + 1].clone() for t in (keys, values, sizes))
        cluster_groups(k, v, s, groups, plan)
        alone.append((k, v, s))
    cluster_groups(keys, values, sizes, groups, plan)
    for head, (k, v, s) in enumerate(alone):
        assert torch.equal(keys[:, head:head + 1], k) and torch.equal(values[:, head:head + 1], v)
        assert torch.equal(sizes[:, head:head + 1], s)


def test_paged_work_through_views_of_a_token_major_layout():
    """vLLM's CUDA backends keep [blocks, block_size, H, D] (FlashAttention's layout); the tensor
    work runs unchanged on a [blocks, H, block_size, D] view of it, writing through the view."""
    torch.manual_seed(5)
    plan = MergePlan.build(block_size=8, ratio=0.5, chunk_size=4, sink=0, recent=0)
    token_major = torch.zeros(2, 6, 8, 3, 16)  # [K/V, blocks, bs, H, D]
    key_view, value_view = token_major[0].transpose(1, 2), token_major[1].transpose(1, 2)
    head_major = torch.zeros(2, 6, 3, 8, 16)
    sizes_a, sizes_b = torch.zeros(6, 3, 8), torch.zeros(6, 3, 8)
    k, v = torch.randn(16, 3, 16), torch.randn(16, 3, 16)
    slots = torch.cat([torch.arange(8) + 8 * 4, torch.arange(8) + 8 * 1])
    write_tokens(key_view, value_view, sizes_a, k, v, slots)
    write_tokens(head_major[0], head_major[1], sizes_b, k, v, slots)
    assert torch.equal(token_major[0, 4, 3], k[3])  # written through the view
    groups = torch.tensor([[4, 1]])
    cluster_groups(key_view, value_view, sizes_a, groups, plan)
    cluster_groups(head_major[0], head_major[1], sizes_b, groups, plan)
    assert torch.equal(key_view, head_major[0]) and torch.equal(value_view, head_major[1])
    assert torch.equal(sizes_a, sizes_b)
    q = torch.randn(2, 6, 16)
    torch.testing.assert_close(attend(q, key_view, value_view, sizes_a, groups[0], 16, 0.3),
                               attend(q, head_major[0], head_major[1], sizes_b, groups[0], 16, 0.3))


def test_decode_requests_attend_in_one_padded_call_as_alone():
    """A step with requests of different lengths, decodes and a prefill mixed: the batched decode
    attention equals each request's own, and the plan lists the groups every request clusters."""
    torch.manual_seed(6)
    plan = MergePlan.build(block_size=4, ratio=0.5, chunk_size=4, sink=4, recent=4)
    keys = torch.randn(64, 2, 4, 8)
    values, sizes = torch.randn_like(keys), torch.rand(64, 2, 4) + 0.5
    table = torch.randperm(64)[:64].view(4, 16)
    seq_lens, starts = [23, 9, 40, 3], [0, 1, 6, 7, 10]  # decode, 5-token prefill chunk, decode, new prompt
    step = StepPlan.build(plan, seq_lens, starts, table)
    assert step.decode_tokens.tolist() == [0, 6] and [p[:2] for p in step.prefills] == [(1, 6)]
    assert step.fresh == [(7, 10)]
    assert step.decode_lengths.tolist() == [plan.live_tokens(23, 22), plan.live_tokens(40, 39)]
    want_groups = [table[r, plan.first_block(g):plan.first_block(g) + 2].tolist()
                   for r, (after, new) in enumerate(zip(seq_lens, [1, 5, 1, 3]))
                   for g in range(plan.clustered_groups(after - new), plan.clustered_groups(after))]
    assert step.groups.tolist() == want_groups and len(want_groups) >= 1
    q = torch.randn(2, 4, 8)
    batched = attend_decodes(q, keys, values, sizes, step.decode_blocks, step.decode_lengths, 0.5)
    for i, (row, after) in enumerate([(0, 23), (2, 40)]):
        live = table[row][plan.live_blocks(after, clustered_at=after - 1)]
        alone = attend(q[i:i + 1], keys, values, sizes, live, plan.live_tokens(after, after - 1), 0.5)
        torch.testing.assert_close(batched[i:i + 1], alone)
