"""How often a query-agnostic ranking keeps each asked needle exact (no generation).

For the needle tasks of the evaluation harness, one forward per context gives every token's
surprisal; each ranking below then picks the protected slots of the harness's budget (the
middle of the context, 90% of its kept slots, as the default policy protects) and we count the
asked needles whose value tokens are all protected. A needle not protected is clustered, and on
SmolLM2 a clustered digit is mostly a lost digit, so this is a proxy for the recall a ranking
can give after compression (not a bound: a protected needle can still be missed), at a second
per sample rather than minutes of generation per method (results/eval/README.md, round 7).

    python benchmarks/needle_coverage.py --samples 16 --lengths 1024 [--model gemma3]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from centroidkv.eval import model as M
from centroidkv.eval.runner import prompt_parts, split_budget, surprisal
from centroidkv.eval.tasks import make_samples
from centroidkv.policies import ProtectedClustering
from centroidkv.policies.protection import protected_count, protection_scores, spread_scores

TASKS = ["passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "niah_uuid"]


def run_min(x: torch.Tensor, width: int) -> torch.Tensor:
    """Smallest surprisal in a centred window of `width` tokens: high only inside a run of
    tokens none of which the model could predict (a code, a number), since prose has a
    predictable word every few tokens."""
    return -F.max_pool1d(-x.view(1, 1, -1), width, stride=1, padding=width // 2).view(-1)


def union(*scores: torch.Tensor) -> torch.Tensor:
    """Tokens ranked by their best rank (as a fraction) under any of the scores."""
    return torch.stack([rank_fraction(s) for s in scores]).amax(0)


def rank_fraction(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().float() / len(x)


def share_above(x: torch.Tensor, width: int, level: float) -> torch.Tensor:
    """Share of a centred window of `width` tokens with surprisal above `level`."""
    flat = (x > level).float().view(1, 1, -1)
    return F.avg_pool1d(flat, width, stride=1, padding=width // 2, count_include_pad=False).view(-1)


def rankings(info: torch.Tensor) -> dict[str, torch.Tensor]:
    """Candidate per-token scores [L] from surprisal [L] (higher = keep)."""
    def spread(x, before, after):
        return spread_scores(x.view(1, 1, -1), (before, after)).view(-1)
    cue = spread(info, 0, 12)
    run5 = spread(run_min(info, 5), 10, 4)
    preset = ProtectedClustering.query_agnostic()
    out = {"query_agnostic() preset": protection_scores(None, info.view(1, 1, -1), 1, 1.0, info_span=preset.info_span,
                                                         info_run=preset.info_run).view(-1),
           "span 15/15 (pool 31, round 6's preset)": spread(info, 15, 15), "span 0/12": cue,
           "run-min5 span 10/4": run5}
    out["run-min7 span 10/4"] = spread(run_min(info, 7), 10, 4)
    out["run-min5 span 6/2"] = spread(run_min(info, 5), 6, 2)
    out["share>1.5 of 7, span 10/4"] = spread(share_above(info, 7, 1.5), 10, 4) + 1e-3 * run5
    out["rank sum(span 0/12, run-min5)"] = rank_fraction(cue) + rank_fraction(run5)
    out["union(span 0/12, run-min5)"] = union(cue, run5)
    out["span 0/12 of run-mean3"] = spread(F.avg_pool1d(info.view(1, 1, -1), 3, 1, 1, count_include_pad=False).view(-1), 0, 12)
    return out


def answer_spans(tokenizer, context: str, answers: list[str]) -> list[list[list[int]]]:
    """For each answer, the token index lists of its occurrences in the context."""
    enc = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    spans = []
    for answer in answers:
        found, start = [], context.find(answer)
        while start >= 0:
            stop = start + len(answer)
            found.append([i for i, (a, b) in enumerate(offsets) if a < stop and b > start])
            start = context.find(answer, stop)
        spans.append(found)
    return spans


def contexts(lm, task: str, length: int, samples: int, seed: int, store: str):
    """(surprisal [T], answer token spans, tokens before the context) per sample; kept in `store`
    (a folder) so that trying another ranking needs no forward."""
    path = Path(store) / f"{lm.name}_{task}_{length}_{samples}_{seed}.pt" if store else None
    if path is not None and path.exists():
        return torch.load(path)
    out = []
    for sample in make_samples(task, length, samples, seed, lm.tokenizer):
        ctx_ids, _ = prompt_parts(lm.tokenizer, sample)
        lead = len(ctx_ids) - len(lm.tokenizer(sample.context, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logits = M.forward(lm, ctx_ids, M.cache_from([], lm.model.config), 0)
        out.append((surprisal(logits, ctx_ids), answer_spans(lm.tokenizer, sample.context, sample.answers), lead))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
    return out


def needles_kept(info: torch.Tensor, spans: list, lead: int, ratio: float) -> dict[str, float]:
    """Share of the asked needles whose every value token is protected, per ranking, for one
    context's surprisal [T] at `ratio` (the harness's sink / middle / tail split)."""
    budget = split_budget(len(info), ratio)
    lo, hi = budget.sink, budget.sink + budget.middle
    protect = protected_count(budget.kept, 0.9)
    out = {}
    for name, score in rankings(info[lo:hi]).items():
        kept = set((score.sort(descending=True, stable=True).indices[:protect] + lo).tolist())
        kept |= set(range(lo)) | set(range(hi, len(info)))
        got = [any(all(i + lead in kept for i in occ) for occ in occs) for occs in spans]
        out[name] = sum(got) / len(got)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--lengths", default="1024")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ratios", default="0.5,0.75")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--store", default="", help="folder keeping each context's surprisal between runs")
    parser.add_argument("--tiny", action="store_true", help="a random-weight model, one 256-token sample (smoke test)")
    parser.add_argument("--json", default="", help="also write the table as JSON here")
    args = parser.parse_args()
    if args.tiny:
        args.model, args.samples, args.lengths = "random-llama", 1, "256"
    torch.set_num_threads(args.threads)
    lm = M.load_model(args.model)
    ratios = [float(r) for r in args.ratios.split(",")]
    tasks = args.tasks.split(",")
    lengths = [int(x) for x in args.lengths.split(",")]
    hits: dict[tuple, list[float]] = {}
    t0 = time.perf_counter()
    for length in lengths:
        for task in tasks:
            for info, spans, lead in contexts(lm, task, length, args.samples, args.seed, args.store):
                for ratio in ratios:
                    for name, share in needles_kept(info, spans, lead, ratio).items():
                        hits.setdefault((length, ratio, name, "all"), []).append(share)
                        hits.setdefault((length, ratio, name, task), []).append(share)
    table = {f"{length}/{ratio}/{name}/{task}": sum(v) / len(v) for (length, ratio, name, task), v in hits.items()}
    print(f"# {args.model}, seed {args.seed}, {args.samples} samples per task, {time.perf_counter() - t0:.0f} s")
    for length in lengths:
        for ratio in ratios:
            print(f"\n## length {length}, ratio {ratio}: share of asked needles kept exact")
            print("| ranking | all | " + " | ".join(tasks) + " |")
            print("|---|---|" + "---|" * len(tasks))
            for name in rankings(torch.rand(64)):
                cells = [table[f"{length}/{ratio}/{name}/{t}"] for t in ["all", *tasks]]
                print(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
