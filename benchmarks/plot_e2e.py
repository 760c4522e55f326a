"""Plot of the end-to-end results: decode time per step, speedups against the byte bound, serving.

    python benchmarks/plot_e2e.py decode.json serving.json out.png
"""
from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"stock": "tab:gray", "static_sdpa": "tab:brown", "inplace_op": "tab:blue",
          "full_inplace": "tab:blue", "ckv_0.5": "tab:orange", "ckv_0.75": "tab:red"}


def plot(decode: dict, serving: dict | None, path: str) -> None:
    rows = [r for r in decode.get("decode", []) if r["status"] == "ok"]
    batches = sorted({r["batch"] for r in rows}) or [1]
    fig, axes = plt.subplots(2, max(len(batches), 2), figsize=(5 * max(len(batches), 2), 8.5), squeeze=False)
    device = decode.get("env", {}).get("device", "?")
    shape = decode.get("shape", {})
    fig.suptitle(f"decode, {shape.get('layers', '?')}-layer Llama shape (hidden {shape.get('hidden', '?')}), "
                 f"random {decode.get('dtype', '?').replace('torch.', '')} weights, {device}")

    for ax, batch in zip(axes[0], batches):
        for variant in sorted({r["variant"] for r in rows}):
            pts = sorted((r["context"], r["ms_median"]) for r in rows if r["batch"] == batch and r["variant"] == variant)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=variant, color=COLORS.get(variant))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("ms per decode step")
        ax.set_title(f"batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[0][len(batches):]:
        ax.axis("off")

    ax = axes[1][0]
    comps = [c for c in decode.get("comparisons", []) if "speedup_vs_best_full" in c]
    labels = [f"B{c['batch']}\nL{c['context']}\nr{c['ratio']:g}" for c in comps]
    xs = range(len(comps))
    ax.bar([x - 0.2 for x in xs], [c["speedup_vs_best_full"] for c in comps], width=0.4,
           label="vs best full cache", color="tab:red")
    ax.bar([x + 0.2 for x in xs], [c.get("speedup_vs_stock", 0) for c in comps], width=0.4,
           label="vs stock", color="tab:gray")
    ax.scatter(list(xs), [c["bound"] for c in comps], marker="_", s=400, color="k", zorder=3,
               label="byte bound (W+KV_full)/(W+KV_ckv)")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("decode speedup of CentroidKV")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", which="both", alpha=0.3)

    ax = axes[1][1]
    if serving:
        s = serving["serving"]
        runs = [(v, r) for v, r in s["runs"].items() if r["status"] == "ok"]
        ax.bar([v for v, _ in runs], [r["tokens_per_s"] for _, r in runs],
               color=[COLORS.get(v, "tab:green") for v, _ in runs])
        for i, (_, r) in enumerate(runs):
            ax.annotate(f"{r['batch']} seqs", (i, r["tokens_per_s"]), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("generated tokens / s")
        ax.set_title(f"serving: {s['prompt']}-token prompts, KV budget {s['kv_budget_bytes'] / 1e9:.3g} GB")
    else:
        ax.axis("off")
    for extra in axes[1][2:]:
        extra.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        decode_payload = json.load(f)
    serving_payload = None
    if len(sys.argv) > 3:
        with open(sys.argv[2]) as f:
            serving_payload = json.load(f)
    plot(decode_payload, serving_payload, sys.argv[-1])
