"""centroidkv.attention against the float64 reference, on every available device.

Tolerance: the kernels read the same low-precision inputs as the reference, compute in float32
and round once to q's dtype. The float32 part is far below the dtype's resolution for these
sizes (about 1e-6 relative), so an output may differ from the float64 reference by its final
rounding (half an ulp, at most eps * |ref| / 2) plus that float32 noise, which may push it across
a rounding boundary: a full ulp. eps * |ref| + 1e-4 bounds both with a margin of about 2x for
half and bfloat16; for float32 the 1e-4 absolute term covers float32 accumulation over 1025 keys
and the fast exp2/log2 of the CUDA kernel.
"""
from __future__ import annotations


import pytest
import torch

import centroidkv
from centroidkv import reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LENGTHS = [1, 7, 97, 1025]
HEAD_DIMS = [64, 128, 256, 80]  # 80: no specialised CUDA kernel, takes the generic path there
# (query heads per KV head, Tq): G*Tq = 1, 3, 2, 4, 21, 64 query rows per KV head, so every CUDA
# row-tile width (1, 2, 4, 8) runs, with partly filled tiles and several tiles.
GROUP_AND_QUERIES = [(1, 1), (1, 3), (2, 1), (4, 1), (7, 3), (4, 16)]

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_inputs(device, dtype, batch=2, kv_heads=2, group=4, tq=1, length=97, dim=64, dim_v=None,
                seed=0):
    gen = torch.Generator().manual_seed(seed)
    dim_v = dim if dim_v is None else dim_v
    q = torch.randn(batch, kv_heads * group, tq, dim, generator=gen)
    k = torch.randn(batch, kv_heads, length, dim, generator=gen)
    v = torch.randn(batch, kv_heads, length, dim_v, generator=gen)
    sizes = torch.randint(1, 9, (batch, kv_heads, length), generator=gen).float()
    return (q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), sizes.to(device))


def assert_close_to_reference(out, q, k, v, sizes, scale=None, lengths=None):
    exact = _reference64(q, k, v, sizes, scale, lengths)
    assert out.dtype == q.dtype and out.shape == exact.shape
    assert not out.isnan().any(), "NaN in output"
    eps = torch.finfo(q.dtype).eps
    err = (out.double() - exact).abs()
    bound = eps * exact.abs() + 1e-4
    worst = (err - bound).max().item()
    assert worst <= 0, f"max error {err.max().item():.3g} exceeds the bound (by {worst:.3g})"


def _reference64(q, k, v, sizes, scale, lengths):
    """The reference before its final cast to q's dtype."""
    return reference.attention(q.double(), k.double(), v.double(), sizes, scale, lengths)


def poison_cuda_allocator(device, out_shape):
    """Leaves NaN in the blocks the caching allocator hands out next: one of the output's size
    (the small pool reuses it for the output) and a large one (workspace)."""
    if device == "cuda":
        junk = [torch.full(out_shape, float("nan"), device=device),
                torch.full((64 << 20,), float("nan"), device=device)]
        del junk


def run(q, k, v, sizes, scale=None, lengths=None):
    poison_cuda_allocator(q.device.type, (*q.shape[:3], v.shape[3]))
    return centroidkv.attention(q, k, v, sizes, scale=scale, lengths=lengths)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("group,tq", GROUP_AND_QUERIES)
def test_matches_reference(device, dtype, dim, length, group, tq):
    q, k, v, sizes = make_inputs(device, dtype, group=group, tq=tq, length=length, dim=dim,
                                 seed=length * 7 + dim + tq)
    # Different valid lengths per row (where L < Tq, early queries see nothing: zeros).
    lengths = torch.tensor([length, min(length, max(tq, length - length // 3))], device=device)
    out = run(q, k, v, sizes, lengths=lengths)
    assert_close_to_reference(out, q, k, v, sizes, lengths=lengths)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["none", "positive", "with_zeros", "all_but_one", "fractional"])
@pytest.mark.parametrize("length", [7, 1025, 5000])
def test_sizes(device, dtype, mode, length):
    q, k, v, sizes = make_inputs(device, dtype, group=4, tq=3, length=length, dim=128, seed=length)
    gen = torch.Generator().manual_seed(1)
    if mode == "none":
        sizes = None
    elif mode == "with_zeros":
        sizes = sizes * (torch.rand(sizes.shape, generator=gen) > 0.3).float().to(device)
        sizes[..., -1] = 1.0  # keep one visible key for every query
    elif mode == "all_but_one":
        keep = torch.randint(0, max(1, length - 3), (2, 2), generator=gen).to(device)
        sizes = torch.zeros_like(sizes).scatter_(-1, keep[..., None], 3.0)
    elif mode == "fractional":
        sizes = torch.rand(sizes.shape, generator=gen).to(device) * 10 + 1e-3
    out = run(q, k, v, sizes)
    assert_close_to_reference(out, q, k, v, sizes)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nothing_visible_gives_zeros(device, dtype):
    q, k, v, sizes = make_inputs(device, dtype, batch=3, group=4, tq=3, length=600, dim=128)
    sizes[0] = 0.0  # row 0: every slot is padding
    # row 1: length 1 < Tq: queries 0 and 1 see no key, query 2 sees key 0; row 2: length 0
    lengths = torch.tensor([600, 1, 0], device=device)
    out = run(q, k, v, sizes, lengths=lengths)
    assert_close_to_reference(out, q, k, v, sizes, lengths=lengths)
    assert (out[0] == 0).all() and (out[2] == 0).all() and (out[1, :, :2] == 0).all()
    assert (out[1, :, 2] != 0).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_long_cache_many_splits(device, dtype, dim):
    # Long enough that the CUDA kernel splits the keys over many blocks and merges them.
    q, k, v, sizes = make_inputs(device, dtype, batch=1, kv_heads=2, group=4, tq=1,
                                 length=20011, dim=dim, seed=dim)
    lengths = torch.tensor([17003], device=device)
    out = run(q, k, v, sizes, scale=0.3, lengths=lengths)
    assert_close_to_reference(out, q, k, v, sizes, scale=0.3, lengths=lengths)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_int32_lengths_and_scale(device, dtype):
    q, k, v, sizes = make_inputs(device, dtype, group=7, tq=2, length=300, dim=64)
    lengths = torch.tensor([5, 300], device=device, dtype=torch.int32)
    out = run(q, k, v, sizes, scale=2.0, lengths=lengths)
    assert_close_to_reference(out, q, k, v, sizes, scale=2.0, lengths=lengths.long())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_value_dim_differs(device, dtype):
    q, k, v, sizes = make_inputs(device, dtype, group=4, tq=2, length=97, dim=64, dim_v=128)
    out = run(q, k, v, sizes)
    assert out.shape == (2, 8, 2, 128)
    assert_close_to_reference(out, q, k, v, sizes)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 128])
def test_non_contiguous_inputs(device, dtype, dim):
    batch, kv_heads, group, tq, length = 2, 2, 4, 3, 333
    gen = torch.Generator().manual_seed(5)
    # Cache stored [B, L, H, D] (token-major) and read as [B, H, L, D]; q likewise.
    q = torch.randn(batch, tq, kv_heads * group, dim, generator=gen).to(device, dtype).transpose(1, 2)
    k = torch.randn(batch, length, kv_heads, dim, generator=gen).to(device, dtype).transpose(1, 2)
    # v: a slice of a wider buffer, so rows are strided and not 16-byte aligned to start
    v = torch.randn(batch, kv_heads, length, dim + 3, generator=gen).to(device, dtype)[..., 1:dim + 1]
    sizes = torch.rand(batch, length, kv_heads, generator=gen).to(device).transpose(1, 2) + 0.5
    lengths = torch.tensor([333, 40], device=device)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or sizes.is_contiguous())
    out = run(q, k, v, sizes, lengths=lengths)
    assert_close_to_reference(out, q, k, v, sizes, lengths=lengths)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_shapes(device):
    q, k, v, sizes = make_inputs(device, torch.float32, length=5)
    out = centroidkv.attention(q[:, :, :0], k, v, sizes)
    assert out.shape == (2, 8, 0, 64)
    out = centroidkv.attention(q, k[:, :, :0], v[:, :, :0], sizes[:, :, :0])
    assert (out == 0).all() and out.shape == (2, 8, 1, 64)


@requires_cuda
@pytest.mark.parametrize("length", [50, 5000])  # one block per head / split keys + combine
@pytest.mark.parametrize("bad", [-1, 1])
def test_cuda_out_of_range_lengths_give_nan(length, bad):
    # The CUDA path cannot check values without a device sync; such rows come out NaN.
    q, k, v, sizes = make_inputs("cuda", torch.bfloat16, length=length, dim=128)
    lengths = torch.tensor([-1 if bad < 0 else length + 1, length], device="cuda")
    out = centroidkv.attention(q, k, v, sizes, lengths=lengths)
    assert out[0].isnan().all() and not out[1].isnan().any()


# The CUDA key loop (a cp.async ring in shared memory) at lengths shorter than one step (32 keys
# for bf16 D=128 with 4 rows), a few steps (fewer than the ring holds, then more), and long
# enough to split.
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("length", [5, 70, 300, 9001])
@pytest.mark.parametrize("group,tq", [(1, 1), (4, 1), (7, 3)])
@pytest.mark.parametrize("sizes_mode", ["given", "none", "with_zeros"])
def test_cuda_key_loop(dtype, dim, length, group, tq, sizes_mode):
    q, k, v, sizes = make_inputs("cuda", dtype, group=group, tq=tq, length=length, dim=dim,
                                 seed=length + dim + 13 * group)
    if sizes_mode == "none":
        sizes = None
    elif sizes_mode == "with_zeros":
        gen = torch.Generator().manual_seed(length)
        sizes = sizes * (torch.rand(sizes.shape, generator=gen) > 0.5).float().cuda()
        sizes[..., -1] = 1.0  # every query keeps a visible key
    lengths = torch.tensor([length, max(tq, length - length // 3)], device="cuda")
    out = run(q, k, v, sizes, lengths=lengths)
    assert_close_to_reference(out, q, k, v, sizes, lengths=lengths)


@requires_cuda
def test_cuda_strided_cache():
    # K and V as views into a larger cache (row strides larger than D), sizes strided too.
    q, k, v, sizes = make_inputs("cuda", torch.bfloat16, group=4, length=3000, dim=128)
    k_big = torch.randn(2, 2, 3100, 192, device="cuda", dtype=torch.bfloat16)
    v_big = torch.randn(2, 2, 3100, 192, device="cuda", dtype=torch.bfloat16)
    k_big[:, :, :3000, 64:] = k
    v_big[:, :, :3000, 64:] = v
    k, v = k_big[:, :, :3000, 64:], v_big[:, :, :3000, 64:]
    sizes = torch.stack([sizes, sizes], -1)[..., 0]
    out = run(q, k, v, sizes)
    assert_close_to_reference(out, q, k, v, sizes)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    samples = [
        make_inputs(device, torch.float32, group=4, tq=1, length=97, dim=64),
        make_inputs(device, torch.bfloat16, group=1, tq=3, length=7, dim=128),
        make_inputs(device, torch.float16, group=7, tq=2, length=300, dim=80),
    ]
    for i, (q, k, v, sizes) in enumerate(samples):
        lengths = torch.tensor([k.shape[2], 1 + k.shape[2] // 2], device=device)
        args = (q, k, v, sizes if i != 1 else None, 0.125, lengths if i != 2 else None)
        torch.library.opcheck(torch.ops.centroidkv.attention.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    q, k, v, sizes = make_inputs(device, torch.float32, group=4, tq=2, length=97, dim=64)
    lengths = torch.tensor([97, 50], device=device)

    @torch.compile(fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    def step(q, k, v, sizes, lengths):
        return centroidkv.attention(q * 2, k, v, sizes, scale=0.1, lengths=lengths) + 1

    out = step(q, k, v, sizes, lengths)
    expected = centroidkv.attention(q * 2, k, v, sizes, scale=0.1, lengths=lengths) + 1
    torch.testing.assert_close(out, expected)


@requires_cuda
@pytest.mark.parametrize("tq", [1, 5])
def test_cuda_graph_capture(tq):
    static = make_inputs("cuda", torch.bfloat16, group=4, tq=tq, length=9000, dim=128, seed=1)
    static_lengths = torch.tensor([9000, 7000], device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up outside the graph (allocator, cached launch settings)
            centroidkv.attention(*static, lengths=static_lengths)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = centroidkv.attention(*static, lengths=static_lengths)
    for seed in (2, 3):
        fresh = make_inputs("cuda", torch.bfloat16, group=4, tq=tq, length=9000, dim=128, seed=seed)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        static_lengths.copy_(torch.tensor([8000 + seed, 9000], device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        expected = centroidkv.attention(*fresh, lengths=static_lengths.clone())
        torch.testing.assert_close(static_out, expected, rtol=0, atol=0)
        assert_close_to_reference(static_out, *fresh, lengths=static_lengths)


@pytest.mark.parametrize("device", DEVICES)
def test_rejects_gradients(device):
    q, k, v, sizes = make_inputs(device, torch.float32, length=5)
    with pytest.raises(RuntimeError, match="no gradient, but its argument 'v' requires grad"):
        centroidkv.attention(q, k, v.requires_grad_(), sizes)


def test_zero_head_dim_needs_no_scale():
    q, k, v, _ = make_inputs("cpu", torch.float32, length=9, dim=0, dim_v=8)
    out = centroidkv.attention(q, k, v)  # every logit is 0: the plain mean of the values
    torch.testing.assert_close(out, v.mean(2, keepdim=True).repeat_interleave(4, 1))
