"""Shared inputs and checks for the match/merge tests (device-generic)."""
from __future__ import annotations

import itertools

import torch

from centroidkv import reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CHUNKS = [2, 8, 32, 64, 256]
DIMS = [32, 64, 128, 80]
BATCH_HEADS = [(1, 1), (2, 3), (1, 4), (3, 2)]
SIZES_KINDS = ["none", "random", "with_zeros"]
METRIC_KINDS = ["keys", "same_dtype_dm48", "fp32_dm16"]


def lengths_for(chunk: int) -> list[int]:
    """Awkward lengths: empty, shorter than a chunk, exactly one chunk, non-multiples."""
    return sorted({0, 1, chunk - 1, chunk, 97, 1025})


def num_merges_for(chunk: int) -> list[int]:
    return sorted({0, 1, chunk // 4, chunk // 2})


def cases():
    """A covering set rather than the full product: every chunk size meets every num_merge and
    length; head dims, (B, H), sizes and metric kinds cycle through those cases so each value
    appears many times without multiplying the count."""
    out = []
    counter = itertools.count()
    for c in CHUNKS:
        for r in num_merges_for(c):
            for length in lengths_for(c):
                i = next(counter)
                batch, heads = BATCH_HEADS[i % len(BATCH_HEADS)]
                out.append(dict(c=c, r=r, L=length, D=DIMS[i % len(DIMS)], B=batch, H=heads,
                                sizes=SIZES_KINDS[i % len(SIZES_KINDS)],
                                metric=METRIC_KINDS[(i // 3) % len(METRIC_KINDS)]))
    return out


def case_id(case: dict) -> str:
    return (f"c{case['c']}-r{case['r']}-L{case['L']}-D{case['D']}-B{case['B']}H{case['H']}-"
            f"{case['sizes']}-{case['metric']}")


def make_sizes(kind: str, batch: int, heads: int, length: int, device, gen) -> torch.Tensor | None:
    if kind == "none":
        return None
    sizes = torch.rand(batch, heads, length, generator=gen) * 4 + 0.25  # random positive
    if kind == "with_zeros":
        # Roughly a third zeros, so some slots have total size 0 (plain mean, size 0).
        sizes = torch.where(torch.rand(batch, heads, length, generator=gen) < 0.35, 0.0, sizes)
    return sizes.to(device)


def make_inputs(case: dict, dtype, device, seed: int = 0):
    """keys, values, sizes, metric (None = match on keys) for one case."""
    gen = torch.Generator().manual_seed(seed)
    batch, heads, length, dim = case["B"], case["H"], case["L"], case["D"]
    keys = torch.randn(batch, heads, length, dim, generator=gen).to(device, dtype)
    values = torch.randn(batch, heads, length, dim + 16, generator=gen).to(device, dtype)
    sizes = make_sizes(case["sizes"], batch, heads, length, device, gen)
    metric = None
    if case["metric"] == "same_dtype_dm48":
        metric = torch.randn(batch, heads, length, 48, generator=gen).to(device, dtype)
    elif case["metric"] == "fp32_dm16":
        metric = torch.randn(batch, heads, length, 16, generator=gen).to(device, torch.float32)
    return keys, values, sizes, metric


def similarities64(metric: torch.Tensor, c: int) -> torch.Tensor:
    """Cosine A-to-B similarity per chunk in float64 (NaN -> -inf): [B, H, n, c/2, c/2]."""
    batch, heads, length, dim = metric.shape
    n = length // c
    m = metric[:, :, : n * c].double().reshape(batch, heads, n, c, dim)
    a, b = m[..., 0::2, :], m[..., 1::2, :]
    na = a.norm(dim=-1).clamp_min(reference.EPS)
    nb = b.norm(dim=-1).clamp_min(reference.EPS)
    sim = (a @ b.transpose(-1, -2)) / (na[..., :, None] * nb[..., None, :])
    return sim.masked_fill(sim.isnan(), float("-inf"))


def assert_valid_map(slots: torch.Tensor, metric: torch.Tensor, c: int, r: int, tol: float):
    """slots is a merge map the SPEC allows when similarities within tol count as ties: the
    structure is exact (r merges per chunk, survivors in order, tail passes through); only which
    of two near-equal candidates won may differ from the reference."""
    batch, heads, length, _ = metric.shape
    n = length // c
    tail = n * (c - r) + torch.arange(length - n * c, device=slots.device)
    assert torch.equal(slots[..., n * c:], tail.expand(batch, heads, -1))
    if n == 0:
        return
    s = slots[..., : n * c].reshape(batch, heads, n, c) - (torch.arange(n, device=slots.device) * (c - r))[:, None]
    slot_a, slot_b = s[..., 0::2], s[..., 1::2]
    hit = slot_a[..., :, None] == slot_b[..., None, :]  # [.., a, b]: a landed in b's slot
    merged = hit.any(-1)
    assert (hit.sum(-1) <= 1).all()
    assert (merged.sum(-1) == r).all(), "every chunk merges exactly num_merge sources"
    keep = torch.ones(batch, heads, n, c, dtype=torch.bool, device=slots.device)
    keep[..., 0::2] = ~merged
    order = keep.long().cumsum(-1) - 1
    assert torch.equal(s[keep], order[keep]), "survivors keep their original order"
    sim = similarities64(metric, c).to(slots.device)
    best_sim = sim.max(-1).values
    chosen = torch.where(hit, sim, torch.full_like(sim, float("-inf"))).max(-1).values
    finite = torch.isfinite(best_sim)
    assert (chosen[merged & finite] >= best_sim[merged & finite] - tol).all(), "best(a) near max"
    lowest_merged = torch.where(merged, best_sim, torch.full_like(best_sim, float("inf"))).min(-1).values
    highest_kept = torch.where(~merged, best_sim, torch.full_like(best_sim, float("-inf"))).max(-1).values
    assert (lowest_merged >= highest_kept - tol).all(), "the r best-scoring sources merge"


def assert_map_matches_reference(slots: torch.Tensor, metric: torch.Tensor, c: int, r: int):
    """On CPU the kernel rounds every similarity as the reference does, so the maps are equal.
    Other devices may sum dot products in another order; there a differing map must still be
    one the SPEC allows up to ties within fp32 rounding of a cosine (1e-5)."""
    expected = reference.match(metric, c, r)
    if slots.device.type == "cpu" or torch.equal(slots, expected):
        assert torch.equal(slots, expected)
        return
    assert_valid_map(slots, metric, c, r, tol=1e-5)


def ulp_tolerance(dtype) -> dict:
    """Both sides compute the centroid in fp32 (possibly summing in another order) and round it
    once to dtype, so they differ by at most one rounding step of dtype; allow two. For fp32 the
    sums of at most c/2 + 1 terms differ by a few fp32 ulps of the largest term."""
    if dtype == torch.float16:
        return dict(rtol=2 * 2.0 ** -10, atol=2 * 2.0 ** -24)
    if dtype == torch.bfloat16:
        return dict(rtol=2 * 2.0 ** -7, atol=1e-30)
    return dict(rtol=1e-5, atol=1e-5)
