"""Summary tables (mean, 95% interval, n) and plots from the per-sample JSONL."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from .methods import CONTROL

Z95 = 1.96  # normal approximation of the 95% interval of a mean over n samples


def load(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def mean_ci(values: list[float]) -> tuple[float, float, int]:
    """(mean, half-width of the 95% interval, n); half-width 0 for n < 2."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0, n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, Z95 * math.sqrt(var / n), n


def _fmt(mean: float, half: float, digits: int) -> str:
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def summarize(records: list[dict]) -> dict:
    """cells[(setting, task, length, method, ratio)] = (mean, half, n) of the score (or KL),
    plus the task average per (setting, method, ratio) as a fraction of the full cache."""
    groups = defaultdict(dict)  # cell -> {sample: value}
    for r in records:
        value = r["kl"] if r["setting"] == "prose" else r["score"]
        groups[(r["setting"], r["task"], r["length"], r["method"], r["ratio"])][r["sample"]] = value
    cells = {k: mean_ci(list(v.values())) for k, v in groups.items()}
    # Task average relative to full: mean over (task, length) cells of method / full, full taken
    # over the method's own samples (pooled runs need not all hold the same ones).
    rel = defaultdict(list)
    for (setting, task, length, method, ratio), values in groups.items():
        full = groups.get((setting, task, length, "full", 0.0), {})
        if setting == "prose" or not full:
            continue
        shared = [s for s in values if s in full]
        full_mean = sum(full[s] for s in shared) / len(shared) if shared else 0.0
        if full_mean > 0:
            rel[(setting, method, ratio)].append(sum(values[s] for s in shared) / len(shared) / full_mean)
    average = {k: sum(v) / len(v) for k, v in rel.items()}
    return {"cells": cells, "relative": average}


def paired(records: list[dict], baseline_of) -> list[dict]:
    """Each method against the baseline `baseline_of(method)` names (None: no baseline), paired
    over the same samples, per (setting, length, method, ratio). Prose: mean KL of both, the
    relative gain 1 - KL / KL_baseline, the mean paired KL difference (with its 95% interval) and
    the texts on which the method's KL is lower (and higher). Questions: mean score of both over
    every task, the mean paired difference (with its 95% interval) and the samples it wins (and
    loses)."""
    index = {(r["setting"], r["task"], r["length"], r["sample"], r["method"], r["ratio"]): r for r in records}
    pairs = defaultdict(list)
    for (setting, task, length, sample, method, ratio), r in index.items():
        baseline = baseline_of(method)
        other = None if baseline is None else index.get((setting, task, length, sample, baseline, ratio))
        if other is not None:
            field = "kl" if setting == "prose" else "score"
            pairs[(setting, length, method, baseline, ratio)].append((r[field], other[field]))
    rows = []
    for (setting, length, method, baseline, ratio), values in sorted(pairs.items()):
        ours, theirs = [v[0] for v in values], [v[1] for v in values]
        row = dict(setting=setting, length=length, method=method, baseline=baseline, ratio=ratio,
                   n=len(values), value=sum(ours) / len(ours), control=sum(theirs) / len(theirs))
        difference, row["half"], _ = mean_ci([o - c for o, c in values])
        if setting == "prose":  # lower is better
            row["dividend"] = 1.0 - row["value"] / row["control"] if row["control"] > 0 else 0.0
            row["difference"] = difference
            row["better"], row["worse"] = sum(o < c for o, c in values), sum(o > c for o, c in values)
        else:
            row["dividend"] = difference
            row["better"], row["worse"] = sum(o > c for o, c in values), sum(o < c for o, c in values)
        rows.append(row)
    return rows


def dividend(records: list[dict]) -> list[dict]:
    """Each method against its eviction control (<method>+evict): the centroid dividend (paired)."""
    return paired(records, lambda method: method + CONTROL)


def _cells(r: dict) -> str:
    """The method's value, the baseline's, the gain and the samples won / lost, as table cells."""
    if r["setting"] == "prose":
        d = r["dividend"]
        gain = f"{100 * d:+.0f}% less KL" if d >= 0 else f"{-100 * d:+.0f}% more KL"
        gain += f" ({r['difference']:+.4f} ± {r['half']:.4f})"
        values = f"KL {r['value']:.4f} | KL {r['control']:.4f}"
    else:
        values, gain = f"{r['value']:.2f} | {r['control']:.2f}", f"{r['dividend']:+.2f} ± {r['half']:.2f}"
    return f"{values} | {gain} | {r['better']} / {r['worse']} |"


def dividend_markdown(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = [f"## centroid dividend: each method against its eviction control ({CONTROL}: the same "
             "ranking, every slot an exact token)", "",
             "| setting | length | method | ratio | n | method | control | dividend | better / worse on |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['length']} | {r['method']} | {r['ratio']:g} | {r['n']} | {_cells(r)}"
              for r in rows]
    return lines + [""]


def comparison_markdown(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["## paired comparisons: method against baseline over the same samples", "",
             "| setting | length | method | baseline | ratio | n | method | baseline | gain | better / worse on |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['length']} | {r['method']} | {r['baseline']} | {r['ratio']:g} | {r['n']} | "
              f"{_cells(r)}" for r in rows]
    return lines + [""]


def _order(methods):
    return sorted(methods, key=lambda m: (m != "full", m))


def markdown(records: list[dict], title: str = "") -> str:
    s = summarize(records)
    cells, rel = s["cells"], s["relative"]
    lines = [f"# {title}".rstrip(), ""] if title else []
    ratios = sorted({k[4] for k in cells if k[4] > 0})
    for setting in ("question_in_prompt", "question_after"):
        keys = [k for k in cells if k[0] == setting]
        if not keys:
            continue
        tasks = sorted({(k[1], k[2]) for k in keys})
        methods = _order({k[3] for k in keys})
        lines += [f"## {setting}: score (mean ± 95% CI, n per cell)", ""]
        head = "| method | ratio | " + " | ".join(f"{t}@{L}" for t, L in tasks) + " | task avg, % of full |"
        lines += [head, "|" + "---|" * (len(tasks) + 3)]
        for m in methods:
            for r in ([0.0] if m == "full" else ratios):
                row = []
                for t, L in tasks:
                    c = cells.get((setting, t, L, m, r))
                    row.append(f"{_fmt(c[0], c[1], 2)} (n={c[2]})" if c else "")
                avg = rel.get((setting, m, r))
                lines.append(f"| {m} | {r:g} | " + " | ".join(row) + f" | {100 * avg:.0f}% |" if avg is not None
                             else f"| {m} | {r:g} | " + " | ".join(row) + " | |")
        lines.append("")
    prose = [r for r in records if r["setting"] == "prose"]
    if prose:
        lengths = sorted({r["length"] for r in prose})
        methods = _order({r["method"] for r in prose})
        lines += ["## prose fidelity: KL(full || method), top-1 agreement, perplexity (mean ± 95% CI)", ""]
        lines += ["| method | ratio | length | n | KL | top-1 | ppl |", "|---|---|---|---|---|---|---|"]
        for L in lengths:
            for m in methods:
                for r in ([0.0] if m == "full" else ratios):
                    rows = [x for x in prose if x["method"] == m and x["ratio"] == r and x["length"] == L]
                    if not rows:
                        continue
                    kl, top1, ppl = (mean_ci([x[f] for x in rows]) for f in ("kl", "top1", "ppl"))
                    lines.append(f"| {m} | {r:g} | {L} | {kl[2]} | {_fmt(kl[0], kl[1], 4)} | "
                                 f"{_fmt(top1[0], top1[1], 3)} | {_fmt(ppl[0], ppl[1], 2)} |")
        lines.append("")
    return "\n".join(lines + dividend_markdown(dividend(records)))


def plot(records: list[dict], out_dir: Path) -> list[Path]:
    """score-vs-ratio (task average, % of full) per setting and KL-vs-ratio, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarize(records)
    paths = []
    for setting in ("question_in_prompt", "question_after"):
        series = defaultdict(dict)
        for (st, m, r), v in s["relative"].items():
            if st == setting:
                series[m][r] = 100 * v
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in _order(series):
            pts = sorted(({0.0: 100.0} | series[m]).items()) if m != "full" else [(0.0, 100.0)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.set_xlabel("compression ratio (fraction of the middle removed)")
        ax.set_ylabel("task-average score, % of full cache")
        ax.set_title(setting.replace("_", " "))
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        path = out_dir / f"score_{setting}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    kl = defaultdict(dict)
    for (st, task, L, m, r), (mean, _, _) in s["cells"].items():
        if st == "prose":
            kl[m].setdefault(r, []).append(mean)
    if kl:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in _order(kl):
            if m == "full":
                continue
            pts = sorted((r, sum(v) / len(v)) for r, v in kl[m].items())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.set_xlabel("compression ratio")
        ax.set_ylabel("KL(full || method), nats per token")
        ax.set_yscale("log")
        ax.set_title("prose fidelity")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        path = out_dir / "kl_prose.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(jsonl: Path, out_dir: Path, title: str = "") -> tuple[Path, list[Path]]:
    records = load(jsonl)
    md = out_dir / "summary.md"
    md.write_text(markdown(records, title), encoding="utf-8")
    return md, plot(records, out_dir)
