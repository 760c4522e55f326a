"""The policy contract: what happens to the tokens that leave a CentroidKVCache's recent window.

The cache (cache.py) owns memory, positions, padding and the [sink | clustered | recent] layout;
a policy only decides how a run of old tokens is turned into fewer slots (a `Policy` subclass,
one file of this package each). The cache calls it with
a `Segment` (the tokens of one or more rows that share the same layout, per KV head) and writes
back whatever Segment it returns. So a new method is one new file with one small class; the
cache does not change.

Writing a policy
----------------
Subclass `Policy` as a dataclass, validate arguments in `__post_init__`, and implement
`compress` (and `shrink` if budget mode should do something other than one plain pass):

- `compress(segment, ratio=, chunk_size=)` receives `segment.keys` [N, H, L, Dk] (post-rotary),
  `values` [N, H, L, Dv], `sizes` [N, H, L] float32 (1 = original token, more = centroid,
  0 = empty slot that must stay weightless) and `scores` [N, H, L] float32 or None. L is a
  multiple of `block_size(ratio, chunk_size)` and the tokens are in their original order. Return
  a Segment whose length is the same for every (row, head); slots may be in any order (keys
  carry their rotary positions) but keeping the original order keeps neighbours together for
  later passes. Pad with size-0 slots if some heads keep fewer.
- `block_size(ratio, chunk_size)`: how many tokens the cache hands over at a time. The cache
  waits until the recent window overflows by a whole block. The default is the smallest block
  on which every pass of `merge_passes(ratio, chunk_size)` runs on whole chunks (chunk_size at
  ratio 0.5, 2 * chunk_size at 0.75), so online clustering equals clustering the prefix at once.
- `shrink(segment, chunk_size=)`: budget mode, the whole clustered region when the cache is over
  its token budget; should return fewer slots (or the same if it cannot).

Scores. Set `score_window = W > 0` and the attention implementation ("centroidkv") hands the
cache, for every layer, the attention of the last W queries of each forward call over all slots
(softmax probabilities summed over those queries and over the query heads of each KV head's
group, [B, Hkv, L]). With `accumulate_scores = False` only calls of several tokens (prefill,
chunked prefill) are observed and each replaces earlier scores (SnapKV-style observation window;
decode steps pay nothing, and tokens generated later keep score 0); with True every call,
decode steps included, adds to them (H2O-style running totals, at the cost of one more pass
over the cache per step). The scores follow their slots through every move and arrive in `segment.scores`; slots
a policy creates get the scores it returns (zeros if it returns None).

Sketches of the policies the evaluation will want, each one file:
- SnapKV-style hybrid: score_window=32; keep the top k = round(frac * L * (1 - ratio)) tokens of
  each (row, head) exact (size 1) by max-pooled score, gather the others in original order
  (`torch.sort` of the unprotected indices) and run `merge` passes on them for the rest.
- Eviction (SnapKV, H2O, random, StreamingLLM): keep the top L * (1 - ratio) by score (random
  scores, or position for StreamingLLM, which needs sink/recent only: ratio 1 on the middle is
  eviction of everything), gathered in order, sizes 1; nothing merged.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Optional

from torch import Tensor

from .. import backend
from ..compress import merge_passes
from ..ops import merged_length


@dataclass
class Segment:
    """A run of cache slots for N rows and H KV heads, in their cache order."""

    keys: Tensor  # [N, H, L, Dk], post-rotary
    values: Tensor  # [N, H, L, Dv]
    sizes: Tensor  # [N, H, L] float32: tokens each slot stands for (0 = empty, weightless)
    scores: Optional[Tensor] = None  # [N, H, L] float32 observation scores, if the policy asked
    info: Optional[Tensor] = None  # [N, H, L] float32 per-token scores (token_scores policies)

    @property
    def length(self) -> int:
        return self.keys.shape[2]


class Policy(ABC):
    """Turns runs of old tokens into fewer slots; see the module docstring for the contract."""

    # Attention of the last `score_window` queries is collected for the policy (0 = none).
    score_window: ClassVar[int] = 0
    # False: each forward call's window replaces the scores; True: they add up over calls.
    accumulate_scores: ClassVar[bool] = False
    # True: the policy also ranks by per-token scores (segment.info) that centroidkv.prefill hands
    # over (the tokens' surprisal, CentroidKVCache.observe_tokens); its forward is clustered only
    # then. A plain forward clusters at once, with info all zero.
    token_scores: ClassVar[bool] = False
    # Attention adds size_bias * log(size) to a slot's logit: 1 is SPEC.md's proportional
    # attention; below 1 a cluster counts for fewer tokens than it holds (merges still use the
    # true sizes). A dataclass policy may make it a field (ProtectedClustering does).
    size_bias: ClassVar[float] = 1.0

    def block_size(self, ratio: float, chunk_size: int) -> int:
        """Tokens handed over at a time: the smallest run whose passes all see whole chunks."""
        block = chunk_size
        for num_merge in merge_passes(ratio, chunk_size)[:-1]:
            # merge_passes makes every pass but the last a full halving, so block doubles.
            assert 2 * num_merge == chunk_size
            block *= 2
        return block

    @abstractmethod
    def compress(self, segment: Segment, *, ratio: float, chunk_size: int) -> Segment:
        """Replaces the segment's tokens by about (1 - ratio) as many slots."""

    def slots(self, length: int, *, ratio: float, chunk_size: int) -> int:
        """Slots `compress` returns for a segment of `length` tokens (a whole number of blocks);
        capacity planning and benchmarks use it. Default: merge_passes' passes (SPEC.md)."""
        for num_merge in merge_passes(ratio, chunk_size):
            length = merged_length(length, chunk_size, num_merge)
        return length

    def shrink(self, segment: Segment, *, chunk_size: int) -> Segment:
        """Budget mode: one more plain pass (r = c/2) over the clustered region."""
        keys, values, sizes = backend.merge(segment.keys, segment.values, segment.sizes,
                                            chunk_size, chunk_size // 2)
        return Segment(keys, values, sizes, None)
