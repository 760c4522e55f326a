"""Clustering a cache region to an exact token budget, by passes of bipartite soft matching.

Each pass follows SPEC.md ("One pass"); only the last pass may merge fewer than r sources per
chunk: it merges the globally best-matched sources, exactly as many as the budget still needs,
so that every policy can be compared at precisely the same cache length. Passes with a uniform
r and the alternating partition run one merge (backend.merge: the compiled op, or the reference
where the device has none); everything else runs the pure-PyTorch path below.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend
from ..reference import EPS, segment_average

PARTITIONS = ("alternating", "halves")


def _partition_offsets(chunk_size: int, partition: str, device) -> tuple[Tensor, Tensor]:
    """Offsets of the sources (A) and destinations (B) inside a chunk."""
    if partition == "alternating":
        return (torch.arange(0, chunk_size, 2, device=device),
                torch.arange(1, chunk_size, 2, device=device))
    if partition == "halves":  # ablation: first half of the chunk merges into the second half
        half = chunk_size // 2
        return torch.arange(half, device=device), torch.arange(half, chunk_size, device=device)
    raise ValueError(f"centroidkv: partition must be one of {PARTITIONS}, got {partition!r}")


def plan_merge(metric: Tensor, chunk_size: int, num_merge: int, max_merged: Optional[int] = None,
               partition: str = "alternating") -> tuple[Tensor, int]:
    """Merge map of one pass: (slot of every token [B, H, L] int64, output length).

    Per chunk, the num_merge best-matched sources merge (SPEC.md). With max_merged below
    chunks * num_merge, instead the max_merged best-matched sources over all chunks merge
    (ties to the earlier chunk, then the smaller offset)."""
    batch, heads, length, dim = metric.shape
    c = chunk_size
    n = length // c
    device = metric.device
    src_off, dst_off = _partition_offsets(c, partition, device)
    m = metric[:, :, : n * c].float().reshape(batch, heads, n, c, dim)
    a, b = m[..., src_off, :], m[..., dst_off, :]
    sim = (a @ b.transpose(-1, -2)) / (a.norm(dim=-1).clamp_min(EPS)[..., :, None]
                                       * b.norm(dim=-1).clamp_min(EPS)[..., None, :])
    sim = sim.masked_fill(sim.isnan(), float("-inf"))
    best = sim.argmax(dim=-1)                      # [B, H, n, c/2]; first max = smaller offset
    score = sim.gather(-1, best[..., None])[..., 0]
    half = c // 2
    merged = torch.zeros(batch, heads, n, half, dtype=torch.bool, device=device)
    if max_merged is None or n * num_merge <= max_merged:
        count = n * num_merge
        top = score.sort(dim=-1, descending=True, stable=True).indices[..., :num_merge]
        merged.scatter_(-1, top, True)
    else:
        count = max_merged
        flat = score.reshape(batch, heads, n * half)
        top = flat.sort(dim=-1, descending=True, stable=True).indices[..., :max_merged]
        merged.view(batch, heads, n * half).scatter_(-1, top, True)
    chunk_start = (torch.arange(n, device=device) * c)[:, None]
    src_pos = (chunk_start + src_off).expand(batch, heads, n, half)
    dst_pos = (chunk_start + dst_off)[None, None].expand(batch, heads, n, half).gather(-1, best)
    keep = torch.ones(batch, heads, length, dtype=torch.bool, device=device)
    keep.scatter_(-1, src_pos.reshape(batch, heads, -1), ~merged.reshape(batch, heads, -1))
    slot = keep.long().cumsum(-1) - 1
    dest_slot = slot.gather(-1, dst_pos.reshape(batch, heads, -1))
    src_slot = torch.where(merged.reshape(batch, heads, -1), dest_slot,
                           slot.gather(-1, src_pos.reshape(batch, heads, -1)))
    slot = slot.scatter(-1, src_pos.reshape(batch, heads, -1), src_slot)
    return slot, length - count


def merge_pass(keys: Tensor, values: Tensor, sizes: Tensor, chunk_size: int, num_merge: int,
               max_merged: Optional[int] = None, metric: Optional[Tensor] = None,
               partition: str = "alternating") -> tuple[Tensor, Tensor, Tensor]:
    """One pass of plan_merge applied to keys and values with size weights."""
    n = keys.shape[2] // chunk_size
    uniform = max_merged is None or n * num_merge <= max_merged
    if uniform and partition == "alternating":
        return backend.merge(keys, values, sizes, chunk_size, num_merge, metric)
    slots, out_len = plan_merge(keys if metric is None else metric, chunk_size, num_merge,
                                max_merged, partition)
    new_sizes = torch.zeros(*sizes.shape[:2], out_len, device=sizes.device).scatter_add_(-1, slots, sizes)
    return (segment_average(keys, slots, sizes, out_len),
            segment_average(values, slots, sizes, out_len), new_sizes)


def cluster_to_budget(keys: Tensor, values: Tensor, sizes: Optional[Tensor], budget: int,
                      chunk_size: int = 32, num_merge: Optional[int] = None,
                      metric: str = "keys", partition: str = "alternating"
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """Clusters [B, H, L, D] keys/values to exactly `budget` slots (budget <= L).

    Args:
        sizes: [B, H, L] float32 (default ones).
        chunk_size: chunk length c of every pass (shrunk to the even length that fits once
            fewer than c tokens remain).
        num_merge: sources merged per chunk and pass (default c/2; smaller values merge only
            the most redundant pairs and take more passes).
        metric: "keys" (SPEC.md) or "keys+values" (unit keys and unit values concatenated).
        partition: "alternating" (SPEC.md) or "halves" (ablation).
    """
    length = keys.shape[2]
    if not 0 <= budget <= length:
        raise ValueError(f"centroidkv: budget must be in [0, {length}], got {budget}")
    if metric not in ("keys", "keys+values"):
        raise ValueError(f"centroidkv: metric must be 'keys' or 'keys+values', got {metric!r}")
    if sizes is None:
        sizes = torch.ones(keys.shape[:3], device=keys.device)
    sizes = sizes.float()
    while keys.shape[2] > budget:
        length = keys.shape[2]
        c = min(chunk_size, length - length % 2)
        if c < 2:
            raise ValueError(f"centroidkv: cannot cluster {length} tokens to {budget}")
        r = max(1, min(c // 2, (num_merge if num_merge is not None else c // 2) * c // chunk_size))
        m = None
        if metric == "keys+values":
            m = torch.cat([keys.float() / keys.float().norm(dim=-1, keepdim=True).clamp_min(EPS),
                           values.float() / values.float().norm(dim=-1, keepdim=True).clamp_min(EPS)], -1)
        keys, values, sizes = merge_pass(keys, values, sizes, c, r, length - budget, m, partition)
    return keys, values, sizes
