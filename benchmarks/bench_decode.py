"""Decode time per step of a Llama-3-8B-shaped model: full caches vs CentroidKV, side by side.

For each (batch B, context L) that fits in device memory, the same model (random bf16 weights)
decodes one token per row with:
  stock        DynamicCache + attn_implementation="sdpa" (transformers' default path)
  static_sdpa  StaticCache (preallocated, written in place) + "sdpa"
  inplace_op   CentroidKVCache(ratio=0): preallocated, written in place, clustering off, read
               by the centroidkv attention op (GQA-native, no copies of KV heads)
  ckv_<r>      CentroidKVCache(ratio=r, policy=...) + attn_implementation="centroidkv"; --policy
               plain (default: the paper's PlainClustering) or default (CentroidKVCache's default,
               ProtectedClustering: same slot counts, plus its score buffers); the synthetic fill
               reproduces the layout their prefill leaves
best_full is the faster of static_sdpa and inplace_op: a speedup is read against it as well as
against stock. Caches are filled synthetically with the state a prefill of L tokens leaves
(e2e_common.fill_*), then `--warmup` steps run and `--steps` are timed (CUDA events around each
step, no host sync between steps; median reported, mean too since it includes the occasional
step where a block of tokens is clustered). The byte-count bound of a point is
(W + KV_full) / (W + KV_ckv): bytes a step must read with a full cache over those with the
clustered one (W: weights but the input embedding; KV_ckv: live slots' keys, values and sizes).

Prefill is measured by bench_prefill.py.

    python benchmarks/bench_decode.py --json decode.json               # GPU, Llama-3-8B shape
    python benchmarks/bench_decode.py --tiny --json /tmp/decode.json   # CPU smoke test
"""
from __future__ import annotations

import argparse

import torch

import e2e_common as common
from e2e_common import GB, CentroidKVCache, log

FULL_VARIANTS = ("stock", "static_sdpa", "inplace_op")
MARGIN_GB = 3.0  # activations, logits, the attention op's workspace, allocator slack


def variant_names(ratios) -> list[str]:
    return list(FULL_VARIANTS) + [f"ckv_{r:g}" for r in ratios]


def ratio_of(variant: str) -> float:
    return float(variant.split("_", 1)[1]) if variant.startswith("ckv_") else 0.0


def extra_steps(args) -> int:
    return args.warmup + args.steps + 16


def ckv_options(variant: str, policy: str):
    return CentroidKVCache(ratio=ratio_of(variant), policy=common.make_policy(policy)).options


def need_bytes(variant: str, shape, batch: int, context: int, args) -> tuple[int, int]:
    """(bytes the cache holds, bytes needed at peak) for a point, before running it."""
    full = common.kv_bytes_full(shape, batch, context)
    layer = full // shape.layers
    if variant == "stock":  # torch.cat grows one layer at a time: one more layer while copying
        return full, full + layer
    if variant == "static_sdpa":  # repeat_kv materialises keys and values at every query head
        held = common.kv_bytes_full(shape, batch, context + extra_steps(args))
        return held, held + layer * (shape.q_heads // shape.kv_heads)
    options = ckv_options(variant, args.policy)
    layout = common.centroidkv_layout(options, context)
    held = common.kv_bytes_centroidkv(shape, batch, layout.capacity, options.policy if options.clusters else None)
    return held, held + held // shape.layers  # one layer's buffers may be reallocated


def read_bytes(variant: str, shape, batch: int, context: int, policy: str = "plain") -> int:
    """KV bytes one decode step must read (keys, values, and sizes where the cache has them;
    a decode step does not read the policy's score buffers)."""
    if variant in ("stock", "static_sdpa"):
        return common.kv_bytes_full(shape, batch, context)
    live = common.centroidkv_layout(ckv_options(variant, policy), context).live
    return common.kv_bytes_centroidkv(shape, batch, live)


def make_cache(variant: str, model, shape, batch: int, context: int, args, device, dtype):
    if variant == "stock":
        common.use_attention(model, "sdpa")
        return common.fill_dynamic(model, shape, batch, context, device, dtype)
    if variant == "static_sdpa":
        common.use_attention(model, "sdpa")
        return common.fill_static(model, shape, batch, context, context + extra_steps(args), device, dtype)
    common.use_attention(model, "centroidkv")
    cache = CentroidKVCache(ratio=ratio_of(variant), policy=common.make_policy(args.policy))
    common.fill_centroidkv(cache, shape, batch, context, device, dtype)
    return cache


def ordered_points(batches, contexts) -> list[tuple[int, int]]:
    """The points the targets are about (B >= 8, L >= 32k) first, each group smallest first, so
    a deadline cuts the least important ones."""
    points = [(b, c) for b in batches for c in contexts]
    return sorted(points, key=lambda p: (not (p[0] >= 8 and p[1] >= 32768), p[0] * p[1], p[0]))


@torch.inference_mode()
def run_decode(model, shape, args, device, dtype, deadline, weights: int, checkpoint=None) -> list[dict]:
    results = []
    variants = [v for v in variant_names(args.ratios) if v in (args.variants or variant_names(args.ratios))]
    for batch, context in ordered_points(args.batches, args.contexts):
        for variant in variants:
            row = dict(batch=batch, context=context, variant=variant)
            held, peak = need_bytes(variant, shape, batch, context, args)
            row["kv_bytes_expected"] = held
            free = common.free_bytes(device, args.free_gb)
            if deadline.passed(args.min_point_s):
                row.update(status="skipped", reason="deadline")
            elif peak + MARGIN_GB * GB * (device.type == "cuda") > free:
                row.update(status="skipped", reason=f"memory: needs {peak / GB:.1f} GB + margin, "
                                                    f"{free / GB:.1f} GB free")
            else:
                row.update(run_point(variant, model, shape, batch, context, args, device, dtype, weights))
            results.append(row)
            if checkpoint:
                checkpoint(results)
            if row["status"] == "ok":
                log(f"  B={batch:<3} L={context:<7} {variant:<12} {row['ms_median']:9.2f} ms/step "
                    f"(mean {row['ms_mean']:.2f}, host {row['host_ms_median']:.2f}) "
                    f"KV held {row['kv_bytes_held'] / GB:.2f} GB")
            else:
                log(f"  B={batch:<3} L={context:<7} {variant:<12} {row['status']}: {row.get('reason', '')}")
    return results


def run_point(variant, model, shape, batch, context, args, device, dtype, weights) -> dict:
    cache = None
    try:
        cache = make_cache(variant, model, shape, batch, context, args, device, dtype)
        held = common.cache_bytes(cache)
        live = cache.live_slots(0)[0] if isinstance(cache, CentroidKVCache) else None
        tokens = torch.randint(shape.vocab, (batch, 1), device=device)
        timing = common.time_steps(device, lambda i: common.forward(model, tokens, cache),
                                   args.warmup, args.steps)
        moved = weights + read_bytes(variant, shape, batch, context, args.policy)
        out = dict(status="ok", kv_bytes_held=held, bytes_read_per_step=moved,
                   gbs=moved / timing["ms_median"] / 1e6,
                   tokens_per_s=batch * 1e3 / timing["ms_median"], **timing)
        if live is not None:  # per row and KV head, before and after the timed steps
            out.update(live_slots=live, live_slots_end=cache.live_slots(0)[0])
        return out
    except Exception as error:  # noqa: BLE001 - one bad point must not end the run
        return common.failed_point(error)
    finally:
        del cache
        common.release(device)


def compare(results: list[dict], shape, weights: int, ratios, policy: str = "plain") -> list[dict]:
    """Per point and ratio: speedups vs stock and vs best full, the byte bound, its fraction."""
    ok = {(r["batch"], r["context"], r["variant"]): r for r in results if r["status"] == "ok"}
    rows = []
    for batch, context in sorted({(r["batch"], r["context"]) for r in results}):
        get = lambda v: ok.get((batch, context, v))  # noqa: E731
        fulls = [r for r in (get("static_sdpa"), get("inplace_op")) if r]
        best = min(fulls, key=lambda r: r["ms_median"]) if fulls else None
        stock = get("stock")
        full_kv = common.kv_bytes_full(shape, batch, context)
        for ratio in ratios:
            ckv = get(f"ckv_{ratio:g}")
            if ckv is None:
                continue
            kv = read_bytes(f"ckv_{ratio:g}", shape, batch, context, policy)
            bound = (weights + full_kv) / (weights + kv)
            row = dict(batch=batch, context=context, ratio=ratio, ckv_ms=ckv["ms_median"],
                       bound=bound, kv_bytes_held=ckv["kv_bytes_held"])
            if stock:
                row.update(stock_ms=stock["ms_median"], speedup_vs_stock=stock["ms_median"] / ckv["ms_median"],
                           memory_vs_stock=stock["kv_bytes_held"] / ckv["kv_bytes_held"])
            if best:
                speedup = best["ms_median"] / ckv["ms_median"]
                row.update(best_full=best["variant"], best_full_ms=best["ms_median"],
                           speedup_vs_best_full=speedup, fraction_of_bound=speedup / bound)
            rows.append(row)
    return rows


def print_table(payload: dict) -> None:
    if payload["decode"]:
        print_decode_table(payload)


def print_decode_table(payload: dict) -> None:
    log(f"\nDecode, {payload['env']['device']}: ms per step (B tokens per step); speedup of CentroidKV "
        f"vs stock and vs the best full cache; byte bound (W + KV_full) / (W + KV_ckv)")
    header = (f"{'B':>3} {'L':>7} {'r':>5} {'stock':>8} {'best full':>18} {'ckv':>8} {'x stock':>8} "
              f"{'x best':>7} {'bound':>6} {'of bound':>8} {'KV GB':>7}")
    log(header)
    log("-" * len(header))
    for c in payload["comparisons"]:
        best = f"{c['best_full_ms']:.2f} {c['best_full']}" if "best_full" in c else "-"
        log(f"{c['batch']:>3} {c['context']:>7} {c['ratio']:>5g} {c.get('stock_ms', float('nan')):>8.2f} "
            f"{best:>18} {c['ckv_ms']:>8.2f} {c.get('speedup_vs_stock', float('nan')):>7.2f}x "
            f"{c.get('speedup_vs_best_full', float('nan')):>6.2f}x {c['bound']:>5.2f}x "
            f"{c.get('fraction_of_bound', float('nan')):>8.2f} {c['kv_bytes_held'] / GB:>7.2f}")
    skipped = [r for r in payload["decode"] if r["status"] != "ok"]
    for r in skipped:
        log(f"  not measured: B={r['batch']} L={r['context']} {r['variant']}: {r['status']} ({r.get('reason', '')})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiny", action="store_true", help="tiny model and sizes (CPU smoke test)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--contexts", type=int, nargs="+", default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    common.add_policy_argument(parser)
    parser.add_argument("--variants", nargs="+", default=None, help="subset of the variants to run")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps per point")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--free-gb", type=float, default=None,
                        help="pretend this much memory is free (default: measured on CUDA, unlimited on CPU)")
    parser.add_argument("--deadline-s", type=float, default=None, help="start no new point after this")
    parser.add_argument("--min-point-s", type=float, default=None,
                        help="start a point only if this many seconds are left")
    parser.add_argument("--json", default=None)


DEFAULTS = dict(contexts=([8192, 32768, 65536, 131072], [256, 1024]), batches=([1, 8, 32], [1, 2]),
                steps=(10, 3), warmup=(3, 1), min_point_s=(12.0, 0.0))  # (GPU, --tiny)


def main(argv=None, model=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    setup = common.start(parser, argv, DEFAULTS, model,
                         lambda a: max(a.contexts) + 4096)
    args, deadline, device, shape, model = setup.args, setup.deadline, setup.device, setup.shape, setup.model
    dtype = shape.dtype
    weights = common.weight_bytes_read_per_step(model)
    log(f"{common.device_name(device)}: weights read per step {weights / GB:.2f} GB; "
        f"free {common.free_bytes(device, args.free_gb) / GB:.1f} GB")
    payload = dict(env=common.environment(device), shape=shape.__dict__, dtype=str(dtype),
                   weights_bytes_read=weights, args=vars(args), decode=[], comparisons=[])
    # Written after every point too, so a run cut short keeps what it measured.
    checkpoint = lambda rows: common.write_json(args.json, {**payload, "decode": rows, "partial": True})  # noqa: E731
    payload["decode"] = run_decode(model, shape, args, device, dtype, deadline, weights, checkpoint)
    payload["comparisons"] = compare(payload["decode"], shape, weights, args.ratios, args.policy)
    common.write_json(args.json, payload)
    print_table(payload)
    return payload


if __name__ == "__main__":
    main()
