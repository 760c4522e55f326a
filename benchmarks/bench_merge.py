"""Times one clustering pass: the centroidkv.merge kernel against the pure-PyTorch reference
(eager, and compiled with --compile), side by side in one run.

    python benchmarks/bench_merge.py                       # CPU, fp32, B=1 H=8 L=8192 D=128 c=32 r=16
    python benchmarks/bench_merge.py --device cuda         # bf16, L=32768 and 131072
    python benchmarks/bench_merge.py --length 4096 16384 --compile --json out.json

Reported per case and implementation: median time of --repeat runs after --warmup runs, the
bandwidth it implies (bytes of keys and values read, plus merged keys, values and sizes
written), the speedup over the eager reference, and on CUDA the fraction of a device-to-device
copy's bandwidth measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import centroidkv
from centroidkv import reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--length", type=int, nargs="+", default=None,
                   help="one or more sequence lengths (default: 8192 on CPU, 32768 131072 on CUDA)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--merge", type=int, default=16)
    p.add_argument("--sizes", action="store_true", help="pass random sizes (default: None = ones)")
    p.add_argument("--inner", type=int, default=1,
                   help="calls per timed sample, back to back; >1 hides the host's per-call "
                        "overhead behind the GPU work (CUDA: time per call = sample / inner)")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time torch.compile(reference.merge)")
    p.add_argument("--skip-reference", action="store_true", help="time the kernel only")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--clock", choices=["wall", "process"], default="wall",
                   help="CPU only: 'process' times CPU seconds of all threads, a steadier "
                        "figure than wall time on a machine shared with other work")
    p.add_argument("--json", metavar="PATH", help="write the results here")
    args = p.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.length = args.length or ([32768, 131072] if args.device == "cuda" else [8192])
    return args


def median_ms(fn, device: str, repeat: int, warmup: int, clock: str = "wall", inner: int = 1) -> float:
    if inner > 1:
        one = fn

        def fn():
            for _ in range(inner):
                one()
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / inner)
    else:
        now = time.process_time if clock == "process" else time.perf_counter
        for _ in range(repeat):
            t0 = now()
            fn()
            times.append((now() - t0) * 1e3 / inner)
    return statistics.median(times)


def copy_bandwidth_gbs(device: str, repeat: int) -> float:
    """Read + write bandwidth of a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, repeat, warmup=2)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype, c, r = args.device, DTYPES[args.dtype], args.chunk, args.merge
    copy_gbs = copy_bandwidth_gbs(device, args.repeat) if device == "cuda" else None
    impls = {"centroidkv": centroidkv.merge}
    if not args.skip_reference:
        impls["reference"] = reference.merge
        if args.compile:
            impls["reference+compile"] = torch.compile(reference.merge, dynamic=False)

    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for length in args.length:
        shape = (args.batch, args.heads, length, args.dim)
        keys = torch.randn(shape, generator=gen, device=device).to(dtype)
        values = torch.randn(shape, generator=gen, device=device).to(dtype)
        sizes = (torch.rand(shape[:3], generator=gen, device=device) + 0.5) if args.sizes else None
        out_len = (length // c) * (c - r) + length % c
        elt = keys.element_size()
        nbytes = 2 * keys.numel() * elt + 2 * args.batch * args.heads * out_len * args.dim * elt
        nbytes += args.batch * args.heads * out_len * 4 + (sizes.numel() * 4 if args.sizes else 0)
        case = f"B{args.batch} H{args.heads} L{length} D{args.dim} c{c} r{r} {args.dtype}"
        baseline = None
        for name, fn in impls.items():
            with torch.no_grad():
                ms = median_ms(lambda: fn(keys, values, sizes, c, r), device, args.repeat,
                               args.warmup, args.clock, args.inner)
            baseline = ms if name == "reference" else baseline
            gbs = nbytes / (ms * 1e-3) / 1e9
            rows.append(dict(case=case, impl=name, ms=ms, gbs=gbs,
                             copy_fraction=gbs / copy_gbs if copy_gbs else None))
        for row in rows[-len(impls):]:
            row["speedup_vs_reference"] = baseline / row["ms"] if baseline else None

    clock = "process CPU time" if device == "cpu" and args.clock == "process" else "wall time"
    clock += f" per call, {args.inner} calls back to back per sample" if args.inner > 1 else ""
    print(f"# {machine(device)}, torch {torch.__version__}, median {clock}"
          + (f", copy bandwidth {copy_gbs:.0f} GB/s (read + write)" if copy_gbs else ""))
    header = f"{'case':<38} {'impl':<18} {'ms':>9} {'GB/s':>8} {'speedup':>8}"
    header += f" {'of copy':>8}" if copy_gbs else ""
    print(header)
    for row in rows:
        speedup = f"{row['speedup_vs_reference']:.1f}x" if row["speedup_vs_reference"] else "-"
        line = f"{row['case']:<38} {row['impl']:<18} {row['ms']:>9.3f} {row['gbs']:>8.1f} {speedup:>8}"
        line += f" {row['copy_fraction']:>8.2f}" if copy_gbs else ""
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine(device), torch=torch.__version__, device=device,
                           copy_bandwidth_gbs=copy_gbs, args=vars(args), results=rows), f, indent=2)


if __name__ == "__main__":
    main()
