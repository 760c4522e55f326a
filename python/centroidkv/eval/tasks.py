"""Seeded long-context tasks built locally from offline data (RULER-style, written for this project).

Every task returns Samples whose context is about `length` tokens of the evaluated tokenizer.
The question is kept apart from the context so that the harness can compress with the question
in the prompt (LongBench / SnapKV protocol) or before the question arrives (query-agnostic).
"""
from __future__ import annotations

import random
import string
import uuid
from dataclasses import dataclass, field
from typing import Callable, Sequence

from . import data


@dataclass
class Sample:
    task: str
    length: int                 # nominal context length in tokens
    index: int
    context: str
    question: str
    answer_prefix: str          # the start of the answer, given to the model
    answers: list[str]          # strings expected in the generated answer
    need_all: bool = True       # score = fraction of answers found (else 1 if any is found)
    max_new_tokens: int = 12
    meta: dict = field(default_factory=dict)

    def score(self, generated: str) -> float:
        text = generated.lower()
        found = [a.lower() in text for a in self.answers]
        if self.need_all:
            return sum(found) / len(found)
        return float(any(found))


class TokenCounter:
    """Token counts of text pieces under one tokenizer (cached: filler sentences repeat)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        n = self._cache.get(text)
        if n is None:
            n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            self._cache[text] = n
        return n


def leading_special_ids(tokenizer) -> list[int]:
    """Tokens the tokenizer puts before any text (Gemma: <bos>, which it needs; SmolLM2: none)."""
    return tokenizer("", add_special_tokens=True)["input_ids"]


def _filler(rng: random.Random, count: TokenCounter, tokens: int) -> list[str]:
    """Consecutive essay sentences from a random start, about `tokens` tokens in all."""
    sentences = data.essay_sentences()
    i, out, total = rng.randrange(len(sentences)), [], 0
    while total < tokens:
        s = sentences[i % len(sentences)]
        out.append(s)
        total += count(s) + 1
        i += 1
    return out


def _insert(filler: list[str], needles: Sequence[str], rng: random.Random,
            depths: Sequence[float] | None = None) -> str:
    """Filler sentences with each needle inserted at a sentence boundary at its depth."""
    sentences = list(filler)
    depths = depths if depths is not None else [rng.uniform(0.1, 0.9) for _ in needles]
    for needle, depth in sorted(zip(needles, depths), key=lambda x: -x[1]):
        sentences.insert(round(depth * len(sentences)), needle)
    return " ".join(sentences)


def _value(rng: random.Random, kind: str) -> str:
    if kind == "number":
        return str(rng.randrange(1_000_000, 10_000_000))
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "word":
        return rng.choice(data.vocabulary())
    raise ValueError(kind)


def passkey(rng, count, length, index):
    key = str(rng.randrange(10_000, 100_000))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    context = _insert(_filler(rng, count, length - count(needle)), [needle], rng)
    return Sample("passkey", length, index, context, "What is the pass key?",
                  "The pass key is", [key])


def _niah(name, kind="number", keys=1, values=1, queries=1):
    """Needles 'One of the special magic {kind}s for {key} is: {value}.'; `keys` distinct keys,
    `values` values per key, `queries` of the keys asked for."""
    noun = {"number": "numbers", "uuid": "uuids", "word": "words"}[kind]

    def make(rng, count, length, index):
        words = rng.sample(data.vocabulary(), keys)
        table = {w: [_value(rng, kind) for _ in range(values)] for w in words}
        needles = [f"One of the special magic {noun} for {w} is: {v}." for w in words for v in table[w]]
        rng.shuffle(needles)
        asked = words[:queries]
        body = _filler(rng, count, length - sum(count(n) for n in needles))
        context = _insert(body, needles, rng)
        what = ", ".join(asked)
        question = (f"What are all the special magic {noun} for {what} mentioned in the provided text?"
                    if values > 1 or queries > 1 else
                    f"What is the special magic {noun[:-1]} for {what} mentioned in the provided text?")
        answers = [v for w in asked for v in table[w]]
        return Sample(name, length, index, context, question,
                      f"The special magic {noun} for {what} mentioned in the provided text are",
                      answers, max_new_tokens=12 + 14 * (len(answers) - 1) + (14 if kind == "uuid" else 0))
    return make


def variable_tracking(rng, count, length, index, hops=4):
    names = ["".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(hops)]
    value = str(rng.randrange(10_000, 100_000))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops)]
    body = _filler(rng, count, length - sum(count(c) for c in chain))
    depths = sorted(rng.uniform(0.1, 0.9) for _ in chain)  # the chain is in order, as in RULER
    context = _insert(body, chain, rng, depths)
    return Sample("vt", length, index, context,
                  f"Find all variables that are assigned the value {value} in the text above.",
                  f"Answer: According to the chain(s) of variable assignment in the text above, "
                  f"{hops} variables are assigned the value {value}, they are:", names, max_new_tokens=30)


def _coded_word(rng):
    consonants, vowels = "bcdfghjklmnprstvz", "aeiou"
    return "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 3)))


def frequent_words(rng, count, length, index, vocab=300, alpha=2.0):
    """RULER's frequent-words extraction: coded words with Zipf frequencies, top 3 asked."""
    words = list(dict.fromkeys(_coded_word(rng) for _ in range(vocab * 2)))[:vocab]
    weights = [1.0 / (rank + 1) ** alpha for rank in range(len(words))]
    per_word = count(" " + words[0]) or 1
    drawn = rng.choices(words, weights=weights, k=max(1, length // per_word))
    counts = {w: drawn.count(w) for w in words[:5]}
    top = sorted(counts, key=lambda w: -counts[w])[:3]
    return Sample("fwe", length, index, " ".join(drawn),
                  "What are the 3 most frequently appeared words in the above coded text?",
                  "Answer: According to the coded text above, the three most frequently appeared words are:",
                  top, max_new_tokens=16)


def _qa(name, items_fn, paragraphs_of):
    def make(rng, count, length, index):
        items = items_fn()
        gold = items[rng.randrange(len(items))]
        paragraphs = list(paragraphs_of(gold))
        total = sum(count(p) for p in paragraphs)
        while total < length:
            other = paragraphs_of(items[rng.randrange(len(items))])
            for p in other:
                paragraphs.append(p)
                total += count(p)
        rng.shuffle(paragraphs)
        context = "\n\n".join(f"Document {i + 1}: {p}" for i, p in enumerate(paragraphs))
        return Sample(name, length, index, context,
                      f"Answer the question based on the given documents. Question: {gold[1]}",
                      "Answer:", list(gold[2]), need_all=False, max_new_tokens=16)
    return make


TASKS: dict[str, Callable] = {
    "passkey": passkey,
    "niah_single": _niah("niah_single"),
    "niah_uuid": _niah("niah_uuid", kind="uuid"),
    "niah_word": _niah("niah_word", kind="word"),
    "niah_multikey": _niah("niah_multikey", keys=4),
    "niah_multivalue": _niah("niah_multivalue", values=4),
    "niah_multiquery": _niah("niah_multiquery", keys=4, queries=2),
    "vt": variable_tracking,
    "fwe": frequent_words,
    "qa_squad": _qa("qa_squad", data.squad_items, lambda it: [it[0]]),
    "qa_hotpot": _qa("qa_hotpot", data.hotpot_items, lambda it: it[0]),
}


def make_samples(task: str, length: int, n: int, seed: int, tokenizer) -> list[Sample]:
    """n seeded samples of `task` at about `length` context tokens."""
    if task not in TASKS:
        raise ValueError(f"centroidkv.eval: unknown task {task!r}; known: {sorted(TASKS)}")
    count = TokenCounter(tokenizer)
    out = []
    for i in range(n):
        rng = random.Random(f"{seed}/{task}/{length}/{i}")
        out.append(TASKS[task](rng, count, length, i))
    return out


def prose_texts(length: int, continuation: int, n: int, seed: int, tokenizer) -> list[tuple[int, list[int]]]:
    """n (prefix_length, token ids) windows of length + continuation tokens from the essays,
    each after the tokens the tokenizer puts first (Gemma's <bos>, counted in the prefix;
    none for SmolLM2)."""
    texts = data.essay_texts()
    rng = random.Random(f"{seed}/prose/{length}")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    lead = leading_special_ids(tokenizer)
    need = length + continuation
    starts = sorted(rng.sample(range(len(ids) - need), n))
    return [(len(lead) + length, lead + ids[s:s + need]) for s in starts]
