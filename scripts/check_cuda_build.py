"""After a CUDA build on a machine without a GPU: the CUDA kernels are registered for every op,
and fake CUDA tensors trace through the fake kernels (what torch.compile does at trace time)."""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import centroidkv

OPS = ("match", "merge", "_merge_unchecked", "attention")

missing = [op for op in OPS
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"centroidkv::{op}", "CUDA")]
assert not missing, f"no CUDA kernel registered for: {missing}"

with FakeTensorMode():
    keys = torch.empty(2, 4, 1000, 128, device="cuda", dtype=torch.bfloat16)
    values = torch.empty(2, 4, 1000, 96, device="cuda", dtype=torch.bfloat16)
    k, v, sizes = centroidkv.merge(keys, values, chunk_size=32, num_merge=16)
    assert (k.shape, v.shape, sizes.shape) == ((2, 4, 504, 128), (2, 4, 504, 96), (2, 4, 504))
    assert k.device.type == "cuda" and sizes.dtype == torch.float32
    slots = centroidkv.match(keys, 32, 16)
    assert slots.shape == (2, 4, 1000) and slots.dtype == torch.int64
    out = centroidkv.attention(torch.empty(2, 16, 1, 128, device="cuda", dtype=torch.bfloat16), k, v, sizes)
    assert out.shape == (2, 16, 1, 96) and out.device.type == "cuda"
print(f"CUDA kernels registered for {', '.join(OPS)}; fake CUDA tensors trace; torch {torch.__version__}")
