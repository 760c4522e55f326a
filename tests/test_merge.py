"""centroidkv.merge against the reference, its invariants, ties, NaNs, strides, determinism."""
import pytest
import torch

import centroidkv
from centroidkv import reference

from clustering_helpers import (DEVICES, DTYPES, assert_map_matches_reference, case_id, cases,
                                make_inputs, ulp_tolerance)

CASES = cases()


def merged_length(length, c, r):
    return (length // c) * (c - r) + length % c


def expected_merge(keys, values, sizes, c, r, metric):
    """The reference centroids for the op's own map (checked separately against the reference
    map), so a near-tie decided differently on another device cannot fail the arithmetic check."""
    slots = centroidkv.match(keys if metric is None else metric, c, r)
    if sizes is None:
        sizes = torch.ones(keys.shape[:3], device=keys.device)
    out_len = merged_length(keys.shape[2], c, r)
    new_sizes = torch.zeros(*keys.shape[:2], out_len, device=keys.device).scatter_add_(-1, slots, sizes)
    return (reference.segment_average(keys, slots, sizes, out_len),
            reference.segment_average(values, slots, sizes, out_len), new_sizes)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_merge_equals_reference(device, dtype, case):
    c, r = case["c"], case["r"]
    keys, values, sizes, metric = make_inputs(case, dtype, device, seed=case["L"] * 7 + c)
    out_k, out_v, out_s = centroidkv.merge(keys, values, sizes, c, r, metric)

    out_len = merged_length(case["L"], c, r)
    assert out_k.shape == (case["B"], case["H"], out_len, keys.shape[3]) and out_k.dtype == dtype
    assert out_v.shape == (case["B"], case["H"], out_len, values.shape[3]) and out_v.dtype == dtype
    assert out_s.shape == (case["B"], case["H"], out_len) and out_s.dtype == torch.float32
    assert_map_matches_reference(centroidkv.match(keys if metric is None else metric, c, r),
                                 keys if metric is None else metric, c, r)
    exp_k, exp_v, exp_s = expected_merge(keys, values, sizes, c, r, metric)
    tol = ulp_tolerance(dtype)
    torch.testing.assert_close(out_k, exp_k, **tol)
    torch.testing.assert_close(out_v, exp_v, **tol)
    # Sizes are fp32 sums of at most c/2 + 1 terms in both: a few fp32 ulps.
    torch.testing.assert_close(out_s, exp_s, rtol=1e-6, atol=1e-6)
    # Inputs hold no NaN, so no output element may be NaN (every slot was written).
    assert not out_k.isnan().any() and not out_v.isnan().any() and not out_s.isnan().any()


@pytest.mark.parametrize("case", [c for c in CASES if c["L"] == 1025 and c["c"] in (8, 64)], ids=case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_merge_is_the_reference_merge(device, case):
    """Direct comparison with reference.merge, the whole pipeline at once (fp32)."""
    c, r = case["c"], case["r"]
    keys, values, sizes, metric = make_inputs(case, torch.float32, device, seed=11)
    got = centroidkv.merge(keys, values, sizes, c, r, metric)
    expected = reference.merge(keys, values, sizes, c, r, metric)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **ulp_tolerance(torch.float32))


@pytest.mark.parametrize("sizes_kind", ["none", "random", "with_zeros"])
@pytest.mark.parametrize("c,r", [(2, 1), (8, 3), (32, 16), (256, 64)])
@pytest.mark.parametrize("device", DEVICES)
def test_invariants(device, c, r, sizes_kind):
    case = dict(c=c, r=r, L=4 * c + 5, D=64, B=2, H=3, sizes=sizes_kind, metric="keys")
    keys, values, sizes, _ = make_inputs(case, torch.float32, device, seed=c + r)
    out_k, out_v, out_s = centroidkv.merge(keys, values, sizes, c, r)
    s = torch.ones(keys.shape[:3], device=device) if sizes is None else sizes
    # fp64 sums of fp32 results: each centroid carries a relative rounding error of a few fp32
    # ulps, and the sums run over ~hundreds of O(1) terms.
    torch.testing.assert_close(out_s.double().sum(-1), s.double().sum(-1), rtol=1e-6, atol=1e-4)
    for x, out_x in ((keys, out_k), (values, out_v)):
        before = (s.double()[..., None] * x.double()).sum(-2)
        after = (out_s.double()[..., None] * out_x.double()).sum(-2)
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_sizes_none_equals_ones(device):
    case = dict(c=16, r=5, L=100, D=40, B=2, H=2, sizes="none", metric="keys")
    keys, values, _, _ = make_inputs(case, torch.float32, device)
    ones = torch.ones(keys.shape[:3], device=device)
    for got, expected in zip(centroidkv.merge(keys, values, None, 16, 5),
                             centroidkv.merge(keys, values, ones, 16, 5)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_identical_rows_merge_exactly(device, dtype):
    # Integer-valued duplicated rows: every similarity is 1, so a0 and a1 merge into b0; the
    # centroid of equal rows is that row (exact in every dtype), and its size is the sum.
    row = torch.tensor([3.0, -2.0, 1.0, 0.0])
    keys = row.repeat(1, 1, 8, 1).to(device, dtype)
    values = torch.arange(8 * 3, dtype=torch.float32).reshape(1, 1, 8, 3).to(device, dtype)
    sizes = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]]], device=device)
    out_k, out_v, out_s = centroidkv.merge(keys, values, sizes, 8, 2)
    assert torch.equal(out_k, row.repeat(1, 1, 6, 1).to(device, dtype))
    assert out_s.flatten().tolist() == [1.0 + 2.0 + 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    v = values.float()[0, 0]
    centroid = (1 * v[0] + 2 * v[1] + 3 * v[2]) / 6
    torch.testing.assert_close(out_v[0, 0, 0].float(), centroid.to(dtype).float(), rtol=0, atol=0)
    assert torch.equal(out_v[0, 0, 1:], values[0, 0, 3:])  # single tokens are copied bit-exact


@pytest.mark.parametrize("device", DEVICES)
def test_zero_size_slot_is_plain_mean_with_size_zero(device):
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]], device=device)[None, None]
    values = torch.tensor([[2.0], [4.0], [8.0], [16.0]], device=device)[None, None]
    sizes = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]], device=device)
    out_k, out_v, out_s = centroidkv.merge(keys, values, sizes, 4, 1)
    # a0 = b0 exactly (sim 1) merges; the slot's total size is 0, so plain mean, size 0.
    assert out_v.flatten().tolist() == [3.0, 8.0, 16.0]
    assert out_s.flatten().tolist() == [0.0, 1.0, 1.0]
    assert out_k[0, 0, 0].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("device", DEVICES)
def test_nan_keys_follow_reference(device):
    gen = torch.Generator().manual_seed(5)
    keys = torch.randn(2, 2, 77, 16, generator=gen)
    keys[torch.rand(keys.shape, generator=gen) < 0.03] = float("nan")
    values = torch.randn(2, 2, 77, 8, generator=gen)
    keys, values = keys.to(device), values.to(device)
    got = centroidkv.merge(keys, values, None, 8, 4)
    expected = reference.merge(keys, values, None, 8, 4)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, equal_nan=True, **ulp_tolerance(torch.float32))
    assert not got[1].isnan().any(), "NaN keys must not leak into values"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device, dtype):
    case = dict(c=32, r=12, L=1000, D=64, B=2, H=4, sizes="with_zeros", metric="keys")
    keys, values, sizes, _ = make_inputs(case, dtype, device)
    first = centroidkv.merge(keys, values, sizes, 32, 12)
    second = centroidkv.merge(keys, values, sizes, 32, 12)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    if device == "cpu":  # chunks are independent, so the thread count cannot change a bit
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            single = centroidkv.merge(keys, values, sizes, 32, 12)
        finally:
            torch.set_num_threads(threads)
        for a, b in zip(first, single):
            assert torch.equal(a, b)


def strided_views(x):
    """The same values as x [B, H, L, D] laid out four ways: contiguous, heads-major (B, L, H, D)
    transposed, every other row of a longer tensor, and a transposed last dim."""
    bhld = x.contiguous()
    blhd = x.transpose(1, 2).contiguous().transpose(1, 2)
    spread = torch.zeros(x.shape[0], x.shape[1], 2 * x.shape[2], x.shape[3], dtype=x.dtype,
                         device=x.device)
    spread[:, :, ::2] = x
    last_dim_strided = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return [bhld, blhd, spread[:, :, ::2], last_dim_strided]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device, dtype):
    case = dict(c=16, r=6, L=70, D=32, B=2, H=3, sizes="random", metric="same_dtype_dm48")
    keys, values, sizes, metric = make_inputs(case, dtype, device)
    expected = centroidkv.merge(keys, values, sizes, 16, 6, metric)
    expected_map = centroidkv.match(keys, 16, 6)
    sizes_views = [sizes, sizes.transpose(1, 2).contiguous().transpose(1, 2),
                   torch.stack([sizes, sizes], -1)[..., 0], sizes.clone()]
    for k, v, m, s in zip(strided_views(keys), strided_views(values), strided_views(metric),
                          sizes_views):
        for got, exp in zip(centroidkv.merge(k, v, s, 16, 6, m), expected):
            assert torch.equal(got, exp)
        assert torch.equal(centroidkv.match(k, 16, 6), expected_map)


@pytest.mark.parametrize("shape", [(0, 2, 40, 8), (2, 0, 40, 8), (2, 2, 0, 8), (1, 1, 5, 8)])
@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_short(device, shape):
    keys = torch.randn(shape, device=device)
    values = torch.randn(*shape[:3], 3, device=device)
    out_k, out_v, out_s = centroidkv.merge(keys, values, None, 8, 4)
    out_len = merged_length(shape[2], 8, 4)
    assert out_k.shape == (*shape[:2], out_len, 8) and out_v.shape == (*shape[:2], out_len, 3)
    assert out_s.shape == (*shape[:2], out_len)
    if shape[2] < 8:  # shorter than one chunk: everything passes through
        assert torch.equal(out_k, keys) and torch.equal(out_v, values)
        assert torch.equal(out_s, torch.ones_like(out_s))
    assert centroidkv.match(keys, 8, 4).shape == shape[:3]
