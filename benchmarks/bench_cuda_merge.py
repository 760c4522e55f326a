"""CUDA merge / match time against a copy of the same tensors and the pure-PyTorch reference.

Reports the median of many runs (CUDA events), the bytes each op must move, and the fraction
of the bandwidth a plain device copy of keys and values reaches in the same run.

    python benchmarks/bench_cuda_merge.py [--dtype bf16] [--length 32768] [--json out.json]
"""
import argparse
import json
import statistics

import torch

import centroidkv
from centroidkv import reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def median_us(fn, warmup=10, runs=100):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--merge", type=int, default=16)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    dtype, c, r = DTYPES[args.dtype], args.chunk, args.merge
    shape = (args.batch, args.heads, args.length, args.dim)
    keys = torch.randn(shape, device="cuda", dtype=dtype)
    values = torch.randn(shape, device="cuda", dtype=dtype)
    sizes = torch.ones(shape[:3], device="cuda")
    out_len = (args.length // c) * (c - r) + args.length % c
    kv_bytes = keys.numel() * keys.element_size()
    out_kv_bytes = kv_bytes * out_len // args.length
    copy_k, copy_v = torch.empty_like(keys), torch.empty_like(values)

    def copy():
        copy_k.copy_(keys)
        copy_v.copy_(values)

    rows = [
        ("copy K, V (baseline)", copy, 4 * kv_bytes),
        ("merge, sizes=None", lambda: centroidkv.merge(keys, values, None, c, r),
         2 * kv_bytes + 2 * out_kv_bytes + 4 * out_len * args.batch * args.heads),
        ("merge, sizes given", lambda: centroidkv.merge(keys, values, sizes, c, r),
         2 * kv_bytes + 2 * out_kv_bytes + 4 * (args.length + out_len) * args.batch * args.heads),
        ("match", lambda: centroidkv.match(keys, c, r), kv_bytes + 8 * keys.numel() // args.dim),
        ("reference.merge (PyTorch)", lambda: reference.merge(keys, values, None, c, r),
         2 * kv_bytes + 2 * out_kv_bytes + 4 * out_len * args.batch * args.heads),
    ]
    # Sizes given runs the sizes check (a device sync) too: that is part of the op's cost.
    results = []
    copy_bandwidth = None
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, B={args.batch} H={args.heads} "
          f"L={args.length} D={args.dim} c={c} r={r}")
    print(f"{'op':28s} {'median us':>10s} {'GB/s':>8s} {'of copy':>8s}")
    for name, fn, nbytes in rows:
        runs = args.runs if "reference" not in name else max(10, args.runs // 10)
        us = median_us(fn, runs=runs)
        bandwidth = nbytes / us / 1e3
        copy_bandwidth = copy_bandwidth or bandwidth
        results.append({"op": name, "median_us": us, "bytes": nbytes, "GB_per_s": bandwidth,
                        "fraction_of_copy": bandwidth / copy_bandwidth})
        print(f"{name:28s} {us:10.1f} {bandwidth:8.0f} {bandwidth / copy_bandwidth:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
