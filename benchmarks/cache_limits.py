"""Slot counts behind the README's "Limits worth knowing": how many slots CentroidKVCache holds
after a prompt at high ratios (tokens leave the recent window in whole blocks), and how far a
`budget` is exceeded between two shrinks while decoding.

Counts, not timings: they follow from the cache's layout rules, so a tiny random-weight Llama on
the CPU gives the same numbers as any model. Writes a JSON with --json.

    PYTHONPATH=python python benchmarks/cache_limits.py --json benchmarks/results/cpu/cache_limits.json
"""
from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import centroidkv
from centroidkv.cache import cache_argument


def tiny_llama():
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="centroidkv").eval()


def slots_after_prompt(model, ratio: float, prompt_tokens: int) -> int:
    cache = centroidkv.CentroidKVCache(ratio=ratio)
    model(torch.randint(1, 97, (1, prompt_tokens)), use_cache=True, **{cache_argument(model): cache})
    return max(cache.layers[0].lengths)


def budget_peak(model, budget: int, prompt_tokens: int, steps: int) -> tuple[int, int]:
    cache = centroidkv.CentroidKVCache(budget=budget, chunk_size=32, sink=4, recent=64)
    name = cache_argument(model)
    logits = model(torch.randint(1, 97, (1, prompt_tokens)), use_cache=True, **{name: cache}).logits
    peak = max(cache.layers[0].lengths)
    for _ in range(steps):
        logits = model(logits[:, -1:].argmax(-1), use_cache=True, **{name: cache}).logits
        peak = max(peak, max(cache.layers[0].lengths))
    return peak, max(cache.layers[0].lengths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = tiny_llama()
    policy = centroidkv.ProtectedClustering()
    result = {"model": "tiny random-weight Llama (2 layers, 2 KV heads), CPU", "chunk_size": 32}
    with torch.no_grad():
        result["block_tokens"] = {str(r): policy.block_size(r, 32) for r in (0.5, 0.75, 0.9, 0.99)}
        result["slots_after_2000_token_prompt"] = {str(r): slots_after_prompt(model, r, 2000)
                                                   for r in (0.75, 0.9, 0.99)}
        peak, end = budget_peak(model, budget=100, prompt_tokens=300, steps=200)
    result["budget_100"] = {"prompt_tokens": 300, "decode_steps": 200, "peak_slots": peak, "end_slots": end}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
