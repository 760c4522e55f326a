"""cluster_budget: plan_merge against the reference match, exact budgets and conservation."""
import pytest
import torch

from centroidkv import reference
from centroidkv.policies.cluster_budget import cluster_to_budget, plan_merge

SHAPES = [(1, 1, 8), (2, 3, 64), (1, 2, 97), (1, 1, 130)]  # awkward lengths: tails pass through


@pytest.mark.parametrize("batch,heads,length", SHAPES)
@pytest.mark.parametrize("chunk,r", [(2, 1), (8, 2), (8, 4), (32, 16)])
def test_plan_matches_reference_uniform(batch, heads, length, chunk, r):
    metric = torch.randn(batch, heads, length, 5)
    slots, out_len = plan_merge(metric, chunk, r)
    assert torch.equal(slots, reference.match(metric, chunk, r))
    assert out_len == (length // chunk) * (chunk - r) + length % chunk


def test_plan_global_budget_merges_best_pairs():
    metric = torch.randn(2, 2, 64, 8)
    slots, out_len = plan_merge(metric, 16, 8, max_merged=5)
    assert out_len == 59
    assert int(slots.max()) == 58
    # every output slot is used; each output slot holds at most 1 + (c/2) tokens
    for row in slots.reshape(-1, 64):
        counts = torch.bincount(row, minlength=59)
        assert (counts >= 1).all() and int(counts.sum()) == 64


@pytest.mark.parametrize("partition", ["alternating", "halves"])
@pytest.mark.parametrize("metric", ["keys", "keys+values"])
@pytest.mark.parametrize("chunk,r", [(8, None), (32, 8), (128, None)])
@pytest.mark.parametrize("budget", [0.5, 0.25, 0.3])
def test_cluster_to_budget_exact_and_conserving(partition, metric, chunk, r, budget):
    keys, values = torch.randn(1, 3, 256, 16), torch.randn(1, 3, 256, 12)
    target = int(256 * budget)
    k, v, s = cluster_to_budget(keys, values, None, target, chunk, r, metric, partition)
    assert k.shape == (1, 3, target, 16) and v.shape == (1, 3, target, 12) and s.shape == (1, 3, target)
    # conservation up to fp32 summation error over 256 tokens
    torch.testing.assert_close(s.sum(-1), torch.full((1, 3), 256.0))
    torch.testing.assert_close((s[..., None] * v).sum(2), values.sum(2), atol=1e-3, rtol=1e-4)


def test_cluster_to_budget_rejects_bad_budget():
    x = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match="budget"):
        cluster_to_budget(x, x, None, 9)
