"""Recall through the product path: CentroidKVCache + attn_implementation="centroidkv" + generate.

The evaluation harness (centroidkv eval) compresses one prompt cache at once under a fixed budget
protocol; this script checks that the policies keep what the harness measured when they run
online inside the real cache (sink, recent window, block-by-block clustering at prefill, the
op-backed attention with log(size) bias), on the same seeded tasks and prompts.

Settings, as in the harness:
- question_in_prompt: the whole prompt (context, question, answer prefix) is prefilled, then
  generate continues from its last token;
- question_after: the context alone is prefilled (and clustered), then generate receives the
  question and answer prefix.
With `surprisal` configurations the prefill is centroidkv.prefill (hands the cache each token's
surprisal); otherwise a plain forward.

    python benchmarks/eval_cache_e2e.py --samples 12 --json results/eval/cache_e2e_1k.json
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import centroidkv
from centroidkv.cache import cache_argument
from centroidkv.eval import data
from centroidkv.eval.runner import prompt_parts
from centroidkv.eval.tasks import make_samples
from centroidkv.policies import PlainClustering, ProtectedClustering

SINGLE_TOKENS = {"info_run": 1, "info_span": (15, 15)}  # surprisal token by token, pooled over 31 (rounds 2 to 6)
CONFIGS = {  # name -> (policy or None for the full cache, prefill hands surprisal)
    "full": (None, False),
    "paper": (PlainClustering(), False),
    "window_pool7": (ProtectedClustering(pool=7, info_share=0.0), False),
    "window_pool31": (ProtectedClustering(pool=31, taper=1.0, info_share=0.0), False),
    "surprisal30": (ProtectedClustering(pool=31, taper=1.0, info_share=0.3, **SINGLE_TOKENS), True),  # round 2's default
    "surprisal50": (ProtectedClustering(pool=31, taper=1.0, info_share=0.5, **SINGLE_TOKENS), True),
    "surprisal50_plain_prefill": (ProtectedClustering(pool=31, taper=1.0, info_share=0.5, **SINGLE_TOKENS), False),
    "round3_default": (ProtectedClustering(info_share=0.3, **SINGLE_TOKENS), True),  # the default of rounds 3 to 6
    "default": (ProtectedClustering(), True),
    "agnostic": (ProtectedClustering.query_agnostic(size_bias=1.0), True),  # as round 7 measured it
    # a tempered size bias (round 8): attention adds size_bias * log(size)
    "default_b50": (ProtectedClustering(size_bias=0.5), True),
    "agnostic_b50": (ProtectedClustering.query_agnostic(size_bias=0.5), True),
    "agnostic_b25": (ProtectedClustering.query_agnostic(size_bias=0.25), True),
}


def load(threads: int):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(threads)
    folder, gguf = data.smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32,
                                                 attn_implementation="centroidkv").eval()
    return model, tokenizer


@torch.no_grad()
def answer(model, tokenizer, ctx_ids, q_ids, setting, config, ratio, max_new_tokens) -> str:
    policy, surprisal = CONFIGS[config]
    if policy is None:
        from transformers import DynamicCache
        cache = DynamicCache(config=model.config)
    else:
        cache = centroidkv.CentroidKVCache(ratio=ratio, policy=policy)
    prompt = ctx_ids + q_ids
    first = ctx_ids if setting == "question_after" else prompt[:-1]
    ids = torch.tensor([first])
    if surprisal:
        centroidkv.prefill(model, ids, cache)
    else:
        model(input_ids=ids, **{cache_argument(model): cache}, use_cache=True)
    out = model.generate(torch.tensor([prompt]), **{cache_argument(model): cache}, do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="passkey,niah_single")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--samples", type=int, default=12)
    p.add_argument("--ratios", default="0.5,0.75")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--settings", default="question_in_prompt,question_after")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    model, tokenizer = load(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    rows, t0 = [], time.time()
    for task in args.tasks.split(","):
        for sample in make_samples(task, args.length, args.samples, 0, tokenizer):
            ctx_ids, q_ids = prompt_parts(tokenizer, sample)
            for setting in args.settings.split(","):
                for config in args.configs.split(","):
                    for ratio in ([0.0] if config == "full" else ratios):
                        text = answer(model, tokenizer, ctx_ids, q_ids, setting, config, ratio, sample.max_new_tokens)
                        rows.append(dict(task=task, sample=sample.index, setting=setting, config=config,
                                         ratio=ratio, score=sample.score(text), generated=text))
    summary: dict = {}
    for r in rows:
        key = f"{r['setting']}/{r['config']}/{r['ratio']}/{r['task']}"
        summary.setdefault(key, []).append(r["score"])
    table = {k: (sum(v) / len(v), len(v)) for k, v in summary.items()}
    print(f"SmolLM2-135M-Instruct, CPU ({torch.get_num_threads()} threads), {args.length} tokens, "
          f"{time.time() - t0:.0f} s")
    print("| setting | config | ratio | task | score | n |\n|---|---|---|---|---|---|")
    for k, (mean, n) in table.items():
        setting, config, ratio, task = k.split("/")
        print(f"| {setting} | {config} | {ratio} | {task} | {mean:.2f} | {n} |")
    payload = dict(args=vars(args), rows=rows, summary={k: v[0] for k, v in table.items()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    return payload


if __name__ == "__main__":
    main()
