"""Which KV blocks of a request are clustered, and when: one rule derived from token counts.

vLLM's scheduler (which frees blocks) and its workers (which cluster them) never exchange a
message about compression: both apply this plan to the token counts they already share.

Layout of one request's logical blocks (block i holds positions i*bs .. i*bs + bs - 1):

    [ sink blocks | group 0 | group 1 | ... | not yet clustered ... recent window ]

A group is `group_blocks` (G) whole blocks. Once its last token is `recent` tokens old (the
request holds n >= end_of_group + recent tokens), the worker clusters the group's tokens to the
plan's ratio (PlainClustering's merge passes, SPEC.md) and writes the centroids into the group's
first `kept_blocks` (K) blocks; the other G - K blocks are dead: the scheduler returns them to
the block pool and attention skips them. G is the smallest group whose clustered slots fill whole
blocks (ratio 0.5: G = 2, K = 1; 0.75: G = 4, K = 1; 0.875: G = 8, K = 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..arguments import as_float, as_int
from ..compress import merge_passes
from ..ops import merged_length

# Largest group searched for a ratio whose clustered slots fill whole blocks.
_MAX_GROUP_BLOCKS = 64


@dataclass(frozen=True)
class MergePlan:
    block_size: int  # tokens per KV block
    ratio: float  # fraction of a group's tokens removed
    chunk_size: int  # chunk of every merge pass
    sink_blocks: int  # leading blocks never clustered
    recent: int  # newest tokens never clustered
    group_blocks: int  # G: blocks clustered together (0: the plan never clusters)
    kept_blocks: int  # K: blocks the centroids of one group fill

    @classmethod
    def build(cls, *, block_size: int, ratio: float, chunk_size: int = 32, sink: int = 4,
              recent: int = 64) -> "MergePlan":
        """The plan for these options; `sink` tokens round up to whole blocks."""
        owner = "centroidkv.vllm"
        block_size = as_int(owner, "block_size", block_size)
        ratio = as_float(owner, "ratio", ratio)
        chunk_size, sink, recent = (as_int(owner, name, value) for name, value in
                                    (("chunk_size", chunk_size), ("sink", sink), ("recent", recent)))
        passes = merge_passes(ratio, chunk_size)  # validates ratio and chunk_size
        if block_size < 1:
            raise ValueError(f"{owner}: block_size must be >= 1, got {block_size}")
        if sink < 0 or recent < 0:
            raise ValueError(f"{owner}: sink and recent must be >= 0, got sink={sink}, recent={recent}")
        sink_blocks = -(-sink // block_size)
        if not passes:
            return cls(block_size, ratio, chunk_size, sink_blocks, recent, 0, 0)
        # Every pass but the last halves whole chunks, so a group must be a multiple of the
        # chunk doubled once per extra pass; then clustering a group at once equals clustering
        # it block after block as CentroidKVCache does.
        run = chunk_size * 2 ** (len(passes) - 1)
        for group in range(1, _MAX_GROUP_BLOCKS + 1):
            tokens = group * block_size
            if tokens % run:
                continue
            slots = tokens
            for num_merge in passes:
                slots = merged_length(slots, chunk_size, num_merge)
            if slots % block_size == 0 and slots < tokens:
                return cls(block_size, ratio, chunk_size, sink_blocks, recent, group, slots // block_size)
        raise ValueError(f"{owner}: no group of up to {_MAX_GROUP_BLOCKS} blocks of {block_size} tokens "
                         f"clusters at ratio {ratio} (chunk_size {chunk_size}) into whole blocks; "
                         f"use a ratio such as 0.5, 0.75 or 0.875")

    @property
    def clusters(self) -> bool:
        return self.group_blocks > 0

    def first_block(self, group: int) -> int:
        """Logical index of the group's first block."""
        return self.sink_blocks + group * self.group_blocks

    def clustered_groups(self, num_tokens: int) -> int:
        """Groups clustered once a request holds `num_tokens` tokens (positions 0 .. n - 1)."""
        if not self.clusters:
            return 0
        span = self.group_blocks * self.block_size
        return max(0, (num_tokens - self.recent - self.sink_blocks * self.block_size) // span)

    def dead_blocks(self, num_tokens: int) -> list[int]:
        """Logical blocks freed by the groups clustered at `num_tokens` tokens, ascending."""
        dead = []
        for group in range(self.clustered_groups(num_tokens)):
            first = self.first_block(group)
            dead.extend(range(first + self.kept_blocks, first + self.group_blocks))
        return dead

    def live_blocks(self, num_tokens: int, clustered_at: Optional[int] = None) -> list[int]:
        """Logical blocks holding a request's `num_tokens` tokens, in order, once the groups
        clustered at `clustered_at` tokens (default: num_tokens) are gone. A step's attention
        reads live_blocks(tokens after the step, tokens before it): it clusters only afterwards."""
        num_blocks = -(-num_tokens // self.block_size)
        dead = set(self.dead_blocks(num_tokens if clustered_at is None else clustered_at))
        return [block for block in range(num_blocks) if block not in dead]

    def live_tokens(self, num_tokens: int, clustered_at: Optional[int] = None) -> int:
        """Slots the live blocks of live_blocks(num_tokens, clustered_at) fill."""
        clustered_at = num_tokens if clustered_at is None else clustered_at
        return num_tokens - len(self.dead_blocks(clustered_at)) * self.block_size
