"""Does the observation window tell the two settings apart, and would a window ranking by lift
help? (results/eval/README.md, round 9; no generation.)

For the needle tasks of the evaluation harness, one forward of the context and one of the
question give each compressible layer's window attention (the last 32 queries, summed over each
KV head's query group) with the question after compression (the context's own last words) and
in the prompt. Per setting it reports, over layers and KV heads:
- focus: the largest share of the middle's window attention on one token, times the middle's
  length (1 = flat), and the share on the top 2% of tokens;
- coverage: the share of rankings (per layer and head) that keep every token of an asked needle
  exact, for the default's ranking (window plus runs of surprisal) with the window's scores as
  they are ("window") or divided by the attention each token got from every query ("lift", which
  discounts tokens that every query attends to), at several window shares.

    python benchmarks/window_coverage.py --samples 6 --seed 0 [--length 1024] [--json out.json]
"""
from __future__ import annotations

import argparse
import collections
import json

import torch

from centroidkv.eval import model as M
from centroidkv.eval.runner import _group_sum, _pad_to, _window_scores, prompt_parts, split_budget, surprisal
from centroidkv.eval.tasks import make_samples
from centroidkv.policies import ProtectedClustering
from centroidkv.policies.protection import protected_count, protection_scores
from needle_coverage import answer_spans

TASKS = ["passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"]
VARIANTS = {"default (window share 0.3)": (0.7, "window"), "lift, share 0.3": (0.7, "lift"),
            "window share 0.15": (0.85, "window"), "lift, share 0.15": (0.85, "lift"),
            "lift, share 0.5": (0.5, "lift"), "query_agnostic() (share 0)": (1.0, "window")}


def window_rows(lm, layers, ctx, q):
    """{setting: {layer: (window scores [1, Hkv, P], all queries' attention [1, Hkv, P])}}, P."""
    kv_heads = lm.model.config.num_key_value_heads
    cache = M.cache_from([], lm.model.config)
    with torch.no_grad():
        logits = M.forward(lm, ctx, cache, 0, record=True)
    rows = {i: lm.state.window_rows[i] for i in layers}
    totals = {i: lm.state.totals[i] for i in layers}
    after = {i: (_window_scores(rows[i], kv_heads), _group_sum(totals[i], kv_heads)) for i in layers}
    with torch.no_grad():
        M.forward(lm, q[:-1], M.cache_from(M.kv_of(cache), lm.model.config), len(ctx), record=True)
    p = len(ctx) + len(q) - 1
    prompt = {}
    for i in layers:
        rq = lm.state.window_rows[i]
        need = 32 - rq.shape[2]
        r = rq if need <= 0 else torch.cat([_pad_to(rows[i][:, :, -need:], p), rq], 2)
        prompt[i] = (_window_scores(r, kv_heads), _group_sum(_pad_to(totals[i], p) + lm.state.totals[i], kv_heads))
    info = torch.cat([surprisal(logits, ctx), torch.zeros(len(q))])  # the question's own: not ranked
    return {"question after": after, "question in prompt": prompt}, info


def measure(lm, samples: int, seed: int, ratios: list[float], length: int = 1024) -> dict:
    layers = M.compressible_layers(lm.model.config)
    default = ProtectedClustering()
    cells = collections.defaultdict(list)
    for task in TASKS:
        for s in make_samples(task, length, samples, seed, lm.tokenizer):
            ctx, q = prompt_parts(lm.tokenizer, s)
            lead = len(ctx) - len(lm.tokenizer(s.context, add_special_tokens=False)["input_ids"])
            spans = [[[i + lead for i in occ] for occ in occs]
                     for occs in answer_spans(lm.tokenizer, s.context, s.answers)]
            settings, info = window_rows(lm, layers, ctx, q)
            for setting, scores in settings.items():
                length = len(ctx) if setting == "question after" else len(ctx) + len(q) - 1
                for ratio in ratios:
                    budget = split_budget(length, ratio)
                    lo, hi = budget.sink, budget.sink + budget.middle
                    protect = protected_count(budget.kept, default.protect_fraction)
                    for window, totals in scores.values():
                        w, t = window[..., lo:hi].float(), totals[..., lo:hi].float()
                        share = w / w.sum(-1, keepdim=True)
                        top = share.topk(-(-share.shape[-1] // 50), dim=-1).values.sum(-1)  # ceil: at least 2% of tokens
                        cells[(setting, ratio, "focus: peak")] += (share.amax(-1) * share.shape[-1]).view(-1).tolist()
                        cells[(setting, ratio, "focus: top 2%")] += top.view(-1).tolist()
                        ranked = {"window": w, "lift": w / (t + 0.01 * t.mean(-1, keepdim=True))}
                        for name, (info_share, kind) in VARIANTS.items():
                            rank = protection_scores(ranked[kind], info[lo:hi].view(1, 1, -1), protect, info_share,
                                                     default.pool, default.info_span, default.taper, 0.0,
                                                     default.info_run)
                            kept = rank.sort(dim=-1, descending=True, stable=True).indices[..., :protect] + lo
                            for head in kept[0].tolist():
                                held = set(head) | set(range(lo)) | set(range(hi, length))
                                got = [any(all(j in held for j in occ) for occ in occs) for occs in spans]
                                cells[(setting, ratio, name)].append(sum(got) / len(got))
    return {f"{s}/{r}/{n}": sum(v) / len(v) for (s, r, n), v in cells.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ratios", default="0.5,0.75")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--tiny", action="store_true", help="a random-weight model, one 256-token sample (smoke test)")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if args.tiny:
        args.model, args.samples, args.length = "random-llama", 1, 256
    torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    table = measure(M.load_model(args.model), args.samples, args.seed, ratios, args.length)
    print(f"# {args.model}, seed {args.seed}, {args.samples} samples per task, {args.length} tokens")
    print("| | " + " | ".join(f"{s}, {r}" for s in ("question after", "question in prompt") for r in ratios) + " |")
    print("|---|" + "---|" * 2 * len(ratios))
    for name in ["focus: peak", "focus: top 2%", *VARIANTS]:
        print(f"| {name} | " + " | ".join(f"{table[f'{s}/{r}/{name}']:.3f}"
                                          for s in ("question after", "question in prompt") for r in ratios) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
