"""Prefill time and peak memory: stock transformers (SDPA, DynamicCache) against the "centroidkv"
attention with clustering off and with the policy, side by side in one run.

Variants (each a real forward of the whole prompt, logits of the last position only):
  stock             attn_implementation="sdpa", DynamicCache
  ckv_off           attn_implementation="centroidkv", CentroidKVCache(ratio=0)
  ckv_<r>           the same with clustering at ratio r (window scores observed, then clustering)
  ckv_<r>_scored    centroidkv.prefill: also the per-token surprisal pass (token-score policies)
With --chunk C, stock_chunked and ckv_<r>_chunked feed the prompt in blocks of C tokens (a
block over clustered slots takes the split attention path). Reps interleave the variants; a
first round warms up (before the first context only). Peak memory is the CUDA allocator's peak
above the model (CPU: not measured).

    python benchmarks/bench_prefill.py --model smollm2 --contexts 8192 --json out.json   # CPU
    python benchmarks/bench_prefill.py --model 8b --contexts 32768 131072                   # GPU
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import centroidkv  # noqa: E402
import e2e_common as common  # noqa: E402
from centroidkv.cache import CentroidKVCache, cache_argument  # noqa: E402
from e2e_common import GB, log  # noqa: E402


def variant_names(ratio: float, chunk) -> list[str]:
    names = ["stock", "ckv_off", f"ckv_{ratio:g}", f"ckv_{ratio:g}_scored"]
    if chunk:
        names += ["stock_chunked", f"ckv_{ratio:g}_chunked"]
    return names


def run_variant(variant: str, model, tokens, args, device) -> float:
    """Milliseconds of one prefill of `tokens` in the given variant."""
    stock = variant.startswith("stock")
    common.use_attention(model, "sdpa" if stock else "centroidkv")
    if stock:
        cache = common.DynamicCache(config=model.config)
    else:
        ratio = 0.0 if variant == "ckv_off" else args.ratio
        cache = CentroidKVCache(ratio=ratio, policy=common.make_policy(args.policy))
    kwargs = {cache_argument(model): cache, "use_cache": True}
    blocks = [(0, tokens.shape[1])]
    if variant.endswith("_chunked"):
        blocks = [(s, min(s + args.chunk, tokens.shape[1])) for s in range(0, tokens.shape[1], args.chunk)]

    def prefill():
        if variant.endswith("_scored"):
            centroidkv.prefill(model, tokens, cache)
            return
        for start, stop in blocks:
            model(input_ids=tokens[:, start:stop], logits_to_keep=1, **kwargs)
    try:
        with torch.no_grad():
            return common.time_once(device, prefill)
    finally:
        del cache, kwargs
        common.release(device)


def measure(context: int, model, args, device, warmup: bool) -> dict:
    variants = [v for v in variant_names(args.ratio, args.chunk) if not args.variants or v in args.variants + ["stock", "ckv_off"]]
    if args.long_context and context > args.long_context:  # the costly contexts: the main three
        variants = [v for v in variants if v in ("stock", "ckv_off", f"ckv_{args.ratio:g}")]
    tokens = torch.randint(model.config.vocab_size, (args.batch, context), device=device)
    times = {v: [] for v in variants}
    peak = {}
    cuda = device.type == "cuda"
    base = torch.cuda.memory_allocated(device) if cuda else 0
    for rep in range(0 if warmup else 1, 1 + args.reps):  # round 0 warms up
        for variant in variants:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            ms = run_variant(variant, model, tokens, args, device)
            if cuda:
                peak[variant] = max(peak.get(variant, 0), torch.cuda.max_memory_allocated(device) - base)
            if rep:
                times[variant].append(ms)
        if rep:
            log(f"  L={context} rep {rep}: " + ", ".join(f"{v} {times[v][-1]:.0f} ms" for v in variants))
    median = {v: statistics.median(t) for v, t in times.items()}
    row = dict(context=context, batch=args.batch, reps=args.reps, times_ms=times, median_ms=median,
               vs_stock={v: median[v] / median["stock"] for v in variants},
               vs_ckv_off={v: median[v] / median["ckv_off"] for v in variants if v.startswith("ckv_")})
    if peak:
        row["peak_bytes"] = peak
        row["peak_vs_stock"] = {v: peak[v] / peak["stock"] for v in variants}
    return row


def print_table(rows: list[dict], env: dict) -> None:
    log(f"\nPrefill, {env['device']}, torch {env['torch']}: median ms; x stock; x ckv_off; peak GB x stock")
    for row in rows:
        log(f"B={row['batch']} L={row['context']} ({row['reps']} reps)")
        for v, ms in row["median_ms"].items():
            rel = row["vs_ckv_off"].get(v)
            mem = ""
            if "peak_bytes" in row:
                mem = f"  {row['peak_bytes'][v] / GB:6.2f} GB {row['peak_vs_stock'][v]:5.3f}x"
            log(f"  {v:<18} {ms:10.1f} ms {row['vs_stock'][v]:7.3f}x"
                f" {'' if rel is None else f'{rel:7.3f}x':>8}{mem}")


def main(argv=None, model=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="8b (random weights), tiny, smollm2, gemma3, or a folder")
    parser.add_argument("--tiny", action="store_true", help="the same as --model tiny")
    parser.add_argument("--device", default=None)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--chunk", type=int, default=None, help="also prefill in blocks of this many tokens")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=None, help="a subset of the variants (stock and ckv_off always)")
    parser.add_argument("--long-context", type=int, default=None,
                        help="contexts above this run stock, ckv_off and ckv_<r> only")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads")
    common.add_policy_argument(parser)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        args.model = "tiny"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    if model is None:
        model = common.load_model(args.model, device, max(args.contexts) + 64)
    env = common.environment(device)
    log(f"{env['device']}: prefill of {args.contexts} tokens, B={args.batch}, policy {args.policy}")
    rows = []
    for i, context in enumerate(args.contexts):
        try:  # one warm-up round, before the first context (kernels and allocator are warm after it)
            rows.append(measure(context, model, args, device, warmup=i == 0))
        except Exception as error:  # noqa: BLE001 - the other contexts still run
            if not common.is_oom(error):
                raise
            log(f"  L={context}: out of memory ({str(error)[:200]})")
            rows.append(dict(context=context, batch=args.batch, status="oom"))
            common.release(device)
    payload = dict(env=env, model=args.model, policy=args.policy, ratio=args.ratio, chunk=args.chunk,
                   rows=rows)
    common.write_json(args.json, payload)
    print_table([r for r in rows if "median_ms" in r], env)
    return payload


if __name__ == "__main__":
    main()
