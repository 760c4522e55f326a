"""Pools runs of `centroidkv eval` (one folder per seed) into one summary, and compares methods
paired over the same samples:

    python -m centroidkv.eval.pool results/eval/run_seed0 results/eval/run_seed1:default=default_s70_run7 \
        --compare default_b50:default_s70_run7 --out results/eval/run_pooled

Samples are told apart by seed (config.json), so two seeds' sample 3 are two samples; a record
that two folders of the same seed both hold (the full cache, measured by every run) counts once.
`FOLDER:name=alias,...` renames that folder's methods, for names whose meaning changed between
runs (`default` is whatever the default was when the run was made).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .report import comparison_markdown, load, markdown, paired

KEY = ("setting", "task", "length", "sample", "method", "ratio")


def pool(folders: list[tuple[Path, dict]]) -> list[dict]:
    """Records of every (folder, {method: alias}) run, samples named seed:sample."""
    records, seen = [], set()
    for folder, aliases in folders:
        seed = json.loads((folder / "config.json").read_text())["seed"]
        for r in load(folder / "samples.jsonl"):
            r = {**r, "sample": f"{seed}:{r['sample']}", "method": aliases.get(r["method"], r["method"])}
            key = tuple(r[k] for k in KEY)
            if key not in seen:
                seen.add(key)
                records.append(r)
    return records


def _pairs(text: str, sep: str = ":", what: str = "--compare: expected method:baseline") -> list[tuple[str, str]]:
    pairs = []
    for item in filter(None, text.split(",")):
        key, found, value = item.partition(sep)
        if not found or not key or not value:
            raise argparse.ArgumentTypeError(f"{what}, got {item!r}")
        pairs.append((key, value))
    return pairs


def _folder(text: str) -> tuple[Path, dict]:
    path, _, aliases = text.partition(":")
    return Path(path), dict(_pairs(aliases, "=", f"folders: expected FOLDER:name=alias,... in {text!r}"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m centroidkv.eval.pool", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=_folder,
                   help="folders written by centroidkv eval (--out), each optionally :name=alias,...")
    p.add_argument("--compare", type=_pairs, default=[],
                   help="comma list of method:baseline, each compared paired over the same samples")
    p.add_argument("--out", type=Path, help="folder for samples.jsonl and summary.md (default: print only)")
    args = p.parse_args(argv)
    for folder, _ in args.folders:
        if not (folder / "samples.jsonl").is_file() or not (folder / "config.json").is_file():
            p.error(f"folders: {folder} holds no samples.jsonl and config.json of a centroidkv eval run")
    records = pool(args.folders)
    names = ", ".join(str(f) for f, _ in args.folders)
    rows = [row for method, baseline in args.compare for row in paired(records, {method: baseline}.get)]
    text = markdown(records, f"pooled: {names}") + "\n" + "\n".join(comparison_markdown(rows))
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "samples.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        (args.out / "summary.md").write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
