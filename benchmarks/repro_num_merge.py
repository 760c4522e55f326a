"""Stand-alone repro of the host crash seen once on an H200 (torch 2.11): merge with num_merge
> chunk_size / 2 on CUDA tensors must raise a RuntimeError naming num_merge. For a native
backtrace if it crashes:

    cuda-gdb -batch -ex run -ex bt --args python3 benchmarks/repro_num_merge.py
    gdb -batch -ex run -ex bt --args python3 benchmarks/repro_num_merge.py
"""
import faulthandler

import torch

import centroidkv  # noqa: F401  (loads torch.ops.centroidkv)

faulthandler.enable(all_threads=True)
keys = torch.randn(2, 3, 70, 64, device="cuda", dtype=torch.bfloat16)
values = torch.randn(2, 3, 70, 32, device="cuda", dtype=torch.bfloat16)
steps = [
    ("valid merge", lambda: torch.ops.centroidkv.merge(keys, values, None, 32, 8), None),
    ("values on cpu", lambda: torch.ops.centroidkv.merge(keys, values.cpu(), None, 32, 8), "values is on"),
    ("negative sizes",
     lambda: torch.ops.centroidkv.merge(keys, values, -torch.ones(2, 3, 70, device="cuda"), 32, 8),
     "sizes must be >= 0"),
    ("num_merge 17 (match)", lambda: torch.ops.centroidkv.match(keys, 32, 17), "num_merge"),
    ("num_merge 17 (merge)", lambda: torch.ops.centroidkv.merge(keys, values, None, 32, 17), "num_merge"),
]
for name, call, expected in steps:
    print("step:", name, flush=True)
    try:
        call()
        torch.cuda.synchronize()
    except RuntimeError as e:
        assert expected is not None and expected in str(e), (name, str(e))
        print("  raised as expected:", str(e).splitlines()[0], flush=True)
    else:
        assert expected is None, f"{name}: no error"
print("repro: no crash", flush=True)
