"""A TorchScript function calling torch.ops.centroidkv.merge survives save and load."""
from typing import Optional

import torch


@torch.jit.script
def _cluster(keys: torch.Tensor, values: torch.Tensor, sizes: Optional[torch.Tensor]):
    keys, values, sizes = torch.ops.centroidkv.merge(keys, values, sizes, 16, 8, None)
    slots = torch.ops.centroidkv.match(keys, 16, 4)
    return keys, values, sizes, slots


def test_script_save_load(tmp_path):
    path = str(tmp_path / "cluster.pt")
    torch.jit.save(_cluster, path)
    loaded = torch.jit.load(path)
    keys, values = torch.randn(1, 3, 150, 64), torch.randn(1, 3, 150, 48)
    sizes = torch.rand(1, 3, 150) * 3
    want = [torch.ops.centroidkv.merge(keys, values, sizes, 16, 8, None)]
    want = list(want[0]) + [torch.ops.centroidkv.match(want[0][0], 16, 4)]
    for got, expect in zip(loaded(keys, values, sizes), want):
        assert torch.equal(got, expect)
    assert "centroidkv::merge" in loaded.graph.str() or "centroidkv::merge" in str(loaded.code)
