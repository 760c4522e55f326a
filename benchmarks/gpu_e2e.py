"""Runs the whole end-to-end measurement on one GPU in about five minutes, one command:

    PYTHONPATH=python python benchmarks/gpu_e2e.py --out "$OUT"

Builds the Llama-3-8B-shaped model once, then: decode (bench_decode.py), serving
(bench_serving.py), prefill against stock (bench_prefill.py, 32k tokens). Each part gets
a share of --budget-s and stops starting new points when its share is spent; a point that runs
out of memory or fails is recorded and the run goes on. Writes decode.json, serving.json,
prefill.json and e2e.png under --out, and prints the tables last. --tiny runs the same on the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import bench_decode  # noqa: E402
import bench_prefill  # noqa: E402
import bench_serving  # noqa: E402
import e2e_common as common  # noqa: E402
from e2e_common import log  # noqa: E402

# Shares of --budget-s after the model is built; the rest goes to decode.
PREFILL_SHARE, SERVING_SHARE, CLOSING_S = 0.2, 0.25, 10.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "e2e_out"))
    parser.add_argument("--budget-s", type=float, default=285.0, help="whole run, model build included")
    parser.add_argument("--tiny", action="store_true")
    common.add_policy_argument(parser)
    args = parser.parse_args()
    start = time.monotonic()
    left = lambda: args.budget_s - (time.monotonic() - start)  # noqa: E731
    os.makedirs(args.out, exist_ok=True)
    tiny = (["--tiny"] if args.tiny else []) + ["--policy", args.policy]

    shape = common.TINY if args.tiny else common.LLAMA3_8B
    device = common.pick_device(None)
    log(f"[{time.monotonic() - start:6.1f}s] {common.environment(device)}")
    model = common.build_model(shape, device, shape.dtype, 131072 + 4096 if not args.tiny else 4096)
    common.sync(device)
    log(f"[{time.monotonic() - start:6.1f}s] model built")

    payloads = {}
    prefill_s, serving_s = PREFILL_SHARE * left(), SERVING_SHARE * left()
    parts = [
        ("decode", bench_decode, [], lambda: left() - prefill_s - serving_s - CLOSING_S),
        ("serving", bench_serving, [], lambda: left() - prefill_s - CLOSING_S),
        ("prefill", bench_prefill, None, lambda: left() - CLOSING_S),
    ]
    for name, module, extra, share in parts:
        path = os.path.join(args.out, f"{name}.json")
        deadline = max(share(), 1.0)
        log(f"[{time.monotonic() - start:6.1f}s] {name}: deadline {deadline:.0f} s")
        try:
            if extra is None:  # bench_prefill: a fixed amount of work, no deadline
                argv = ["--model", "tiny" if args.tiny else "8b", "--contexts", "512" if args.tiny else "32768",
                        "--policy", args.policy, "--json", path]
                payloads[name] = module.main(argv, model=model)
            else:
                payloads[name] = module.main(tiny + extra + ["--deadline-s", f"{deadline:.0f}", "--json", path],
                                             model=model)
        except Exception:  # noqa: BLE001 - the other parts still run
            traceback.print_exc()
            payloads[name] = None
        common.release(device)

    try:
        import plot_e2e
        if payloads.get("decode"):
            plot_e2e.plot(payloads["decode"], payloads.get("serving"), os.path.join(args.out, "e2e.png"))
    except Exception:  # noqa: BLE001
        traceback.print_exc()

    summary = dict(elapsed_s=time.monotonic() - start, env=common.environment(device))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    log(f"\n==== summary ({summary['elapsed_s']:.0f} s, {summary['env']['device']}) ====")
    if payloads.get("decode"):
        bench_decode.print_table(payloads["decode"])
    if payloads.get("prefill"):
        bench_prefill.print_table([r for r in payloads["prefill"]["rows"] if "median_ms" in r],
                                  payloads["prefill"]["env"])
    if payloads.get("serving"):
        bench_serving.print_table(payloads["serving"])
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


if __name__ == "__main__":
    main()
