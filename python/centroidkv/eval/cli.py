"""`centroidkv eval`: quality of every compression method under one budget protocol."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .methods import ABLATIONS, CONTROL, MAIN_METHODS, METHODS, has_control, make_method
from .tasks import TASKS

QUICK = dict(model="random-llama", tasks=["passkey", "niah_multikey", "prose"], lengths=[256],
             ratios=[0.5, 0.75], methods=["full", "default", "paper", "snapkv", "streaming", "protected50", "absorb"],
             samples=2, prose_samples=1, prose_continuation=16)


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="centroidkv eval", description=__doc__)
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (default, offline GGUF), gemma3 (Gemma-3-270M, offline GGUF assembled from "
                        "its chunk packages), random-llama (tiny, tests), a folder or folder:file.gguf")
    p.add_argument("--tasks", type=_csv(str), default=["passkey", "niah_single", "niah_multikey", "prose"],
                   help=f"comma list of {sorted(TASKS) + ['prose']}")
    p.add_argument("--lengths", type=_csv(int), default=[1024], help="context lengths in tokens")
    p.add_argument("--ratios", type=_csv(float), default=[0.5, 0.75],
                   help="comma list of compression ratios, each in [0, 1) (default 0.5,0.75)")
    p.add_argument("--methods", type=_csv(str), default=MAIN_METHODS,
                   help=f"comma list, 'main', 'ablations' or 'all'; known: {sorted(METHODS)}")
    p.add_argument("--dividend", action="store_true",
                   help=f"also run each clustering method's eviction control (<method>{CONTROL}: same ranking, "
                        "every slot exact) and report the centroid dividend")
    p.add_argument("--samples", type=int, default=10, help="samples per (task, length)")
    p.add_argument("--prose-samples", type=int, default=3, help="prose texts per length (default 3)")
    p.add_argument("--prose-continuation", type=int, default=128,
                   help="teacher-forced tokens per prose text (default 128)")
    p.add_argument("--settings", type=_csv(str), default=["question_in_prompt", "question_after"],
                   help="comma list: question_in_prompt (compress with the question in the prompt), "
                        "question_after (compress the context, then ask); default both")
    p.add_argument("--chat", action="store_true",
                   help="wrap prompts in the tokenizer's chat template (an error if it has none, "
                        "as Gemma-3-270M's GGUF)")
    p.add_argument("--seed", type=int, default=0, help="sample generator seed (default 0)")
    p.add_argument("--out", type=Path, default=Path("results/eval/latest"),
                   help="folder for samples.jsonl, summary.md, config.json and plots (default results/eval/latest)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--quick", action="store_true",
                   help="tiny grid on a random-weight model (seconds; the test suite runs it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _expand(methods: list[str], dividend: bool = False) -> list[str]:
    out = []
    for group in methods:
        for m in {"main": MAIN_METHODS, "ablations": ABLATIONS, "all": list(METHODS)}.get(group, [group]):
            out += [m, m + CONTROL] if dividend and has_control(m) else [m]
    return list(dict.fromkeys(out))


def _known_method(name: str) -> bool:
    try:
        make_method(name)
    except ValueError:
        return False
    return True


SETTINGS = ("question_in_prompt", "question_after")
KNOWN_MODELS = ("smollm2", "gemma3", "random-llama")
MIN_LENGTH = 128  # room for the sink, the observation window, a needle and the question


def _check(p: argparse.ArgumentParser, args) -> None:
    """One clear line (argparse's error, exit code 2) for arguments the run would trip over later."""
    import torch

    def bad(values, ok):
        return [v for v in values if not ok(v)]

    checks = [
        ("--ratios", bad(args.ratios, lambda r: 0.0 <= r < 1.0), "each must be in [0, 1)"),
        ("--lengths", bad(args.lengths, lambda n: n >= MIN_LENGTH), f"each must be >= {MIN_LENGTH} tokens"),
        ("--tasks", bad(args.tasks, lambda t: t in TASKS or t == "prose"), f"known: {sorted(TASKS) + ['prose']}"),
        ("--methods", bad(args.methods, _known_method), "see --help for the known ones"),
        ("--settings", bad(args.settings, lambda s: s in SETTINGS), f"known: {list(SETTINGS)}"),
        ("--samples", bad([args.samples], lambda n: n >= 1), "must be >= 1"),
        ("--prose-samples", bad([args.prose_samples], lambda n: n >= 1), "must be >= 1"),
        ("--prose-continuation", bad([args.prose_continuation], lambda n: n >= 1), "must be >= 1"),
        ("--threads", bad([args.threads], lambda n: n >= 1), "must be >= 1"),
    ]
    for option, wrong, why in checks:
        if wrong:
            p.error(f"{option}: {', '.join(map(str, wrong))}: {why}")
    if args.model not in KNOWN_MODELS:
        folder, _, gguf = args.model.partition(":")
        if not Path(folder).is_dir() or (gguf and not (Path(folder) / gguf).is_file()):
            p.error(f"--model: {args.model} is neither {', '.join(KNOWN_MODELS)} nor an existing folder "
                    f"(or folder:file.gguf)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device: {args.device}, but torch {torch.__version__} sees no CUDA GPU")


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    args.methods = _expand(args.methods, args.dividend)
    _check(p, args)
    import torch

    from . import model as M
    from .report import write_report
    from .runner import Config, run

    torch.set_num_threads(args.threads)
    cfg = Config(tasks=args.tasks, lengths=args.lengths, ratios=args.ratios, methods=args.methods,
                 samples=args.samples, seed=args.seed, settings=args.settings,
                 prose_samples=args.prose_samples, prose_continuation=args.prose_continuation, chat=args.chat)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "samples.jsonl").unlink(missing_ok=True)
    t0 = time.time()
    lm = M.load_model(args.model, args.device, cfg.window)
    jsonl = run(cfg, lm, args.out, progress=not args.no_progress)
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    meta["seconds"] = round(time.time() - t0, 1)
    meta["torch_threads"] = torch.get_num_threads()
    (args.out / "config.json").write_text(json.dumps(meta, indent=1))
    md, plots = write_report(jsonl, args.out, f"centroidkv eval: {args.model}")
    print(md.read_text())
    print("wrote", jsonl, md, *plots)
    return 0
