"""The ops trace into torch.compile graphs (no graph break) and torch.export programs."""
import pytest
import torch

import centroidkv
from centroidkv import reference


def _cache(length, dim=32, heads=2, batch=2):
    return torch.randn(batch, heads, length, dim), torch.randn(batch, heads, length, dim)


def _merge_twice(keys, values):
    keys, values, sizes = torch.ops.centroidkv.merge(keys, values, None, 8, 4, None)
    return torch.ops.centroidkv.merge(keys, values, sizes, 8, 2, None)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_merge(dynamic):
    torch._dynamo.reset()
    compiled = torch.compile(_merge_twice, fullgraph=True, dynamic=dynamic)
    for length in (64, 77, 130):  # several lengths: recompiles (static) or one symbolic graph
        keys, values = _cache(length)
        for got, want in zip(compiled(keys, values), _merge_twice(keys, values)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compile_fullgraph_match_and_compress():
    torch._dynamo.reset()

    def fn(keys, values):
        slots = torch.ops.centroidkv.match(keys, 16, 5)
        return slots, centroidkv.compress(keys, values, ratio=0.75, chunk_size=16)

    keys, values = _cache(100)
    got_slots, got = torch.compile(fn, fullgraph=True)(keys, values)
    want_slots, want = fn(keys, values)
    assert torch.equal(got_slots, want_slots)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


class _Compressor(torch.nn.Module):
    def forward(self, keys, values, sizes):
        return torch.ops.centroidkv.merge(keys, values, sizes, 32, 16, None)


def test_export_with_dynamic_length():
    keys, values = _cache(96)
    sizes = torch.rand(2, 2, 96) + 0.5
    # Export treats sizes 0 and 1 specially, so the range starts where the output has >= 2 rows.
    length = torch.export.Dim("length", min=64, max=4096)
    program = torch.export.export(
        _Compressor(), (keys, values, sizes),
        dynamic_shapes=({2: length}, {2: length}, {2: length}))
    assert any(n.target is torch.ops.centroidkv.merge.default for n in program.graph.nodes)
    keys, values = _cache(203)
    sizes = torch.rand(2, 2, 203) + 0.5
    for got, want in zip(program.module()(keys, values, sizes),
                         reference.merge(keys, values, sizes, 32, 16)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
