"""The paper's policy: every token that leaves the recent window is clustered (SPEC.md)."""
from __future__ import annotations

from dataclasses import dataclass

from .. import backend
from ..compress import merge_passes
from .base import Policy, Segment


@dataclass
class PlainClustering(Policy):
    """The paper's policy (SPEC.md): no protected tokens; passes with r = c/2 (the last one with
    the r that lands nearest the target) of bipartite soft matching on key cosine, each cluster
    replaced by its size-weighted centroid. Attention then adds log(size) per slot.

    Args:
        metric: what the matching compares; only "keys" (SPEC's default) for now.
    """

    metric: str = "keys"

    def __post_init__(self):
        if self.metric != "keys":
            raise ValueError(f"PlainClustering: metric must be 'keys', got {self.metric!r}")

    def compress(self, segment: Segment, *, ratio: float, chunk_size: int) -> Segment:
        keys, values, sizes = segment.keys, segment.values, segment.sizes
        for num_merge in merge_passes(ratio, chunk_size):
            keys, values, sizes = backend.merge(keys, values, sizes, chunk_size, num_merge)
        return Segment(keys, values, sizes, None)
