"""Serving density at a fixed KV memory budget: full cache vs CentroidKV, side by side.

Requests have --prompt tokens (32k) and generate --generate tokens (256). Under a KV budget
(--kv-budget-gb, default: free device memory after the weights minus --margin-gb):
  full      bytes per sequence = keys + values of prompt + generated tokens, preallocated exactly
            (no slack, no sizes: the most favourable accounting for the full cache)
  ckv_<r>   bytes per sequence = the most a CentroidKVCache(ratio=r) row (--policy: plain =
            PlainClustering, default = CentroidKVCache's default policy) holds (keys, values,
            sizes, capacity slack) at any step while generating: one layer is filled with the
            prompt's prefill state and runs --generate real update + settle steps (clustering
            included); times the layer count
Sequences that fit = floor(budget / bytes per sequence). Generated tokens per second when that
many sequences decode at once: a batched cache filled synthetically with the prompt's state
(e2e_common.fill_*), --warmup steps, then --steps timed (not all --generate; CUDA events per
step). The full cache decodes with the preallocated in-place cache and the centroidkv attention
op (clustering off; the fastest full path in bench_decode) and, where it fits, with stock
DynamicCache + SDPA (fewer steps: it is slow). tokens/s = sequences / step time, from the median
step and from the mean step (the mean includes the steps that cluster a block).
--captured: every cache but stock has max_cache_len (static buffers, their bytes counted) and
each step is compiled (CUDA graphs on a GPU, bench_captured_decode.py), and transformers'
StaticCache decodes compiled too (static_compiled): speed at equal memory without host time.

    python benchmarks/bench_serving.py --json serving.json             # GPU, Llama-3-8B shape
    python benchmarks/bench_serving.py --tiny --json /tmp/serving.json # CPU smoke test
"""
from __future__ import annotations

import argparse
from typing import Optional

import torch

import e2e_common as common
from e2e_common import GB, CentroidKVCache, log


@torch.inference_mode()
def peak_bytes_per_sequence(ratio: float, shape, prompt: int, generate: int, device, dtype,
                            policy: str = "plain", horizon: Optional[int] = None) -> dict:
    """Most bytes one CentroidKVCache row holds over a request (all layers), by running one layer."""
    cache = CentroidKVCache(ratio=ratio, policy=common.make_policy(policy), max_cache_len=horizon)
    one_layer = common.Shape(**{**shape.__dict__, "layers": 1})
    common.fill_centroidkv(cache, one_layer, 1, prompt, device, dtype)
    layer = cache.layers[0]
    peak, live_max = layer.memory_bytes(), layer.lengths[0]
    token = torch.randn(1, shape.kv_heads, 1, shape.head_dim, device=device, dtype=dtype)
    for _ in range(generate):
        layer.update(token, torch.randn_like(token))
        layer.attention_inputs()  # what the "centroidkv" attention reads, then settles
        layer.settle(between_steps=True)
        peak, live_max = max(peak, layer.memory_bytes()), max(live_max, layer.lengths[0])
    return dict(bytes=peak * shape.layers, live_slots_max=live_max, capacity_end=layer.capacity)


def decode_rate(variant: str, model, shape, batch: int, args, device, dtype, steps: int) -> dict:
    cache = None
    try:
        horizon = args.prompt + args.generate
        if variant == "stock":
            common.use_attention(model, "sdpa")
            cache = common.fill_dynamic(model, shape, batch, args.prompt, device, dtype)
        elif variant == "static_compiled":
            common.use_attention(model, "sdpa")
            cache = common.fill_static(model, shape, batch, args.prompt, horizon, device, dtype)
        else:
            common.use_attention(model, "centroidkv")
            ratio = 0.0 if variant == "full_inplace" else args.ratio
            cache = CentroidKVCache(ratio=ratio, policy=common.make_policy(args.policy),
                                    max_cache_len=horizon if args.captured else None)
            # The full cache is preallocated for the whole request, as a serving system would.
            capacity = horizon if ratio == 0 else None
            common.fill_centroidkv(cache, shape, batch, args.prompt, device, dtype, capacity=capacity)
        held = common.cache_bytes(cache)
        compiled = args.captured and variant != "stock"
        step = common.decode_step(model, cache, batch, args.prompt, device, compiled)
        timing = common.time_steps(device, step, args.warmup + compiled, steps)
        return dict(status="ok", batch=batch, kv_bytes_held=held,
                    tokens_per_s=batch * 1e3 / timing["ms_median"],
                    tokens_per_s_mean=batch * 1e3 / timing["ms_mean"], **timing)
    except Exception as error:  # noqa: BLE001 - one bad point must not end the run
        return dict(common.failed_point(error), batch=batch)
    finally:
        del cache
        common.release(device)


@torch.inference_mode()
def run(model, shape, args, device, dtype, deadline) -> dict:
    weights = common.weight_bytes_read_per_step(model)
    free = common.free_bytes(device, args.free_gb)
    full_per_seq = common.kv_bytes_full(shape, 1, args.prompt + args.generate)
    if args.kv_budget_gb is not None:
        budget = args.kv_budget_gb * GB
    elif args.tiny:
        budget = 4 * full_per_seq
    else:
        budget = free - args.margin_gb * GB
    ckv = peak_bytes_per_sequence(args.ratio, shape, args.prompt, args.generate, device, dtype, args.policy,
                                  args.prompt + args.generate if args.captured else None)
    fits = {"full": int(budget // full_per_seq), f"ckv_{args.ratio:g}": int(budget // ckv["bytes"])}
    fits = {k: min(v, args.max_batch) for k, v in fits.items()}
    out = dict(prompt=args.prompt, generate=args.generate, ratio=args.ratio, kv_budget_bytes=budget,
               free_bytes_before=free, weights_bytes_read=weights,
               bytes_per_sequence={"full": full_per_seq, f"ckv_{args.ratio:g}": ckv["bytes"]},
               ckv_live_slots_max=ckv["live_slots_max"], sequences=fits,
               timed_steps=dict(full_inplace=args.steps, ckv=args.steps, stock=args.stock_steps),
               note=f"decode timed for the given steps from a {args.prompt}-token context, not all "
                    f"{args.generate} generated tokens", runs={})
    log(f"KV budget {budget / GB:.2f} GB: full {full_per_seq / GB:.3f} GB/seq -> {fits['full']} seqs; "
        f"ckv_{args.ratio:g} {ckv['bytes'] / GB:.3f} GB/seq -> {fits[f'ckv_{args.ratio:g}']} seqs")
    plan = [("full_inplace", fits["full"], args.steps), (f"ckv_{args.ratio:g}", fits[f"ckv_{args.ratio:g}"], args.steps),
            ("stock", fits["full"], args.stock_steps)]
    if args.captured:
        plan.insert(1, ("static_compiled", fits["full"], args.steps))
    for variant, batch, steps in plan:
        if batch < 1:
            out["runs"][variant] = dict(status="skipped", reason="no sequence fits the budget")
        elif deadline.passed(args.min_point_s):
            out["runs"][variant] = dict(status="skipped", reason="deadline")
        elif variant == "stock" and device.type == "cuda" and (
                common.kv_bytes_full(shape, batch, args.prompt) * (1 + 1 / shape.layers) + args.margin_gb * GB / 2
                > common.free_bytes(device)):
            out["runs"][variant] = dict(status="skipped", reason="memory: torch.cat needs one more layer")
        else:
            out["runs"][variant] = decode_rate(variant, model, shape, batch, args, device, dtype, steps)
        r = out["runs"][variant]
        if r["status"] == "ok":
            log(f"  {variant:<13} B={batch:<4} {r['ms_median']:9.2f} ms/step (mean {r['ms_mean']:.2f}) "
                f"{r['tokens_per_s']:10.1f} tok/s, KV held {r['kv_bytes_held'] / GB:.2f} GB")
        else:
            log(f"  {variant:<13} B={batch:<4} {r['status']}: {r.get('reason', '')}")
    runs = out["runs"]
    ckv_run = runs.get(f"ckv_{args.ratio:g}", {})
    if ckv_run.get("status") == "ok":
        for base in ("full_inplace", "static_compiled", "stock"):
            if runs.get(base, {}).get("status") == "ok":
                out[f"throughput_vs_{base}"] = ckv_run["tokens_per_s"] / runs[base]["tokens_per_s"]
                out[f"throughput_vs_{base}_mean"] = ckv_run["tokens_per_s_mean"] / runs[base]["tokens_per_s_mean"]
    if fits["full"] > 0:
        out["sequences_ratio"] = fits[f"ckv_{args.ratio:g}"] / fits["full"]
    return out


def print_table(payload: dict) -> None:
    s = payload["serving"]
    log(f"\nServing, {payload['env']['device']}: {s['prompt']}-token prompts, {s['generate']} generated, "
        f"KV budget {s['kv_budget_bytes'] / GB:.1f} GB ({s['note']})")
    header = f"{'cache':<13} {'GB/seq':>8} {'seqs':>5} {'ms/step':>9} {'tok/s':>9} {'tok/s(mean)':>11}"
    log(header)
    log("-" * len(header))
    for variant, r in s["runs"].items():
        key = "full" if variant in ("full_inplace", "static_compiled", "stock") else variant
        per_seq = s["bytes_per_sequence"][key] / GB
        if r["status"] == "ok":
            log(f"{variant:<13} {per_seq:>8.4g} {r['batch']:>5} {r['ms_median']:>9.2f} "
                f"{r['tokens_per_s']:>9.1f} {r['tokens_per_s_mean']:>11.1f}")
        else:
            log(f"{variant:<13} {per_seq:>8.4g} {'-':>5} {r['status']}: {r.get('reason', '')}")
    for key in ("sequences_ratio", "throughput_vs_full_inplace", "throughput_vs_static_compiled", "throughput_vs_stock"):
        if key in s:
            log(f"  {key}: {s[key]:.2f}x")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiny", action="store_true", help="tiny model and sizes (CPU smoke test)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--prompt", type=int, default=None)
    parser.add_argument("--generate", type=int, default=None)
    parser.add_argument("--ratio", type=float, default=0.75)
    common.add_policy_argument(parser)
    parser.add_argument("--captured", action="store_true",
                        help="static buffers and compiled (CUDA-graph) decode steps; StaticCache compiled too")
    parser.add_argument("--kv-budget-gb", type=float, default=None)
    parser.add_argument("--margin-gb", type=float, default=8.0,
                        help="memory kept free besides the KV budget (activations, allocator slack)")
    parser.add_argument("--max-batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps (in-place and CentroidKV)")
    parser.add_argument("--stock-steps", type=int, default=None, help="timed decode steps for stock")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--free-gb", type=float, default=None)
    parser.add_argument("--deadline-s", type=float, default=None)
    parser.add_argument("--min-point-s", type=float, default=None)
    parser.add_argument("--json", default=None)


DEFAULTS = dict(prompt=(32768, 512), generate=(256, 32), steps=(64, 3), stock_steps=(6, 2),
                warmup=(3, 1), min_point_s=(15.0, 0.0))  # (GPU, --tiny)


def main(argv=None, model=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    setup = common.start(parser, argv, DEFAULTS, model, lambda a: a.prompt + a.generate + 4096)
    args, deadline, device, shape, model = setup.args, setup.deadline, setup.device, setup.shape, setup.model
    dtype = shape.dtype
    serving = run(model, shape, args, device, dtype, deadline)
    payload = dict(env=common.environment(device), shape=shape.__dict__, dtype=str(dtype),
                   args=vars(args), serving=serving)
    common.write_json(args.json, payload)
    print_table(payload)
    return payload


if __name__ == "__main__":
    main()
