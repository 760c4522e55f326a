"""Host time of CentroidKVCache's per-layer decode path: update + "centroidkv" attention + settle.

On a GPU the kernels of one decode step run asynchronously, so the step costs at least the
Python and dispatch time the host spends per layer; at 32 layers that must stay well under the
step's GPU time. This measures that host time on the CPU with tiny heads (so kernel time is
small next to the Python), for a large batch, with the cache filled as a prefill leaves it:

    python benchmarks/bench_host_overhead.py --batch 64 --layers 32 --context 4096

Reports the median over decode steps (steps where no block leaves the recent window: the common
case) and the mean (which includes the steps that cluster a block), in microseconds per layer,
both with and without the time spent inside the attention op (on the CPU that is the kernel
itself; on a GPU only its launch): "outside the op" is the cache and attention-function work.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import e2e_common as common
from e2e_common import CentroidKVCache, PlainClustering
from centroidkv.hf_attention import centroidkv_attention


class _Module(torch.nn.Module):
    """Stands in for a decoder layer's attention module (the interface reads `.training`)."""


def run(args) -> dict:
    shape = common.Shape(**{**common.TINY.__dict__, "layers": args.layers})
    cache = CentroidKVCache(ratio=args.ratio, policy=PlainClustering())
    common.fill_centroidkv(cache, shape, args.batch, args.context, "cpu", torch.float32)
    module = _Module().eval()
    group = shape.q_heads // shape.kv_heads
    token = torch.randn(args.batch, shape.kv_heads, 1, shape.head_dim)
    query = torch.randn(args.batch, shape.kv_heads * group, 1, shape.head_dim)
    mask = torch.ones(args.batch, args.context + args.warmup + args.steps + 1, dtype=torch.long)
    times, outside = [], []
    op = torch.ops.centroidkv.attention
    in_op = [0.0]

    def timed_op(*op_args):
        start = time.perf_counter()
        try:
            return op(*op_args)
        finally:
            in_op[0] += time.perf_counter() - start

    torch.ops.centroidkv.attention = timed_op
    try:
        with torch.inference_mode():
            _decode(args, cache, module, token, query, mask, times, outside, in_op)
    finally:
        torch.ops.centroidkv.attention = op
    return dict(batch=args.batch, layers=args.layers, context=args.context, ratio=args.ratio,
                steps=args.steps, us_per_layer_median=statistics.median(times),
                us_per_layer_mean=statistics.fmean(times),
                us_per_layer_outside_op_median=statistics.median(outside),
                us_per_layer_outside_op_mean=statistics.fmean(outside), live_slots=cache.live_slots()[0])


def _decode(args, cache, module, token, query, mask, times, outside, in_op):
    for step in range(args.warmup + args.steps):
        seen = cache.get_seq_length()
        step_mask = mask[:, :seen + 1]
        start, in_op[0] = time.perf_counter(), 0.0
        for layer in range(args.layers):
            keys, values = cache.update(token, token, layer)
            centroidkv_attention(module, query, keys, values, step_mask)
        if step >= args.warmup:
            total = time.perf_counter() - start
            times.append(total / args.layers * 1e6)
            outside.append((total - in_op[0]) / args.layers * 1e6)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    result = run(args)
    result["environment"] = common.environment(torch.device("cpu"))
    print(f"batch {result['batch']}, {result['layers']} layers, context {result['context']}, "
          f"ratio {result['ratio']}: host time per layer and decode step "
          f"median {result['us_per_layer_median']:.1f} us, mean {result['us_per_layer_mean']:.1f} us; "
          f"outside the attention op median {result['us_per_layer_outside_op_median']:.1f} us, "
          f"mean {result['us_per_layer_outside_op_mean']:.1f} us "
          f"(live slots {result['live_slots']})")
    common.write_json(args.json, result)


if __name__ == "__main__":
    main()
