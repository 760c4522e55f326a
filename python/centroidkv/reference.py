"""Pure-PyTorch definitions of every op (the oracle for tests and the baseline for benchmarks).

Vectorised the way ToMe writes it: one batched similarity matmul per pass, argmax, a stable
sort and scatter-adds; no Python loop over tokens or chunks. Runs on any device.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

EPS = 1e-6  # SPEC.md: norms are clamped to at least eps before dividing.


def _chunked_similarity(metric: Tensor, chunk_size: int) -> Tensor:
    """Cosine similarity of A (even offsets) to B (odd offsets) per chunk, fp32, NaN -> -inf.

    metric [B, H, n*c, D] -> [B, H, n, c/2, c/2]."""
    batch, heads, length, dim = metric.shape
    m = metric.float().reshape(batch, heads, length // chunk_size, chunk_size, dim)
    a, b = m[..., 0::2, :], m[..., 1::2, :]
    norm_a = a.norm(dim=-1).clamp_min(EPS)
    norm_b = b.norm(dim=-1).clamp_min(EPS)
    sim = (a @ b.transpose(-1, -2)) / (norm_a[..., :, None] * norm_b[..., None, :])
    return sim.masked_fill(sim.isnan(), float("-inf"))


def match(metric: Tensor, chunk_size: int, num_merge: int) -> Tensor:
    """For every token of metric [B, H, L, D], its output slot (int64 [B, H, L]); SPEC.md."""
    batch, heads, length, _ = metric.shape
    c, r = chunk_size, num_merge
    n = length // c
    device = metric.device
    tail = n * (c - r) + torch.arange(length - n * c, device=device)
    tail = tail.expand(batch, heads, -1)
    if n == 0:
        return tail.clone()

    sim = _chunked_similarity(metric[:, :, : n * c], c)
    best = sim.argmax(dim=-1)  # first maximum: ties go to the smaller destination offset
    score = sim.gather(-1, best[..., None])[..., 0]
    # Stable descending sort: equal scores keep offset order, so ties go to the smaller source.
    merged_src = score.sort(dim=-1, descending=True, stable=True).indices[..., :r]

    keep_a = torch.ones_like(score, dtype=torch.bool).scatter_(-1, merged_src, False)
    keep = torch.ones(batch, heads, n, c, dtype=torch.bool, device=device)
    keep[..., 0::2] = keep_a
    slot_in_chunk = keep.long().cumsum(-1) - 1  # survivors keep their original order
    dest_slot = slot_in_chunk[..., 1::2].gather(-1, best)  # slot of best(a) for every a
    slot_a = torch.where(keep_a, slot_in_chunk[..., 0::2], dest_slot)
    slot = slot_in_chunk.clone()
    slot[..., 0::2] = slot_a
    slot = slot + (torch.arange(n, device=device) * (c - r))[:, None]
    return torch.cat([slot.reshape(batch, heads, n * c), tail], dim=-1)


def segment_average(x: Tensor, slots: Tensor, sizes: Tensor, out_len: int) -> Tensor:
    """Size-weighted mean of rows of x [B, H, L, D] grouped by slots [B, H, L] (fp32 math).

    Slots whose total size is 0 get the plain mean. A slot holding a single token copies it
    unchanged (the formula's exact value, without a rounding round-trip)."""
    batch, heads, _, dim = x.shape
    xf = x.float()
    index = slots[..., None].expand(-1, -1, -1, dim)
    weighted = torch.zeros(batch, heads, out_len, dim, device=x.device).scatter_add_(
        2, index, xf * sizes[..., None])
    plain = torch.zeros_like(weighted).scatter_add_(2, index, xf)
    total = torch.zeros(batch, heads, out_len, device=x.device).scatter_add_(-1, slots, sizes)
    count = torch.zeros_like(total).scatter_add_(-1, slots, torch.ones_like(sizes))
    mean = torch.where((total > 0)[..., None], weighted / total[..., None].clamp_min(1e-30),
                       plain / count[..., None].clamp_min(1))
    single = torch.zeros(batch, heads, out_len, dim, dtype=x.dtype, device=x.device)
    single.scatter_(2, index, x)  # only read where count == 1, so the write order is irrelevant
    return torch.where((count == 1)[..., None], single, mean.to(x.dtype))


def merge(keys: Tensor, values: Tensor, sizes: Optional[Tensor], chunk_size: int,
          num_merge: int, metric: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """One clustering pass: (keys, values, sizes) of the size-weighted centroids; SPEC.md."""
    batch, heads, length, _ = keys.shape
    if sizes is None:
        sizes = torch.ones(batch, heads, length, device=keys.device)
    slots = match(keys if metric is None else metric, chunk_size, num_merge)
    out_len = (length // chunk_size) * (chunk_size - num_merge) + length % chunk_size
    sizes = sizes.float()
    new_sizes = torch.zeros(batch, heads, out_len, device=keys.device).scatter_add_(-1, slots, sizes)
    return (segment_average(keys, slots, sizes, out_len),
            segment_average(values, slots, sizes, out_len), new_sizes)


def attention(q: Tensor, k: Tensor, v: Tensor, sizes: Optional[Tensor] = None, scale: Optional[float] = None,
              lengths: Optional[Tensor] = None) -> Tensor:
    """softmax(scale * q.k + log(size)) v in float64, GQA, causal over the last Tq keys.

    A query that sees no key with size > 0 returns zeros."""
    batch, q_heads, tq, dim = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    kd = k.double().repeat_interleave(group, dim=1)
    vd = v.double().repeat_interleave(group, dim=1)
    logits = scale * (q.double() @ kd.transpose(-1, -2))  # [B, Hq, Tq, L]
    if sizes is not None:
        logits = logits + sizes.double().log().repeat_interleave(group, dim=1)[:, :, None, :]
    if lengths is None:
        lengths = torch.full((batch,), length, device=q.device)
    key_pos = torch.arange(length, device=q.device)
    last_visible = lengths.to(q.device)[:, None] - tq + torch.arange(tq, device=q.device)  # [B, Tq]
    visible = key_pos[None, None, :] <= last_visible[:, :, None]  # [B, Tq, L]
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # all-masked rows -> zeros
    return (weights @ vd).to(q.dtype)
