"""CUDA match / merge against the pure-PyTorch reference (run on CPU) and the CPU kernel.

Most cases use small-integer data: every dot product, squared norm and size-weighted sum is then
exact in fp32, the square root and divisions are IEEE-rounded on both sides, so the kernel must
agree with the reference bit for bit (maps, ties, centroids and sizes). Gaussian data checks the
same kernel where rounding differs: the map must be a valid matching up to near ties, and the
centroids must equal the reference's averaging by that map within a few ulps.
"""
import pytest
import torch

import centroidkv
from centroidkv import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DIMS = [64, 96, 128, 256, 80]
CHUNKS = [2, 8, 32, 64, 256]


def num_merges(c):
    return sorted({0, 1, c // 4, c // 2})


def lengths(c):
    return sorted({0, 1, c - 1, c, 97, 1025, 4096 + 3})


def shape_for(length):
    # Odd B and H; fewer rows for long sequences to keep the CPU reference fast.
    return (3, 5) if length <= 1025 else (1, 3)


def small_integers(shape, dtype, generator, low=-3, high=3):
    """Integers in [low, high]: exact in every dtype, so fp32 sums of products are exact."""
    return torch.randint(low, high + 1, shape, generator=generator).to(dtype)


def poison_allocator():
    """Fills freed blocks of the CUDA caching allocator with NaN, so that outputs the op
    allocates next most likely reuse NaN memory: any element the kernels fail to write shows."""
    blocks = [torch.full((1 << 16,), float("nan"), device="cuda") for _ in range(32)]
    blocks.append(torch.full((1 << 24,), float("nan"), device="cuda"))
    del blocks


def run_cuda(keys, values, sizes, c, r, metric=None):
    """match and merge on CUDA copies of CPU tensors, results back on the CPU."""
    to = lambda t: None if t is None else t.cuda()
    poison_allocator()
    slots = torch.ops.centroidkv.match(to(keys if metric is None else metric), c, r)
    poison_allocator()
    out = torch.ops.centroidkv.merge(to(keys), to(values), to(sizes), c, r, to(metric))
    torch.cuda.synchronize()
    return slots.cpu(), tuple(t.cpu() for t in out)


def assert_bitwise(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
        f"{what}: {actual.dtype} {tuple(actual.shape)} vs {expected.dtype} {tuple(expected.shape)}")
    same = (actual == expected) | (actual.isnan() & expected.isnan()) if actual.is_floating_point() \
        else actual == expected
    if not bool(same.all()):
        bad = (~same).nonzero()[:5].tolist()
        pytest.fail(f"{what}: {int((~same).sum())} of {same.numel()} elements differ, first at "
                    f"{bad}: {[actual[tuple(i)].item() for i in bad]} vs "
                    f"{[expected[tuple(i)].item() for i in bad]}")


def assert_matches_reference(keys, values, sizes, c, r, metric=None):
    slots, (k, v, s) = run_cuda(keys, values, sizes, c, r, metric)
    assert_bitwise(slots, reference.match(keys if metric is None else metric, c, r), "match map")
    rk, rv, rs = reference.merge(keys, values, sizes, c, r, metric)
    assert_bitwise(s, rs, "sizes")
    assert_bitwise(k, rk, "keys")
    assert_bitwise(v, rv, "values")
    return slots, (k, v, s)


def integer_case(batch, heads, length, dim, dtype, seed, value_dim=None, with_sizes=True):
    g = torch.Generator().manual_seed(seed)
    keys = small_integers((batch, heads, length, dim), dtype, g)
    values = small_integers((batch, heads, length, value_dim or dim), dtype, g)
    # Sizes 0..3: zero sizes (padding) and whole zero-size clusters (plain mean) both occur.
    sizes = torch.randint(0, 4, (batch, heads, length), generator=g).float() if with_sizes else None
    return keys, values, sizes


# Every (c, r, L) combination; dtype and head dim rotate so each appears with many of them.
GRID = [(c, r, length) for c in CHUNKS for r in num_merges(c) for length in lengths(c)]


@pytest.mark.parametrize("c,r,length", GRID)
def test_exact_against_reference(c, r, length):
    index = GRID.index((c, r, length))
    dtype, dim = DTYPES[index % 3], DIMS[index % 5]
    batch, heads = shape_for(length)
    keys, values, sizes = integer_case(batch, heads, length, dim, dtype, seed=index,
                                       value_dim=DIMS[(index + 2) % 5], with_sizes=index % 4 != 0)
    assert_matches_reference(keys, values, sizes, c, r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", DIMS + [33])
@pytest.mark.parametrize("c,r,length", [(32, 16, 1025), (256, 64, 4096 + 3)])
def test_exact_every_dtype_and_head_dim(dtype, dim, c, r, length):
    # c = 256 with D = 256 (fp32 and 16-bit) exceeds shared memory for staging: exercises the
    # path that reads rows from global memory. D = 33 exercises unvectorised loads.
    keys, values, sizes = integer_case(*shape_for(length), length, dim, dtype, seed=dim)
    assert_matches_reference(keys, values, sizes, c, r)


@pytest.mark.parametrize("metric_dtype", DTYPES)
@pytest.mark.parametrize("metric_dim", [33, 128])
def test_separate_metric(metric_dtype, metric_dim):
    g = torch.Generator().manual_seed(metric_dim)
    keys, values, sizes = integer_case(3, 5, 1025, 128, torch.bfloat16, seed=7, value_dim=64)
    metric = small_integers((3, 5, 1025, metric_dim), metric_dtype, g)
    slots, _ = assert_matches_reference(keys, values, sizes, 32, 12, metric)
    # The metric, not the keys, decides the map.
    assert not torch.equal(slots, reference.match(keys, 32, 12))


def test_exact_ties():
    # Values in {-1, 0, 1} over 4 dims, repeated rows and all-zero rows: most similarities tie,
    # so both tie rules (smaller destination, then smaller source) decide the result.
    g = torch.Generator().manual_seed(0)
    keys = small_integers((3, 5, 1000, 4), torch.float32, g, -1, 1)
    keys[:, :, 100:300] = keys[:, :, 100:101]  # identical rows
    keys[:, :, 400:500] = 0  # zero norm: clamped to eps, similarity 0
    values = small_integers((3, 5, 1000, 16), torch.float32, g)  # exact sums in any order
    for c, r in [(2, 1), (8, 3), (32, 16), (64, 5)]:
        assert_matches_reference(keys, values, None, c, r)


def test_nan_keys():
    # NaN similarity counts as -inf: a NaN source scores last, a NaN destination is never chosen
    # unless every destination is NaN (then the first wins).
    keys, values, sizes = integer_case(3, 5, 1025, 64, torch.float32, seed=3)
    keys[0, 0, 5] = float("nan")
    keys[1, 2, 32:64:2, 3] = float("nan")  # all destinations of one chunk
    keys[2, 4, 64:96] = float("nan")  # a whole chunk
    assert_matches_reference(keys, values, sizes, 32, 8)


def test_zero_sizes():
    keys, values, _ = integer_case(3, 5, 1025, 64, torch.bfloat16, seed=4)
    sizes = torch.zeros(3, 5, 1025)
    sizes[:, :, ::7] = 2.0
    assert_matches_reference(keys, values, sizes, 8, 4)
    assert_matches_reference(keys, values, torch.zeros(3, 5, 1025), 8, 4)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "misaligned", "strided_last_dim"])
def test_non_contiguous(layout):
    keys, values, sizes = integer_case(3, 5, 1025, 64, torch.float16, seed=5)
    metric = small_integers((3, 5, 1025, 80), torch.float32, torch.Generator().manual_seed(6))

    def view(t):
        if layout == "transposed":  # [B, L, H, D] memory
            return t.transpose(1, 2).contiguous().transpose(1, 2)
        if layout == "sliced":  # rows from the middle of a longer cache
            longer = torch.zeros(*t.shape[:2], t.shape[2] + 5, t.shape[3], dtype=t.dtype, device=t.device)
            longer[:, :, 3:3 + t.shape[2]] = t
            return longer[:, :, 3:3 + t.shape[2]]
        if layout == "misaligned":  # row starts not 16-byte aligned
            padded = torch.zeros(*t.shape[:3], t.shape[3] + 1, dtype=t.dtype, device=t.device)
            padded[..., 1:] = t
            return padded[..., 1:]
        return torch.stack([t, t], dim=-1).flatten(-2)[..., ::2]  # last-dim stride 2

    # Views are made on the GPU: copying a view with gaps to the GPU would make it contiguous.
    nc_sizes = sizes.cuda().transpose(0, 1).contiguous().transpose(0, 1)
    assert not nc_sizes.is_contiguous()
    for m in (None, metric):
        expected = assert_matches_reference(keys, values, sizes, 32, 16, m)
        to = lambda t: None if t is None else view(t.cuda())
        assert not to(keys).is_contiguous()
        got = torch.ops.centroidkv.merge(to(keys), to(values), nc_sizes.cuda(), 32, 16, to(m))
        for a, b in zip(got, expected[1]):
            assert_bitwise(a.cpu(), b, f"{layout} merge")
        assert_bitwise(torch.ops.centroidkv.match(to(keys if m is None else m), 32, 16).cpu(),
                       expected[0], f"{layout} match")


def assert_valid_matching(slots, metric, c, r, tol):
    """The map is a correct matching up to near ties: merged sources picked a destination within
    tol of their best similarity, the merged ones have the r highest scores (within tol), the
    survivors fill the slots in order, and the tail passes through."""
    batch, heads, length, _ = metric.shape
    n = length // c
    tail = n * (c - r) + torch.arange(length - n * c)
    assert torch.equal(slots[..., n * c:], tail.expand(batch, heads, -1)), "tail slots"
    if n == 0:
        return
    sim = reference._chunked_similarity(metric[:, :, : n * c].float(), c)
    local = slots[..., : n * c].reshape(batch, heads, n, c) - (torch.arange(n) * (c - r))[:, None]
    into = local[..., 0::2, None] == local[..., None, 1::2]  # source a sits in destination b's slot
    merged = into.any(-1)
    assert bool((merged.sum(-1) == r).all()), "exactly r sources merge per chunk"
    score = sim.max(-1).values
    chosen = sim.gather(-1, into.float().argmax(-1, keepdim=True))[..., 0]
    assert bool((chosen >= score - tol)[merged].all()), "merged source picked a worse destination"
    low = torch.where(merged, score, float("inf")).min(-1).values
    high = torch.where(merged, float("-inf"), score).max(-1).values
    assert bool((low >= high - tol).all()), "a kept source scores above a merged one"
    keep = torch.ones(batch, heads, n, c, dtype=torch.bool)
    keep[..., 0::2] = ~merged
    assert torch.equal(local[keep].reshape(batch, heads, n, c - r),
                       torch.arange(c - r).expand(batch, heads, n, -1)), "survivor order"


# Tolerance of the centroids against the reference averaging by the same map: fp32 sums of at
# most c/2 + 1 terms of size ~1 in another order differ by a few ulps (1e-5 covers 129 terms);
# a 16-bit output may then round the other way: one ulp of the dtype.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c,r", [(8, 4), (32, 16), (256, 100)])
def test_gaussian_data(dtype, c, r):
    g = torch.Generator().manual_seed(c + r)
    keys = torch.randn(3, 5, 4096 + 3, 128, generator=g).to(dtype)
    values = torch.randn(3, 5, 4096 + 3, 96, generator=g).to(dtype)
    sizes = torch.rand(3, 5, 4096 + 3, generator=g) * 3
    slots, (k, v, s) = run_cuda(keys, values, sizes, c, r)
    # Similarities computed in another order differ by ~1e-6 (D = 128, fp32); 1e-4 is ample.
    assert_valid_matching(slots, keys, c, r, tol=1e-4)
    out_len = k.shape[2]
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(k, reference.segment_average(keys, slots, sizes, out_len), rtol=rtol, atol=atol)
    torch.testing.assert_close(v, reference.segment_average(values, slots, sizes, out_len), rtol=rtol, atol=atol)
    torch.testing.assert_close(s, torch.zeros_like(s).scatter_add_(-1, slots, sizes), rtol=1e-6, atol=1e-5)

    # Invariants per (b, h): total size, sum(s * k), sum(s * v), up to the outputs' rounding.
    torch.testing.assert_close(s.sum(-1), sizes.sum(-1), rtol=1e-5, atol=1e-3)
    for out, inp in ((k, keys), (v, values)):
        weighted_in = (inp.double() * sizes[..., None].double()).sum(2)
        weighted_out = (out.double() * s[..., None].double()).sum(2)
        scale = (inp.double().abs() * sizes[..., None].double()).sum(2)
        assert bool(((weighted_out - weighted_in).abs() <= 2 * rtol * scale + 1e-3).all())


def test_deterministic():
    g = torch.Generator().manual_seed(11)
    for dtype, dim, c in [(torch.bfloat16, 128, 32), (torch.float32, 256, 256)]:
        keys = torch.randn(3, 5, 4096 + 3, dim, generator=g).to(dtype).cuda()
        values = torch.randn(3, 5, 4096 + 3, dim, generator=g).to(dtype).cuda()
        sizes = (torch.rand(3, 5, 4096 + 3, generator=g) * 3).cuda()
        first = torch.ops.centroidkv.merge(keys, values, sizes, c, c // 2)
        first_map = torch.ops.centroidkv.match(keys, c, c // 2)
        for _ in range(10):
            again = torch.ops.centroidkv.merge(keys, values, sizes, c, c // 2)
            for a, b in zip(again, first):
                assert torch.equal(a, b)
            assert torch.equal(torch.ops.centroidkv.match(keys, c, c // 2), first_map)


def cpu_kernel_registered():
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("centroidkv::merge", "CPU")
    except RuntimeError:  # op not registered at all
        return False


@pytest.mark.skipif(not cpu_kernel_registered(), reason="CPU kernel not built")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c,r", [(2, 1), (32, 16), (256, 64)])
def test_same_as_cpu_kernel(dtype, c, r):
    keys, values, sizes = integer_case(3, 5, 1025, 96, dtype, seed=c, value_dim=64)
    slots, (k, v, s) = run_cuda(keys, values, sizes, c, r)
    assert_bitwise(slots, torch.ops.centroidkv.match(keys, c, r), "match vs CPU kernel")
    ck, cv, cs = torch.ops.centroidkv.merge(keys, values, sizes, c, r)
    assert_bitwise(s, cs, "sizes vs CPU kernel")
    # Integer data makes every sum exact; allow one ulp of the dtype in case the CPU kernel
    # forms the quotient differently (e.g. multiplying by 1 / S).
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(k, ck, rtol=rtol, atol=atol)
    torch.testing.assert_close(v, cv, rtol=rtol, atol=atol)


def test_outputs():
    keys = torch.randn(2, 3, 70, 64, device="cuda", dtype=torch.bfloat16)
    values = torch.randn(2, 3, 70, 32, device="cuda", dtype=torch.bfloat16)
    k, v, s = torch.ops.centroidkv.merge(keys, values, None, 32, 8)
    assert k.shape == (2, 3, 54, 64) and v.shape == (2, 3, 54, 32) and s.dtype == torch.float32
    assert k.device == keys.device and torch.equal(s[..., -6:], torch.ones(2, 3, 6, device="cuda"))
    assert torch.ops.centroidkv.match(keys, 32, 8).dtype == torch.int64


# The error cases run in a child process: one run on an H200 crashed (segfault) at the
# num_merge case, and a crash there must not hide the results of the other tests.
@pytest.mark.parametrize("c,r", [(4096, 2048), (8192, 1)])
def test_chunks_beyond_shared_memory_match_the_cpu(c, r):
    # The members bitmask (c^2 / 32 bytes) no longer fits on chip: it moves to global scratch.
    gen = torch.Generator().manual_seed(c)
    keys = small_integers((1, 2, c + 37, 16), torch.float32, gen)
    values = small_integers((1, 2, c + 37, 8), torch.float32, gen)
    sizes = torch.randint(1, 5, (1, 2, c + 37), generator=gen).float()
    slots, out = run_cuda(keys, values, sizes, c, r)
    assert_bitwise(slots, torch.ops.centroidkv.match(keys, c, r), "match map")
    for got, want, what in zip(out, torch.ops.centroidkv.merge(keys, values, sizes, c, r), ("keys", "values", "sizes")):
        assert_bitwise(got, want, what)


def test_chunk_too_large_for_any_layout_names_the_limit():
    keys = torch.randn(1, 1, 1 << 16, 16, device="cuda")
    with pytest.raises(RuntimeError, match=r"^centroidkv\.merge: chunk_size 65536 needs \d+ bytes of shared memory "
                                           r"per block, more than this GPU allows \(\d+\); the largest chunk_size "
                                           r"it takes is \d+ \(the CPU kernels take any\)$"):
        torch.ops.centroidkv.merge(keys, keys, None, 1 << 16, 8)


def test_opcheck():
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 3, 70, 64, generator=g).cuda()
    values = torch.randn(2, 3, 70, 32, generator=g).cuda()
    sizes = torch.rand(2, 3, 70, generator=g).cuda()
    metric = torch.randn(2, 3, 70, 16, generator=g).half().cuda()
    torch.library.opcheck(torch.ops.centroidkv.match.default, (keys, 8, 3))
    torch.library.opcheck(torch.ops.centroidkv.merge.default, (keys, values, sizes, 8, 3))
    torch.library.opcheck(torch.ops.centroidkv.merge.default, (keys, values, None, 32, 16, metric))


def test_torch_compile():
    keys = torch.randn(2, 3, 100, 64, device="cuda", dtype=torch.float16)
    values = torch.randn(2, 3, 100, 64, device="cuda", dtype=torch.float16)

    def step(k, v):
        k2, v2, s2 = centroidkv.merge(k, v, None, 8, 4)
        return centroidkv.match(k2, 8, 2), centroidkv.merge(k2, v2, s2, 8, 2)

    compiled = torch.compile(step, fullgraph=True)
    got, expected = compiled(keys, values), step(keys, values)
    assert torch.equal(got[0], expected[0])
    for a, b in zip(got[1], expected[1]):
        assert torch.equal(a, b)
