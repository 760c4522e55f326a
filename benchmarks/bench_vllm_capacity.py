"""vLLM with and without the CentroidKV plugin on one fixed KV block pool, side by side: how many
requests run at once, how long the whole workload takes, and generated tokens/s.

Every configuration gets the same pool (--pool-blocks of --block-size tokens, sized so that
--full-requests uncompressed requests fit) and the same workload: --requests prompts of
--prompt tokens, each generating --generate tokens (greedy, ignore_eos). "stock" is vLLM's own
CPU attention, "ckv_0" the plugin with clustering off (its torch attention path), "ckv_<r>" the
plugin at ratio r. Peak running = the most requests the scheduler held at once. Needs the
.venv-vllm environment (scripts/setup_vllm.sh); SmolLM2-135M, float32, eager.

    .venv-vllm/bin/python benchmarks/bench_vllm_capacity.py --json out/vllm_capacity.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time


def run(folder, options, args) -> dict:
    from vllm import LLM, SamplingParams

    from centroidkv.vllm.running import RunningPeak

    extra = {} if options is None else {"additional_config": {"centroidkv": options}}
    started = time.perf_counter()
    llm = LLM(model=str(folder), max_model_len=args.prompt + args.generate + args.block_size, enforce_eager=True,
              dtype="float32", block_size=args.block_size, seed=0, enable_prefix_caching=False,
              num_gpu_blocks_override=args.pool_blocks, max_num_batched_tokens=max(4096, args.prompt + 64),
              max_num_seqs=256, **extra)
    start_s = time.perf_counter() - started
    running = RunningPeak(llm)
    vocab = llm.get_tokenizer().vocab_size
    prompts = [{"prompt_token_ids": [(7 * i + 13 * j) % (vocab - 10) + 5 for j in range(args.prompt)]}
               for i in range(args.requests)]
    params = SamplingParams(temperature=0.0, max_tokens=args.generate, ignore_eos=True)
    began = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - began
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm
    gc.collect()
    return {"peak_running": running.peak, "workload_s": round(seconds, 2), "generated_tokens": generated,
            "generated_tokens_per_s": round(generated / seconds, 2), "engine_start_s": round(start_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--generate", type=int, default=64)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--full-requests", type=int, default=4, help="uncompressed requests the pool fits")
    parser.add_argument("--ratios", default="0,0.5,0.75")
    parser.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "centroidkv-smollm2-vllm"))
    parser.add_argument("--json")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the scheduler in this process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from centroidkv.vllm.model_folder import smollm2_folder

    per_request = -(-(args.prompt + args.generate) // args.block_size)
    args.pool_blocks = args.full_requests * per_request + 1  # + vLLM's null block
    folder = smollm2_folder(args.model_dir)
    configs = {"stock": None}
    for ratio in (float(r) for r in args.ratios.split(",")):
        configs[f"ckv_{ratio:g}"] = {"ratio": ratio}
    rows = {}
    for name, options in configs.items():
        rows[name] = run(folder, options, args)
        print(name, rows[name], flush=True)
    stock = rows["stock"]
    for row in rows.values():
        row["running_vs_stock"] = round(row["peak_running"] / stock["peak_running"], 2)
        row["throughput_vs_stock"] = round(row["generated_tokens_per_s"] / stock["generated_tokens_per_s"], 2)
    header = f"{'config':>9} {'peak run':>8} {'x stock':>7} {'workload s':>10} {'gen tok/s':>9} {'x stock':>7}"
    print(f"pool {args.pool_blocks} blocks of {args.block_size} (fits {args.full_requests} uncompressed); "
          f"{args.requests} requests, prompt {args.prompt}, generate {args.generate}\n{header}")
    for name, r in rows.items():
        print(f"{name:>9} {r['peak_running']:>8} {r['running_vs_stock']:>7} {r['workload_s']:>10} "
              f"{r['generated_tokens_per_s']:>9} {r['throughput_vs_stock']:>7}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
