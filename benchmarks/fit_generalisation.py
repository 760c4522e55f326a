"""Do fitted centroids reproduce the region for queries they were not fitted to?

Round 11's fitted centroids (centroidkv.eval `default_fitlogit`) are fitted to the context's own
last queries (the probes) and then read by the continuation's queries. This measures, per
compressed layer of a model, how well each method's compressed middle region stands in for the
full one, for the probes (in sample) and for the continuation's queries (held out):

- mass: |log-sum-exp of the compressed slots' logits (with the size bias) - that of the full
  region| per query, nats: how much attention the region draws against the sink and tail;
- output: |o_compressed - o_full| / |o_full|, o the region's attention-weighted mean value;
- layer (held out only): the same for the attention output over the whole prefix (sink, region,
  tail; the continuation's own keys left out), which weighs the two above by how much of each
  query's attention the region draws; its mean, 95th percentile and mean per layer.

    python benchmarks/fit_generalisation.py --model gemma3 --texts 4 --json results/eval/fit_generalisation_gemma3.json

CPU, one forward of each text and its continuation; the methods are the harness's.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from centroidkv.eval import model as M
from centroidkv.eval.fitted_values import probe_logits, probe_queries
from centroidkv.eval.methods import Region, make_method
from centroidkv.eval.runner import _after, _group_sum, _window_scores, split_budget, surprisal
from centroidkv.eval.tasks import prose_texts

METHODS = ("default+evict", "default", "default_fit", "default_fitlogit", "default_fitlogit_r1")


def size_logits(slot_sizes, size_bias):
    """What attention adds to each slot's logit, [1, H, 1, B] (the harness's size_bias * log(size))."""
    return size_bias * slot_sizes.float().clamp_min(1e-30).log()[:, :, None] if size_bias else 0.0


def region_errors(queries, keys, values, slot_keys, slot_values, slot_sizes, size_bias):
    """Per-query (mass error, output error) of the compressed slots against the full region."""
    probes = probe_queries(queries, keys.shape[1])
    full = probe_logits(probes, keys)
    slots = probe_logits(probes, slot_keys) + size_logits(slot_sizes, size_bias)
    mass = (torch.logsumexp(slots, -1) - torch.logsumexp(full, -1)).abs()
    o_full = torch.softmax(full, -1) @ values.float()
    o_slots = torch.softmax(slots, -1) @ slot_values.float()
    output = (o_slots - o_full).norm(dim=-1) / o_full.norm(dim=-1).clamp_min(1e-12)
    return mass.flatten(), output.flatten()


def prefix_output_error(queries, parts, compressed, size_bias):
    """Per-query relative error of attention over the prefix [sink, region, tail] with the region
    (parts[1]) replaced by its compressed slots (keys, values, sizes)."""
    probes = probe_queries(queries, parts[0][0].shape[1])

    def output(pieces):
        logits = torch.cat([probe_logits(probes, k) + b for k, _, b in pieces], -1)
        return torch.softmax(logits, -1) @ torch.cat([v.float() for _, v, _ in pieces], -2)

    exact = [(k, v, 0.0) for k, v in parts]
    ck, cv, cs = compressed
    full, slots = output(exact), output([exact[0], (ck, cv, size_logits(cs, size_bias)), exact[2]])
    return ((slots - full).norm(dim=-1) / full.norm(dim=-1).clamp_min(1e-12)).flatten()


def measure(lm, ids, prefix_len, ratio, methods, seed):
    state, config = lm.state, lm.model.config
    kv_heads = config.num_key_value_heads
    cache = M.cache_from([], config)
    info = surprisal(M.forward(lm, ids[:prefix_len], cache, 0, record=True), ids[:prefix_len])
    layers = M.compressible_layers(config)
    window = {i: _window_scores(state.window_rows[i], kv_heads) for i in layers}
    totals = {i: _group_sum(state.totals[i], kv_heads) for i in layers}
    probes = dict(state.queries)
    kv = M.kv_of(cache)
    M.forward(lm, ids[prefix_len:], cache, prefix_len, record=True)  # the full cache's continuation
    held_out = dict(state.queries)
    budget = split_budget(prefix_len, ratio)
    lo, hi = budget.sink, budget.sink + budget.middle
    out = {name: {"probe": [[], []], "held_out": [[], []], "layer": []} for name in methods}
    for depth, layer in enumerate(layers):
        keys, values = kv[layer][0][:, :, :prefix_len].cpu(), kv[layer][1][:, :, :prefix_len].cpu()
        parts = [(keys[:, :, a:b], values[:, :, a:b]) for a, b in ((0, lo), (lo, hi), (hi, prefix_len))]
        k, v = parts[1]
        tail = _after(probes[layer], prefix_len - hi).cpu()
        for name in methods:
            method = make_method(name)
            region = Region(k, v, window[layer][..., lo:hi].cpu(), totals[layer][..., lo:hi].cpu(), budget.kept,
                            torch.Generator().manual_seed(seed * 1000 + layer), info[lo:hi].view(1, 1, -1),
                            None, tail, depth)
            ck, cv, cs = method.compress(region)
            for kind, queries in (("probe", tail), ("held_out", held_out[layer].cpu())):
                mass, output = region_errors(queries, k, v, ck, cv, cs, method.size_bias)
                out[name][kind][0].append(mass)
                out[name][kind][1].append(output)
            layer_error = prefix_output_error(held_out[layer].cpu(), parts, (ck, cv, cs), method.size_bias)
            out[name]["layer"].append(layer_error)
    return {name: {**{kind: {"mass": float(torch.cat(kinds[kind][0]).mean()),
                             "output": float(torch.cat(kinds[kind][1]).mean())} for kind in ("probe", "held_out")},
                   "layer": float(torch.cat(kinds["layer"]).mean()),
                   "layer_p95": float(torch.cat(kinds["layer"]).quantile(0.95)),
                   "by_layer": {layer: float(e.mean()) for layer, e in zip(layers, kinds["layer"])}}
            for name, kinds in out.items()}, len(layers), tail.shape


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 or gemma3")
    p.add_argument("--texts", type=int, default=4)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--ratio", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a random-weight model, one 256-token text (smoke test)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.tiny:
        args.model, args.texts, args.length = "random-llama", 1, 256
    torch.set_num_threads(1)
    lm = M.load_model(args.model)
    runs = []
    for i, (plen, ids) in enumerate(prose_texts(args.length, 128, args.texts, args.seed, lm.tokenizer)):
        result, layers, tail_shape = measure(lm, ids, plen, args.ratio, METHODS, args.seed + i)
        runs.append(result)
        print(f"text {i}: {layers} compressed layers, probes per layer {tuple(tail_shape)} (batch, query heads, "
              f"queries, head dim)", flush=True)
    summary = {name: {**{kind: {metric: sum(r[name][kind][metric] for r in runs) / len(runs)
                                for metric in ("mass", "output")} for kind in ("probe", "held_out")},
                      **{key: sum(r[name][key] for r in runs) / len(runs) for key in ("layer", "layer_p95")},
                      "by_layer": {layer: sum(r[name]["by_layer"][layer] for r in runs) / len(runs)
                                   for layer in runs[0][name]["by_layer"]}} for name in METHODS}
    print(f"{args.model}, ratio {args.ratio}, {args.texts} texts at {args.length}: mean over layers, heads, queries")
    print(f"{'method':22s} {'probe mass':>11s} {'probe out':>10s} {'held-out mass':>14s} {'held-out out':>13s} "
          f"{'held-out layer':>15s} {'(95th pct)':>10s}")
    for name, s in summary.items():
        print(f"{name:22s} {s['probe']['mass']:11.4f} {s['probe']['output']:10.4f} "
              f"{s['held_out']['mass']:14.4f} {s['held_out']['output']:13.4f} {s['layer']:15.4f} "
              f"{s['layer_p95']:10.4f}")
    for name, s in summary.items():
        print(f"held-out layer error by layer, {name}: "
              + ", ".join(f"{layer}: {e:.3f}" for layer, e in s["by_layer"].items()))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "per_text": runs,
                                        "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
