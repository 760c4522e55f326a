"""centroidkv.match against the reference: random inputs, hand-derived ties, NaN metrics."""
import pytest
import torch

import centroidkv
from centroidkv import reference

from clustering_helpers import (CHUNKS, DEVICES, DTYPES, assert_map_matches_reference, case_id,
                                cases, make_inputs)

MATCH_CASES = [case for case in cases() if case["sizes"] == "none" or case["L"] in (0, 97)]


@pytest.mark.parametrize("case", MATCH_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_match_equals_reference(device, dtype, case):
    keys, _, _, metric = make_inputs(case, dtype, device, seed=case["L"] + case["c"])
    metric = keys if metric is None else metric
    slots = centroidkv.match(metric, case["c"], case["r"])
    assert slots.dtype == torch.int64 and slots.shape == metric.shape[:3]
    assert_map_matches_reference(slots, metric, case["c"], case["r"])


def chunk(rows, device, dtype=torch.float32):
    """A [1, 1, L, D] metric from a list of rows."""
    return torch.tensor(rows, dtype=dtype, device=device)[None, None]


@pytest.mark.parametrize("device", DEVICES)
def test_identical_rows_tie_to_first_destination_and_first_sources(device):
    # All similarities are 1: every a picks b0 (offset 1), and the first r sources merge.
    metric = chunk([[2.0, 1.0]] * 8, device)
    got = centroidkv.match(metric, 8, 2)
    # a0 (0) and a1 (2) join b0's slot; survivors 1, 3, 4, 5, 6, 7 take slots 0..5.
    expected = [0, 0, 0, 1, 2, 3, 4, 5]
    assert got.flatten().tolist() == expected
    assert torch.equal(got, reference.match(metric, 8, 2))


@pytest.mark.parametrize("device", DEVICES)
def test_equal_best_destinations_pick_smaller_offset(device):
    # a0 = [1, 0] has cosine 0 with b0 and exactly 1/sqrt(2) with both b1 and b2: b1 wins.
    # a1 and a2 are the same row, both closest to b1, so their scores tie exactly and with r = 1
    # a1 (the smaller offset) merges into b1 (offset 3).
    metric = chunk([[1, 0], [0, 1], [1, 1], [1, 1], [1, 1], [1, -1]], device)
    got = centroidkv.match(metric, 6, 1)
    assert got.flatten().tolist() == [0, 1, 2, 2, 3, 4]
    # With r = 3 every source merges, a0 included: all into b1, none into b2.
    assert centroidkv.match(metric, 6, 3).flatten().tolist() == [1, 0, 1, 1, 1, 2]
    for r in (1, 3):
        assert torch.equal(centroidkv.match(metric, 6, r), reference.match(metric, 6, r))


@pytest.mark.parametrize("device", DEVICES)
def test_equal_scores_merge_smaller_source_offset(device):
    # a0 = [1, 0] and a1 = [0, 1] both reach 1/sqrt(2) (b0 = [1, 1]); with r = 1 a0 merges.
    metric = chunk([[1, 0], [1, 1], [0, 1], [1, -3]], device)
    assert centroidkv.match(metric, 4, 1).flatten().tolist() == [0, 0, 1, 2]
    # With r = 2 both merge into b0, leaving b0 and b1.
    assert centroidkv.match(metric, 4, 2).flatten().tolist() == [0, 0, 0, 1]
    for r in (0, 1, 2):
        assert torch.equal(centroidkv.match(metric, 4, r), reference.match(metric, 4, r))


@pytest.mark.parametrize("device", DEVICES)
def test_nan_metric_counts_as_minus_infinity(device):
    nan = float("nan")
    # a0 is NaN: all its similarities are -inf, so the finite a1 (= b0) merges first.
    metric = chunk([[nan, 1.0], [3.0, 4.0], [3.0, 4.0], [-4.0, 3.0]], device)
    assert centroidkv.match(metric, 4, 1).flatten().tolist() == [0, 1, 1, 2]
    # With r = 2 the NaN source merges too, into b0 (argmax of all -inf is the first).
    assert centroidkv.match(metric, 4, 2).flatten().tolist() == [0, 0, 0, 1]
    # A NaN destination is never anyone's best while a finite one exists.
    metric = chunk([[1.0, 0.0], [nan, nan], [0.0, 1.0], [1.0, 1.0]], device)
    assert centroidkv.match(metric, 4, 2).flatten().tolist() == [1, 0, 1, 1]
    for r in (0, 1, 2):
        assert torch.equal(centroidkv.match(metric, 4, r), reference.match(metric, 4, r))


@pytest.mark.parametrize("c", CHUNKS)
@pytest.mark.parametrize("device", DEVICES)
def test_random_nans_match_reference(device, c):
    gen = torch.Generator().manual_seed(c)
    metric = torch.randn(2, 3, 3 * c + 5, 24, generator=gen)
    metric[torch.rand(metric.shape, generator=gen) < 0.02] = float("nan")
    metric = metric.to(device)
    for r in (1, c // 2):
        assert_map_matches_reference(centroidkv.match(metric, c, r), metric, c, r)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_rows_and_ties_in_low_precision(device):
    # Zero rows have norm clamped to eps, so their cosine is 0 (not NaN); duplicated integer rows
    # give exact ties in any dtype (exact agreement required on CPU, which rounds like the
    # reference; parallel but unequal rows may tie only up to rounding elsewhere).
    gen = torch.Generator().manual_seed(3)
    base = torch.randint(-3, 4, (1, 2, 64, 8), generator=gen).float()
    base[:, :, ::5] = 0
    base[:, :, 1::7] = base[:, :, 0::7][:, :, : base[:, :, 1::7].shape[2]]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        metric = base.to(device, dtype)
        for r in (1, 4, 8):
            assert_map_matches_reference(centroidkv.match(metric, 16, r), metric, 16, r)
