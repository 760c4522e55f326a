"""Decode attention over a clustered cache vs torch SDPA, side by side in one run.

For each (batch B, context L), with Hq=32, Hkv=8, D=128, Tq=1 (a Llama-3-8B layer):
  sdpa_full   torch SDPA over the full cache of L tokens (enable_gqa=True: no repeated KV heads)
  sdpa_bias   torch SDPA over a 4x smaller clustered cache (L/4) with a float bias log(size)
  centroidkv  centroidkv.attention over the same L/4 cache with its sizes (default kernel)
Times are medians of many runs (CUDA events with the launch queue filled ahead, so host overhead
is not counted; wall clock on CPU), rotating over several input sets where one set fits in L2.
GB/s counts the bytes each implementation must read (K, V and sizes or bias; q and the output
are negligible) and is compared with a large device copy measured in the same run.

    python benchmarks/bench_attention.py                      # CUDA if present, else a small CPU run
    python benchmarks/bench_attention.py --batch 1 16 --length 32768 131072 --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

import centroidkv

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
COMPRESSION = 4  # the clustered cache keeps L / 4 slots
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
L2_BYTES_TO_DEFEAT = 3 * 60e6  # H200 L2 is 60 MB: rotate sets until they cover 3x that


def timer(device: str, fn, repeat: int, warmup: int = 5) -> float:
    """Median milliseconds per call of fn(i), i the call index."""
    for i in range(warmup):
        fn(i)
    if device == "cpu":
        times = []
        for i in range(repeat):
            start = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    per_burst = 20
    for burst in range(math.ceil(repeat / per_burst)):
        # A long sleep kernel first, so the whole burst is queued before the GPU reaches it and
        # each event pair brackets GPU time only.
        torch.cuda._sleep(int(5e6))
        events = []
        for j in range(per_burst):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(burst * per_burst + j)
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        times += [s.elapsed_time(e) for s, e in events]
    return statistics.median(times)


def copy_bandwidth(device: str, repeat: int) -> float:
    """GB/s of a large device copy, counting bytes read and written."""
    nbytes = (1 << 30) if device == "cuda" else (256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = timer(device, lambda i: dst.copy_(src), repeat)
    return 2 * nbytes / ms / 1e6


def make_case(device, dtype, batch, length, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    short = length // COMPRESSION
    shape = lambda n: (batch, KV_HEADS, n, HEAD_DIM)  # noqa: E731
    q = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    k_full = torch.randn(shape(length), device=device, dtype=dtype, generator=gen)
    v_full = torch.randn(shape(length), device=device, dtype=dtype, generator=gen)
    k = torch.randn(shape(short), device=device, dtype=dtype, generator=gen)
    v = torch.randn(shape(short), device=device, dtype=dtype, generator=gen)
    sizes = torch.randint(1, 2 * COMPRESSION, (batch, KV_HEADS, short), device=device,
                          generator=gen).float()
    # SDPA's mask must cover every query head: one bias row per query head, in q's dtype.
    bias = sizes.log().repeat_interleave(Q_HEADS // KV_HEADS, dim=1)[:, :, None, :].to(dtype)
    return dict(q=q, k_full=k_full, v_full=v_full, k=k, v=v, sizes=sizes, bias=bias)


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=None)
    parser.add_argument("--length", type=int, nargs="+", default=None,
                        help="full context L; the clustered cache holds L / 4 slots")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    parser.add_argument("--json", default=None, help="write the results to this path")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, DTYPES[args.dtype]
    on_gpu = device == "cuda"
    batches = args.batch or ([1, 16] if on_gpu else [1])
    lengths = args.length or ([32768, 131072] if on_gpu else [4096])
    repeat = args.repeat or (200 if on_gpu else 20)
    scale = 1.0 / math.sqrt(HEAD_DIM)

    machine = torch.cuda.get_device_name() if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    copy_gbs = copy_bandwidth(device, repeat)
    print(f"{machine}; torch {torch.__version__}; {args.dtype}; Hq={Q_HEADS} Hkv={KV_HEADS} "
          f"D={HEAD_DIM} Tq=1; device copy {copy_gbs:.0f} GB/s (read + write)")
    header = (f"{'B':>3} {'L':>7} {'impl':<13} {'ms':>9} {'GB/s':>8} {'of copy':>8} "
              f"{'vs full':>8} {'vs bias':>8}")
    print(header)
    print("-" * len(header))
    results = []
    with torch.no_grad():
        for batch in batches:
            for length in lengths:
                first = make_case(device, dtype, batch, length, seed=0)
                per_set = nbytes(first["k_full"], first["v_full"], first["k"], first["v"])
                sets = 1 if not on_gpu else min(8, max(1, math.ceil(L2_BYTES_TO_DEFEAT / per_set)))
                cases = [first] + [make_case(device, dtype, batch, length, seed=s)
                                   for s in range(1, sets)]
                impls = {
                    "sdpa_full": (
                        lambda c: F.scaled_dot_product_attention(
                            c["q"], c["k_full"], c["v_full"], scale=scale, enable_gqa=True),
                        nbytes(first["k_full"], first["v_full"])),
                    "sdpa_bias": (
                        lambda c: F.scaled_dot_product_attention(
                            c["q"], c["k"], c["v"], attn_mask=c["bias"], scale=scale,
                            enable_gqa=True),
                        nbytes(first["k"], first["v"], first["bias"])),
                    "centroidkv": (
                        lambda c: centroidkv.attention(c["q"], c["k"], c["v"], c["sizes"],
                                                       scale=scale),
                        nbytes(first["k"], first["v"], first["sizes"])),
                }
                # Same math, two implementations: a gross kernel error shows up here.
                diff = (impls["centroidkv"][0](first).float()
                        - impls["sdpa_bias"][0](first).float()).abs().max().item()
                times = {name: timer(device, lambda i, f=fn: f(cases[i % sets]), repeat)
                         for name, (fn, _) in impls.items()}
                for name, (_, moved) in impls.items():
                    ms = times[name]
                    gbs = moved / ms / 1e6
                    row = dict(batch=batch, length=length, cache=length if name == "sdpa_full"
                               else length // COMPRESSION, impl=name, ms=ms, gbs=gbs,
                               fraction_of_copy=gbs / copy_gbs,
                               speedup_vs_sdpa_full=times["sdpa_full"] / ms,
                               speedup_vs_sdpa_bias=times["sdpa_bias"] / ms)
                    results.append(row)
                    print(f"{batch:>3} {length:>7} {name:<13} {ms:>9.4f} {gbs:>8.1f} "
                          f"{row['fraction_of_copy']:>8.2f} {row['speedup_vs_sdpa_full']:>7.2f}x "
                          f"{row['speedup_vs_sdpa_bias']:>7.2f}x")
                print(f"    max |centroidkv - sdpa_bias| = {diff:.3g}; {sets} input set(s)")
                del cases, first
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine, torch=torch.__version__, dtype=args.dtype,
                           copy_gbs=copy_gbs, results=results), f, indent=2)


if __name__ == "__main__":
    main()
