"""The evaluation loop: prefill each sample once, then compress and score every method.

Budget protocol (same for every method, FINDINGS.md): the first `sink` prompt tokens and a tail
of at least `min_tail` prompt tokens stay exact; the middle, a multiple of `granule` tokens (so
that every chunk size up to 128 divides it), is cut to (1 - ratio) of its length. The protocol applies to global (full-attention) layers;
sliding-window layers (Gemma-3's local layers) keep the model's own window cache, exact.

Settings:
- "question_in_prompt": the prompt up to its last token is prefilled, compressed with the
  question inside the observation window, then the last token and the answer are decoded.
- "question_after": the context alone is prefilled and compressed (window = its last tokens),
  then the question arrives and the answer is decoded (query-agnostic).
- "prose": teacher-forced continuation of an essay after a compressed prefix: KL(full || method),
  top-1 agreement and perplexity against the full cache.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from . import model as M
from .methods import Full, Region, make_method, needs_reconstruction
from .tasks import Sample, leading_special_ids, make_samples, prose_texts


@dataclass
class Budget:
    sink: int
    middle: int
    tail: int
    kept: int

    @property
    def cache_len(self) -> int:
        return self.sink + self.kept + self.tail


def split_budget(prompt_len: int, ratio: float, sink: int = 4, min_tail: int = 32, granule: int = 128) -> Budget:
    middle = max(0, (prompt_len - sink - min_tail) // granule * granule)
    kept = round(middle * (1.0 - ratio))
    return Budget(sink, middle, prompt_len - sink - middle, kept)


@dataclass
class Config:
    tasks: list[str]
    lengths: list[int]
    ratios: list[float]
    methods: list[str]
    samples: int = 10
    seed: int = 0
    settings: list[str] = field(default_factory=lambda: ["question_in_prompt", "question_after"])
    prose_samples: int = 3
    prose_continuation: int = 128
    window: int = 32
    sink: int = 4
    min_tail: int = 32
    chat: bool = False


def _group_sum(x: Tensor, kv_heads: int) -> Tensor:
    """[1, Hq, L] -> [1, Hkv, L]: summed over each KV head's group of query heads."""
    return x.reshape(1, kv_heads, -1, x.shape[-1]).sum(dim=2)


def _window_scores(rows: Tensor, kv_heads: int) -> Tensor:
    """[1, Hq, W, L] window rows -> [1, Hkv, L]: summed over queries and each group's heads."""
    return _group_sum(rows.sum(dim=2), kv_heads)


def _pad_to(x: Tensor, length: int) -> Tensor:
    return torch.nn.functional.pad(x, (0, length - x.shape[-1]))


def surprisal(logits: Tensor, ids: list[int], first: float = 0.0) -> Tensor:
    """-log p(ids[t] | ids[:t]) from next-token logits [T, V] of those ids; `first` for ids[0]."""
    logp = torch.log_softmax(logits[:-1].float(), -1)
    nll = -logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return torch.cat([torch.tensor([first]), nll])


REPEAT_PROMPT = "\n\nRepeat the previous context exactly.\n\n"


def _group_max(x: Tensor, kv_heads: int) -> Tensor:
    """[1, Hq, L] -> [1, Hkv, L]: the largest over each KV head's group of query heads."""
    return x.reshape(1, kv_heads, -1, x.shape[-1]).amax(dim=2)


def reconstruction_scores(lm: M.LoadedModel, kv, ids: list[int]) -> dict:
    """{"sum" | "max": {layer: [1, Hkv, len(ids)]}}: attention the context's tokens get while the
    model, asked to repeat the context, reads it again after it (KVzip-style, query-agnostic):
    summed over the repeating queries and each KV head's query group, or the largest any of them
    paid (KVzip's choice: a token one copying query needs outranks one every query glances at).
    One extra forward of about the context's length; the cache `kv` is not changed."""
    repeat = lm.tokenizer.encode(REPEAT_PROMPT, add_special_tokens=False)
    M.forward(lm, repeat + ids, M.cache_from(kv, lm.model.config), len(ids), record=True, last_only=True)
    kv_heads = lm.model.config.num_key_value_heads
    layers = M.compressible_layers(lm.model.config)
    return {"sum": {i: _group_sum(lm.state.totals[i][..., :len(ids)], kv_heads) for i in layers},
            "max": {i: _group_max(lm.state.peaks[i][..., :len(ids)], kv_heads) for i in layers}}


def _after(queries: Tensor, count: int) -> Tensor:
    """The last `count` (at least 0) of [B, H, N, D] queries."""
    return queries[:, :, queries.shape[2] - min(max(count, 0), queries.shape[2]):]


def compress_cache(kv, window: dict, totals: dict, method, budget: Budget, seed: int,
                   info: Optional[Tensor] = None, reconstruction: Optional[dict] = None,
                   queries: Optional[dict] = None, queries_end: int = 0):
    """Per-layer (keys, values) -> compressed (keys, values) and sizes {layer: [1, H, Lc]}.
    Only the layers that have scores (window and totals, keyed by layer) are compressed; the
    others (sliding-window layers) are passed through unchanged. `info`: surprisal per token;
    `reconstruction`: reconstruction_scores, for the methods that need them; `queries`: the
    context's last queries per layer (AttentionState.queries), the last at position queries_end - 1;
    a region gets those after it, which see all of it."""
    if isinstance(method, Full) or budget.middle == 0:
        return kv, {}
    out, sizes = [], {}
    lo, hi = budget.sink, budget.sink + budget.middle
    depth = 0
    for layer, (k, v) in enumerate(kv):
        if layer not in window:
            out.append((k, v))
            continue
        gen = torch.Generator().manual_seed(seed * 1000 + layer)
        region = Region(k[:, :, lo:hi], v[:, :, lo:hi], window[layer][..., lo:hi].cpu(),
                        totals[layer][..., lo:hi].cpu(), budget.kept, gen,
                        None if info is None else info[lo:hi].view(1, 1, -1),
                        None if reconstruction is None else
                        {kind: scores[layer][..., lo:hi].cpu() for kind, scores in reconstruction.items()},
                        None if queries is None else _after(queries[layer], queries_end - hi).cpu(), depth)
        depth += 1
        ck, cv, cs = method.compress(region)
        assert ck.shape[2] == budget.kept, (type(method).__name__, ck.shape, budget.kept)
        ones = torch.ones(1, k.shape[1], 1, device=k.device)
        out.append((torch.cat([k[:, :, :lo], ck.to(k.dtype), k[:, :, hi:]], 2),
                    torch.cat([v[:, :, :lo], cv.to(v.dtype), v[:, :, hi:]], 2)))
        if method.size_bias:  # attention adds log(size ** size_bias) = size_bias * log(size)
            sizes[layer] = torch.cat([ones.expand(-1, -1, lo), cs.to(k.device).float() ** method.size_bias,
                                      ones.expand(-1, -1, k.shape[2] - hi)], 2)
    return out, sizes


def generate(lm: M.LoadedModel, kv, sizes, feed: list[int], position: int, sample: Sample) -> str:
    """Greedy answer after feeding `feed` on top of the (compressed) cache."""
    cache = M.cache_from(kv, lm.model.config)
    stop = M.stop_token_ids(lm.tokenizer)
    logits = M.forward(lm, feed, cache, position, sizes=sizes, last_only=True)
    position += len(feed)
    out: list[int] = []
    for _ in range(sample.max_new_tokens):
        token = int(logits[-1].argmax())
        if token in stop:
            break
        out.append(token)
        text = lm.tokenizer.decode(out)
        if sample.score(text) == 1.0:  # more tokens cannot change a full score
            break
        logits = M.forward(lm, [token], cache, position, sizes=sizes)
        position += 1
    return lm.tokenizer.decode(out)


def prompt_parts(tokenizer, sample: Sample, chat: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of the context part and of the question part (question + answer prefix).

    Plain text by default: SmolLM2-135M-Instruct answers the pass key far more often without its
    chat template (measured: 2/3 vs 1/3 on three 1k samples). Gemma-3-270M's GGUF is the base
    model (google/gemma-3-270m) and has no chat template; wrapped by hand in Gemma's turn markers
    (<start_of_turn>user ... <end_of_turn><start_of_turn>model) it scored the same as plain text
    on the same eight 1k samples per task (pass key 3/8 both, single needle 8/8 both), so it
    gets plain text too. chat=True wraps the prompt in the tokenizer's template. The context
    starts with the tokens the tokenizer puts first (Gemma's <bos>; none for SmolLM2), unless
    the template already wrote them."""
    marker = "\u0000"
    head, foot = "", "\n"
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("centroidkv.eval: chat prompts need a chat template; this tokenizer has none")
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=True)
        head, foot = text.split(marker)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    lead = leading_special_ids(tokenizer)
    ctx = enc(head + sample.context)
    if ctx[:len(lead)] != lead:
        ctx = lead + ctx
    return ctx, enc("\n\n" + sample.question + foot + sample.answer_prefix)


def run_sample(lm: M.LoadedModel, cfg: Config, sample: Sample, methods: dict, write) -> None:
    """Both settings for every method and ratio on one sample, from one context prefill."""
    kv_heads = lm.model.config.num_key_value_heads
    ctx_ids, q_ids = prompt_parts(lm.tokenizer, sample, cfg.chat)
    state = lm.state
    cache = M.cache_from([], lm.model.config)
    ctx_logits = M.forward(lm, ctx_ids, cache, 0, record=True)
    info_ctx = surprisal(ctx_logits, ctx_ids)
    kv_ctx = M.kv_of(cache)
    rows_ctx = dict(state.window_rows)
    totals_ctx = dict(state.totals)
    queries_ctx = dict(state.queries)  # the context's own queries: probes that know no question
    layers = M.compressible_layers(lm.model.config)
    base = {"task": sample.task, "length": sample.length, "sample": sample.index,
            "answers": sample.answers, "context_tokens": len(ctx_ids)}
    full_answer = None
    for setting in cfg.settings:
        if setting == "question_after":
            kv, feed, p, info = kv_ctx, q_ids, len(ctx_ids), info_ctx
            window = {i: _window_scores(rows_ctx[i], kv_heads) for i in layers}
            totals = {i: _group_sum(totals_ctx[i], kv_heads) for i in layers}
        else:
            cache_a = M.cache_from(kv_ctx, lm.model.config)
            q_logits = M.forward(lm, q_ids[:-1], cache_a, len(ctx_ids), record=True)
            kv, feed, p = M.kv_of(cache_a), q_ids[-1:], len(ctx_ids) + len(q_ids) - 1
            info = torch.cat([info_ctx, surprisal(torch.cat([ctx_logits[-1:], q_logits]), ctx_ids[-1:] + q_ids[:-1])[1:]])
            window, totals = {}, {}
            for i in layers:
                rows_q = state.window_rows[i]
                need = cfg.window - rows_q.shape[2]
                rows = rows_q if need <= 0 else torch.cat([_pad_to(rows_ctx[i][:, :, -need:], p), rows_q], 2)
                window[i] = _window_scores(rows, kv_heads)
                totals[i] = _group_sum(_pad_to(totals_ctx[i], p) + state.totals[i], kv_heads)
        rebuilt = None  # reconstruction scores of this setting's prompt, made when a method needs them
        for name, ratio in methods:
            method = make_method(name)
            budget = split_budget(p, ratio, cfg.sink, cfg.min_tail)
            t0 = time.perf_counter()
            if rebuilt is None and needs_reconstruction(method):
                rebuilt = reconstruction_scores(lm, kv, (ctx_ids + q_ids)[:p])
            if isinstance(method, Full) and full_answer is not None:
                answer = full_answer  # the full cache gives the same answer in both settings
            else:
                ckv, sizes = compress_cache(kv, window, totals, method, budget, cfg.seed + sample.index, info,
                                            rebuilt, queries_ctx, len(ctx_ids))
                answer = generate(lm, ckv, sizes, feed, p, sample)
            if isinstance(method, Full):
                full_answer = answer
            write({**base, "setting": setting, "method": name, "ratio": ratio,
                   "cache_len": p if isinstance(method, Full) else budget.cache_len, "prompt_len": p,
                   "score": sample.score(answer), "generated": answer,
                   "seconds": round(time.perf_counter() - t0, 3)})


def run_prose(lm: M.LoadedModel, cfg: Config, length: int, index: int, ids: list[int],
              prefix_len: int, methods: list, write) -> None:
    """Teacher-forced fidelity of every method against the full cache on one essay window."""
    kv_heads = lm.model.config.num_key_value_heads
    state = lm.state
    cache = M.cache_from([], lm.model.config)
    info = surprisal(M.forward(lm, ids[:prefix_len], cache, 0, record=True), ids[:prefix_len])
    kv = M.kv_of(cache)
    layers = M.compressible_layers(lm.model.config)
    window = {i: _window_scores(state.window_rows[i], kv_heads) for i in layers}
    totals = {i: _group_sum(state.totals[i], kv_heads) for i in layers}
    queries = dict(state.queries)
    cont = ids[prefix_len:]
    targets = torch.tensor(cont[1:])
    full_logp, rebuilt = None, None
    for name, ratio in methods:
        method = make_method(name)
        budget = split_budget(prefix_len, ratio, cfg.sink, cfg.min_tail)
        if rebuilt is None and needs_reconstruction(method):
            rebuilt = reconstruction_scores(lm, kv, ids[:prefix_len])
        ckv, sizes = compress_cache(kv, window, totals, method, budget, cfg.seed + index, info, rebuilt, queries,
                                    prefix_len)
        logits = M.forward(lm, cont[:-1], M.cache_from(ckv, lm.model.config), prefix_len, sizes=sizes)
        logp = torch.log_softmax(logits, -1)
        if full_logp is None:
            if not isinstance(method, Full):
                raise ValueError("centroidkv.eval: 'full' must come first for prose fidelity")
            full_logp = logp
        kl = (full_logp.exp() * (full_logp - logp)).sum(-1).mean().item()
        top1 = (full_logp.argmax(-1) == logp.argmax(-1)).float().mean().item()
        nll = -logp.gather(-1, targets[:, None]).mean().item()
        write({"setting": "prose", "task": "prose", "length": length, "sample": index, "method": name,
               "ratio": ratio, "cache_len": prefix_len if isinstance(method, Full) else budget.cache_len,
               "prompt_len": prefix_len, "kl": kl, "top1": top1, "nll": nll, "ppl": math.exp(nll)})


def run(cfg: Config, lm: M.LoadedModel, out_dir: Path, progress: bool = True) -> Path:
    """Runs the whole grid, appending one JSON line per (sample, setting, method, ratio)."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "samples.jsonl"
    methods = [("full", 0.0)] + [(m, r) for m in cfg.methods if m != "full" for r in cfg.ratios]
    for name, _ in methods:
        make_method(name)  # validate names before the long run
    qa_tasks = [t for t in cfg.tasks if t != "prose"]
    units = [(t, L) for L in cfg.lengths for t in qa_tasks]
    total = len(units) * cfg.samples + (len(cfg.lengths) * cfg.prose_samples if "prose" in cfg.tasks else 0)
    bar = tqdm(total=total, disable=not progress, desc="centroidkv eval", unit="sample")
    with open(path, "a", encoding="utf-8") as f:
        def write(rec):
            f.write(json.dumps(rec) + "\n")
            f.flush()
        # Sample-major order: a run stopped early still has every task at a similar n.
        samples = {u: make_samples(u[0], u[1], cfg.samples, cfg.seed, lm.tokenizer) for u in units}
        for i in range(cfg.samples):
            for task, length in units:
                bar.set_postfix_str(f"{task}@{length}")
                run_sample(lm, cfg, samples[(task, length)][i], methods, write)
                bar.update()
        if "prose" in cfg.tasks:
            for length in cfg.lengths:
                for i, (plen, ids) in enumerate(prose_texts(length, cfg.prose_continuation,
                                                            cfg.prose_samples, cfg.seed, lm.tokenizer)):
                    bar.set_postfix_str(f"prose@{length}")
                    run_prose(lm, cfg, length, i, ids, plen, methods, write)
                    bar.update()
    bar.close()
    return path
