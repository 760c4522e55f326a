"""Policies that keep recall: tokens that stay exact, chosen by observation-window attention
and by how surprising each token was to the model.

Select one with `CentroidKVCache(ratio=..., policy=ProtectedClustering())` (or
`AbsorbIntoSurvivors()`). Both ask the attention for the last 32 queries' attention of every
forward call (SnapKV's observation window: with the question at the end of the prompt, the
tokens the question looks at). ProtectedClustering also ranks part of its budget by token
surprisal, which `centroidkv.prefill` hands the cache (prefill.py): that part keeps needles
exact even when the question comes after compression. The tensor work is in protection.py.

Measured trade-offs are in results/eval/README.md: on SmolLM2-135M, plain clustering averages
adjacent digit tokens together and loses exact recall; protecting whole neighbourhoods (pool 31)
of the most attended and of the most surprising tokens restores most of it in both settings, at
some cost in prose fidelity against a narrow pool 7 without surprisal. The taper (weakly
attended tokens lend their outer neighbours a quarter of their score) wins back part of that
cost; `wide_share` (whole sentences only around the strongest peaks) wins back a little more on
prose and loses recall when several needles matter. Since round 7 the default ranks 70% of its
protected slots by surprisal counted over runs of seven tokens (a number, each digit
unpredictable), which keeps needles whether the question comes before or after compression, at
a cost in prose KL.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ..arguments import as_float, as_int
from .base import Policy, Segment
from .protection import absorb_evicted, protect_and_cluster


def _budget(length: int, ratio: float) -> int:
    return max(1, min(length, round(length * (1.0 - ratio))))


@dataclass
class ProtectedClustering(Policy):
    """[top tokens by max-pooled window attention (and token surprisal), exact | the rest
    clustered] (protected.py).

    Args:
        protect_fraction: share of each segment's budget kept exact (0 = plain clustering).
        num_merge: sources merged per chunk and pass; None = c/2 (the paper's), smaller values
            merge only the most redundant pairs and take more passes (default c/4 at c = 32).
        pool: max-pool width over window scores (odd), so a needle's sentence is protected with
            the word the question attends to.
        taper: weight of the pool's outer neighbours (beyond the nearest 7): a strongly
            attended token keeps its whole sentence, a weakly attended one only its 7 nearest
            tokens (1 = plain max-pool of width `pool`, 0 = only the 7 nearest).
        wide_share: share of the window's exact slots that go first to the tokens best by the
            untapered pool (whole sentences around the strongest peaks) before the tapered
            ranking fills the rest; 0 = none (with taper=0: two tiers, measured in
            results/eval/README.md, round 4).
        info_share: share of the protected slots ranked by token surprisal rather than window
            attention: recall that survives a question asked after compression. Needs the
            tokens' surprisal, which `centroidkv.prefill` hands the cache; without it the
            window ranks every protected slot.
        info_run: surprisal is first reduced to its minimum over centred runs of this many tokens
            (odd; run_minimum), so that a run of unpredictable tokens (a number, a code) outranks
            one rare word; 1 = each token's own surprisal.
        info_span: (tokens before, tokens after) a surprising token (or run) that are kept exact
            with it (spread_scores): the name a value belongs to comes before it; (15, 15) is a
            symmetric pool of 31 (the default of rounds 3 to 6, with info_share=0.3, info_run=1).
        size_bias: attention adds size_bias * log(size) to a centroid's logit. 1 (default) is
            SPEC.md's proportional attention, the best prose fidelity; below 1 departs from it:
            a centroid counts for size ** size_bias tokens, so the filler it stands for draws
            less attention from exact needles (results/eval/README.md, round 8). In (0, 1].
    """
    protect_fraction: float = 0.9
    num_merge: Optional[int] = 8
    pool: int = 31
    taper: float = 0.25
    wide_share: float = 0.0
    info_share: float = 0.7
    info_run: int = 7
    info_span: tuple[int, int] = (10, 4)
    size_bias: float = 1.0
    score_window: ClassVar[int] = 32
    accumulate_scores: ClassVar[bool] = False

    @classmethod
    def query_agnostic(cls, **overrides) -> "ProtectedClustering":
        """For a context compressed before its question is known (a document asked several
        questions, a system prompt, an earlier chat turn): every protected slot is ranked by
        token surprisal (info_share=1), none by the observation window, whose queries are then
        the context's own last words. Surprisal counts by runs as in the default (info_run,
        info_span). Prefill through `centroidkv.prefill`, which supplies the surprisal; without it
        the window ranks every protected slot. Attention weighs a centroid as sqrt(size)
        (size_bias=0.5, not SPEC.md's size): the filler it stands for then draws less attention
        from the needles a later question looks for. Measured against the default in
        results/eval/README.md (rounds 6 to 8). `overrides` set any other field."""
        return cls(**{"info_share": 1.0, "size_bias": 0.5, **overrides})

    @property
    def token_scores(self) -> bool:
        return self.info_share > 0

    def __post_init__(self):
        owner = "ProtectedClustering"
        for name in ("protect_fraction", "taper", "wide_share", "info_share"):
            value = as_float(owner, name, getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{owner}: {name} must be in [0, 1], got {value}")
            setattr(self, name, value)
        self.size_bias = as_float(owner, "size_bias", self.size_bias)
        if not 0.0 < self.size_bias <= 1.0:  # 0 would turn empty (size-0) slots into live ones
            raise ValueError(f"{owner}: size_bias must be in (0, 1], got {self.size_bias}")
        self.pool = as_int(owner, "pool", self.pool)
        if self.num_merge is not None:
            self.num_merge = as_int(owner, "num_merge", self.num_merge)
        if self.num_merge is not None and self.num_merge < 1:
            raise ValueError(f"{owner}: num_merge must be >= 1 or None, got {self.num_merge}")
        if self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"{owner}: pool must be odd >= 1, got {self.pool}")
        self.info_run = as_int(owner, "info_run", self.info_run)
        if self.info_run < 1 or self.info_run % 2 == 0:
            raise ValueError(f"{owner}: info_run must be odd >= 1, got {self.info_run}")
        span = self.info_span
        if not isinstance(span, (tuple, list)) or len(span) != 2:
            raise ValueError(f"{owner}: info_span must be (tokens before, tokens after), got {span!r}")
        self.info_span = tuple(as_int(owner, "info_span", x) for x in span)
        if min(self.info_span) < 0:
            raise ValueError(f"{owner}: info_span must be two counts >= 0, got {span!r}")

    def _run(self, segment: Segment, budget: int, chunk_size: int) -> Segment:
        num_merge = None if self.num_merge is None else min(self.num_merge, chunk_size // 2)
        keys, values, sizes, kept = protect_and_cluster(
            segment.keys, segment.values, segment.sizes, segment.scores, budget, self.protect_fraction,
            chunk_size, num_merge, self.pool, segment.info, self.info_share, self.info_span, taper=self.taper,
            wide_share=self.wide_share, info_run=self.info_run)
        if kept is None:
            return Segment(keys, values, sizes)
        # Protected slots keep their scores for later passes; clustered slots start from zero.
        protect = kept.shape[-1]
        scores = info = None
        if segment.scores is not None:
            scores = torch.zeros_like(sizes)
            scores[:, :, :protect] = segment.scores.gather(2, kept)
        if segment.info is not None:
            info = torch.zeros_like(sizes)
            info[:, :, :protect] = segment.info.gather(2, kept)
        return Segment(keys, values, sizes, scores, info)

    def compress(self, segment: Segment, *, ratio: float, chunk_size: int) -> Segment:
        return self._run(segment, _budget(segment.length, ratio), chunk_size)

    def slots(self, length: int, *, ratio: float, chunk_size: int) -> int:
        return _budget(length, ratio) if length else 0

    def shrink(self, segment: Segment, *, chunk_size: int) -> Segment:
        return self._run(segment, _budget(segment.length, 0.5), chunk_size)


@dataclass
class AbsorbIntoSurvivors(Policy):
    """Top tokens by max-pooled window attention survive; every other token is merged into its
    most key-similar survivor (size-weighted, so attention adds log(size)); the best
    protect_fraction of the survivors absorb nothing and stay exact (protected.py)."""
    protect_fraction: float = 0.5
    pool: int = 7
    score_window: ClassVar[int] = 32
    accumulate_scores: ClassVar[bool] = False

    def __post_init__(self):
        self.protect_fraction = as_float("AbsorbIntoSurvivors", "protect_fraction", self.protect_fraction)
        self.pool = as_int("AbsorbIntoSurvivors", "pool", self.pool)
        if not 0.0 <= self.protect_fraction < 1.0:
            raise ValueError(f"AbsorbIntoSurvivors: protect_fraction must be in [0, 1), got {self.protect_fraction}")
        if self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"AbsorbIntoSurvivors: pool must be odd >= 1, got {self.pool}")

    def _run(self, segment: Segment, budget: int) -> Segment:
        scores = segment.scores if segment.scores is not None else torch.zeros_like(segment.sizes)
        keys, values, sizes = absorb_evicted(segment.keys, segment.values, segment.sizes, scores, budget,
                                             self.protect_fraction, self.pool)
        return Segment(keys, values, sizes, None)

    def compress(self, segment: Segment, *, ratio: float, chunk_size: int) -> Segment:
        return self._run(segment, _budget(segment.length, ratio))

    def slots(self, length: int, *, ratio: float, chunk_size: int) -> int:
        return _budget(length, ratio) if length else 0

    def shrink(self, segment: Segment, *, chunk_size: int) -> Segment:
        return self._run(segment, _budget(segment.length, 0.5))


__all__ = ["AbsorbIntoSurvivors", "ProtectedClustering"]
