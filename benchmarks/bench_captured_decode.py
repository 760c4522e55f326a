"""Decode step time with captured steps: CentroidKVCache(max_cache_len=...) against the fastest
full cache, each run eagerly and compiled, side by side in one run.

Variants (one token per row per step, after a synthetic fill of L tokens, e2e_common.fill_*):
  stock_eager         DynamicCache + "sdpa", eager (transformers' default path)
  static_eager        StaticCache + "sdpa", eager
  static_compiled     StaticCache + "sdpa", compiled step (transformers' compiled decode)
  ckv_0_<mode>        CentroidKVCache(ratio=0, max_cache_len): a full cache read by the centroidkv
                      op (GQA-native), eager or compiled
  ckv_<r>_<mode>      CentroidKVCache(ratio=r, policy, max_cache_len), eager or compiled; every
                      `block` steps CentroidKVCache.settle clusters the block that left the window
"compiled" is torch.compile(one token's forward, fullgraph=True), mode="reduce-overhead" on CUDA
(CUDA graphs replay the step), the default mode on the CPU. cache.settle() runs after every step
of every CentroidKV variant, inside the timed region: the step time includes the clustering.

Times are the mean over `--steps` (CUDA events, no host sync between steps; wall clock on the
CPU), so the steps that cluster count; the median is in the JSON too. Per point and ratio: the
speedup of ckv_<r>_compiled over the fastest full cache measured in this run (any variant, eager
or compiled), the byte bound (W + KV_full) / (W + KV_ckv), and the byte floor: the bytes a
step must read (W: weights but the input embedding; KV: live slots' keys, values, sizes) at the
device copy bandwidth measured at the start of the run.

    python benchmarks/bench_captured_decode.py --json captured.json                      # GPU, 8B shape
    python benchmarks/bench_captured_decode.py --model smollm2 --batches 8 --contexts 4096  # CPU
    python benchmarks/bench_captured_decode.py --tiny --json /tmp/captured.json          # smoke test
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import e2e_common as common  # noqa: E402
from e2e_common import GB, CentroidKVCache, log  # noqa: E402

FULL = ("stock_eager", "static_eager", "static_compiled", "ckv_0_eager", "ckv_0_compiled")
MARGIN_GB = 3.0  # activations, logits, CUDA graph pools, allocator slack


def variant_names(ratios, eager: bool = True) -> list[str]:
    names = list(FULL) + [f"ckv_{r:g}_{mode}" for r in ratios for mode in ("eager", "compiled")]
    return [n for n in names if eager or n == "stock_eager" or not n.endswith("_eager")]


def ratio_of(variant: str) -> float:
    return float(variant.split("_")[1]) if variant.startswith("ckv_") else 0.0


def horizon(args, context: int) -> int:
    """max_cache_len of a point: the context plus every step the point runs."""
    return context + args.warmup + args.steps + 8


def need_bytes(variant: str, shape, batch: int, context: int, args) -> int:
    """Bytes a point needs at its peak beyond the model (the cache, a layer of copies)."""
    if variant.startswith("stock"):  # torch.cat grows one layer at a time
        return common.kv_bytes_full(shape, batch, context) * (shape.layers + 1) // shape.layers
    if variant.startswith("static"):  # repeat_kv materialises one layer's KV at every query head
        held = common.kv_bytes_full(shape, batch, horizon(args, context))
        return held + held // shape.layers * (shape.q_heads // shape.kv_heads)
    options = make_cache(variant, args, context).options
    layout = common.centroidkv_layout(options, context)
    return common.kv_bytes_centroidkv(shape, batch, layout.capacity, options.policy if options.clusters else None)


def make_cache(variant: str, args, context: int) -> CentroidKVCache:
    return CentroidKVCache(ratio=ratio_of(variant), policy=common.make_policy(args.policy),
                           max_cache_len=horizon(args, context))


def read_bytes(variant: str, shape, batch: int, context: int, args) -> int:
    """KV bytes a step must read: every token's keys and values for a full cache, the live slots
    (keys, values, sizes) for CentroidKV."""
    if ratio_of(variant) == 0:
        return common.kv_bytes_full(shape, batch, context)
    live = common.centroidkv_layout(make_cache(variant, args, context).options, context).live
    return common.kv_bytes_centroidkv(shape, batch, live)


def copy_bandwidth(device) -> float:
    """Bytes per second of a large device copy (read + write), the byte floor's bandwidth."""
    n = (1 << 30) if device.type == "cuda" else (1 << 27)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = min(common.time_once(device, lambda: dst.copy_(src)) for _ in range(5))
    del src, dst
    return 2 * n / (ms / 1e3)


def prepare(variant: str, model, shape, batch: int, context: int, args, device):
    """(cache, step function) of a point; the step decodes one token and settles the cache."""
    dtype = shape.dtype
    if variant.startswith("stock"):
        common.use_attention(model, "sdpa")
        cache = common.fill_dynamic(model, shape, batch, context, device, dtype)
    elif variant.startswith("static"):
        common.use_attention(model, "sdpa")
        cache = common.fill_static(model, shape, batch, context, horizon(args, context), device, dtype)
    else:
        common.use_attention(model, "centroidkv")
        cache = make_cache(variant, args, context)
        common.fill_centroidkv(cache, shape, batch, context, device, dtype)
    return cache, common.decode_step(model, cache, batch, context, device, variant.endswith("_compiled"))


def run_point(variant, model, shape, batch, context, args, device, weights) -> dict:
    cache = None
    try:
        cache, step = prepare(variant, model, shape, batch, context, args, device)
        start = time.perf_counter()
        first = common.time_once(device, lambda: step(0))  # compiles, for the compiled variants
        out = dict(status="ok", first_step_ms=first, compile_s=time.perf_counter() - start)
        counters.clear()
        timing = common.time_steps(device, lambda i: step(i + 1), args.warmup, args.steps)
        if variant.endswith("_compiled"):  # a step that fell back or recompiled is not what we time
            out.update(graphs_after_first_step=counters["stats"]["unique_graphs"],
                       cudagraph_skips=counters["inductor"]["cudagraph_skips"])
        moved = weights + read_bytes(variant, shape, batch, context, args)
        out.update(kv_bytes_held=common.cache_bytes(cache), bytes_read_per_step=moved,
                   tokens_per_s=batch * 1e3 / timing["ms_mean"], **timing)
        if isinstance(cache, CentroidKVCache):
            out.update(live_slots_end=cache.live_slots(0)[0])
        return out
    except Exception as error:  # noqa: BLE001 - one bad point must not end the run
        return common.failed_point(error)
    finally:
        del cache
        torch.compiler.reset()  # each point compiles its own step; drop the last one's graphs
        common.release(device)


def ordered_points(args) -> list[tuple[int, int]]:
    """--points in the order given, else the points the targets are about (B >= 8, L >= 32k)
    first, each group smallest first."""
    if args.points:
        return [tuple(int(n) for n in point.lower().split("x")) for point in args.points]
    points = [(b, c) for b in args.batches for c in args.contexts]
    return sorted(points, key=lambda p: (not (p[0] >= 8 and p[1] >= 32768), p[0] * p[1], p[0]))


@torch.inference_mode()
def run(model, shape, args, device, deadline, weights, checkpoint) -> list[dict]:
    results = []
    variants = [v for v in variant_names(args.ratios, not args.no_eager) if not args.variants or v in args.variants]
    compile_s = 0.0  # the longest compile so far: a point starts only if it fits its variants' compiles
    for batch, context in ordered_points(args):
        for variant in variants:
            row = dict(batch=batch, context=context, variant=variant)
            need = need_bytes(variant, shape, batch, context, args)
            free = common.free_bytes(device, args.free_gb)
            if deadline.passed(args.min_point_s + compile_s * variant.endswith("_compiled")):
                row.update(status="skipped", reason="deadline")
            elif need + MARGIN_GB * GB * (device.type == "cuda") > free:
                row.update(status="skipped", reason=f"memory: needs {need / GB:.1f} GB + margin, {free / GB:.1f} GB free")
            else:
                row.update(run_point(variant, model, shape, batch, context, args, device, weights))
                if variant.endswith("_compiled") and row["status"] == "ok":
                    compile_s = max(compile_s, row["compile_s"])
            results.append(row)
            checkpoint(results)
            if row["status"] == "ok":
                extra = (f", new graphs {row['graphs_after_first_step']}, cudagraph skips {row['cudagraph_skips']}"
                         if "cudagraph_skips" in row else "")
                log(f"  B={batch:<3} L={context:<7} {variant:<18} {row['ms_mean']:9.2f} ms/step (median "
                    f"{row['ms_median']:.2f}, host {row['host_ms_median']:.2f}, first {row['first_step_ms'] / 1e3:.1f} s"
                    f"{extra})")
            else:
                log(f"  B={batch:<3} L={context:<7} {variant:<18} {row['status']}: {row.get('reason', '')}")
    return results


def compare(results: list[dict], shape, weights: int, args, bandwidth: float) -> list[dict]:
    ok = {(r["batch"], r["context"], r["variant"]): r for r in results if r["status"] == "ok"}
    rows = []
    for batch, context in sorted({(r["batch"], r["context"]) for r in results}):
        fulls = [r for v in FULL if (r := ok.get((batch, context, v)))]
        best = min(fulls, key=lambda r: r["ms_mean"]) if fulls else None
        full_bytes = weights + common.kv_bytes_full(shape, batch, context)
        for ratio in args.ratios:
            ckv = ok.get((batch, context, f"ckv_{ratio:g}_compiled"))
            if ckv is None:
                continue
            eager = ok.get((batch, context, f"ckv_{ratio:g}_eager"))
            floor_ms = ckv["bytes_read_per_step"] / bandwidth * 1e3
            row = dict(batch=batch, context=context, ratio=ratio, ckv_ms=ckv["ms_mean"], floor_ms=floor_ms,
                       of_floor=ckv["ms_mean"] / floor_ms, bound=full_bytes / ckv["bytes_read_per_step"],
                       full_floor_ms=full_bytes / bandwidth * 1e3)
            if eager:
                row.update(ckv_eager_ms=eager["ms_mean"], compiled_speedup=eager["ms_mean"] / ckv["ms_mean"])
            if best:
                row.update(best_full=best["variant"], best_full_ms=best["ms_mean"],
                           speedup_vs_best_full=best["ms_mean"] / ckv["ms_mean"])
            stock = ok.get((batch, context, "stock_eager"))
            if stock:
                row.update(speedup_vs_stock=stock["ms_mean"] / ckv["ms_mean"])
            rows.append(row)
    return rows


def print_tables(payload: dict) -> None:
    log(f"\nCaptured decode, {payload['env']['device']}: mean ms per step (clustering steps included); "
        f"byte floor at {payload['bandwidth_gbs']:.0f} GB/s")
    by_point = {}
    for r in payload["decode"]:
        by_point.setdefault((r["batch"], r["context"]), {})[r["variant"]] = r
    names = payload["variants"]
    header = f"{'B':>3} {'L':>7} " + " ".join(f"{n:>16}" for n in names)
    log(header)
    log("-" * len(header))
    for (batch, context), row in sorted(by_point.items()):
        cells = [f"{row[n]['ms_mean']:>16.2f}" if row.get(n, {}).get("status") == "ok" else f"{'-':>16}" for n in names]
        log(f"{batch:>3} {context:>7} " + " ".join(cells))
    log(f"\n{'B':>3} {'L':>7} {'r':>5} {'ckv comp':>9} {'ckv eager':>9} {'x eager':>7} {'best full':>26} "
        f"{'x best':>7} {'x stock':>7} {'bound':>6} {'floor':>7} {'of floor':>8}")
    for c in payload["comparisons"]:
        best = f"{c['best_full_ms']:.2f} {c['best_full']}" if "best_full" in c else "-"
        log(f"{c['batch']:>3} {c['context']:>7} {c['ratio']:>5g} {c['ckv_ms']:>9.2f} "
            f"{c.get('ckv_eager_ms', float('nan')):>9.2f} {c.get('compiled_speedup', float('nan')):>6.2f}x "
            f"{best:>26} {c.get('speedup_vs_best_full', float('nan')):>6.2f}x "
            f"{c.get('speedup_vs_stock', float('nan')):>6.2f}x {c['bound']:>5.2f}x {c['floor_ms']:>7.2f} "
            f"{c['of_floor']:>7.2f}x")
    for r in payload["decode"]:
        if r["status"] != "ok":
            log(f"  not measured: B={r['batch']} L={r['context']} {r['variant']}: {r['status']} ({r.get('reason', '')})")


DEFAULTS = dict(contexts=([32768, 65536, 8192, 131072], [96, 300]), batches=([8, 1, 16], [2]),
                steps=(128, 40), warmup=(3, 2), min_point_s=(20.0, 0.0))  # (GPU, --tiny)


def main(argv=None, model=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="8b", help="8b (default: Llama-3-8B shape, random bf16 weights), "
                        "smollm2 or gemma3 (offline GGUF, float32); --tiny: a tiny random model")
    parser.add_argument("--tiny", action="store_true", help="tiny model and sizes (CPU smoke test)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--contexts", type=int, nargs="+", default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--points", nargs="+", default=None, help="BxL points in this order (e.g. 8x32768 1x8192); "
                        "replaces --batches/--contexts")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.75])
    common.add_policy_argument(parser)
    parser.add_argument("--variants", nargs="+", default=None, help="subset of the variants to run")
    parser.add_argument("--no-eager", action="store_true", help="compiled variants only (and stock_eager)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per point (cover a few blocks)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--free-gb", type=float, default=None)
    parser.add_argument("--deadline-s", type=float, default=None, help="start no new point after this")
    parser.add_argument("--min-point-s", type=float, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        args.model = "tiny"
    common.fill_defaults(args, DEFAULTS)
    if args.no_eager and args.variants is None:
        args.variants = variant_names(args.ratios, False)
    device = common.pick_device(args.device)
    deadline = common.Deadline(args.deadline_s)
    if model is None:
        log(f"loading {args.model} on {device} ...")
        longest = max(c for _, c in ordered_points(args))
        model = common.load_model(args.model, device, longest + args.warmup + args.steps + 64)
    shape = common.shape_of(model)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    weights = common.weight_bytes_read_per_step(model)
    bandwidth = copy_bandwidth(device)
    log(f"{common.device_name(device)}: weights read per step {weights / GB:.2f} GB; copy "
        f"{bandwidth / GB:.0f} GB/s; free {common.free_bytes(device, args.free_gb) / GB:.1f} GB")
    payload = dict(env=common.environment(device), model=args.model, shape={**shape.__dict__, "dtype": str(shape.dtype)},
                   weights_bytes_read=weights, bandwidth_gbs=bandwidth / GB, args=vars(args),
                   variants=[v for v in variant_names(args.ratios) if not args.variants or v in args.variants],
                   decode=[], comparisons=[])
    checkpoint = lambda rows: common.write_json(args.json, {**payload, "decode": rows, "partial": True})  # noqa: E731
    payload["decode"] = run(model, shape, args, device, deadline, weights, checkpoint)
    payload["comparisons"] = compare(payload["decode"], shape, weights, args, bandwidth)
    common.write_json(args.json, payload)
    print_tables(payload)
    return payload


if __name__ == "__main__":
    main()
