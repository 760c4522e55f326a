"""Tensor work on a paged KV cache: writing tokens, attention over a request's live blocks, and
clustering a group of blocks in place. Plain torch on any device; no vLLM import, so the tests
run it without vLLM.

One layer's cache: keys and values [num_blocks, H, block_size, D] (vLLM's CPU layout, head-major
inside a block) and sizes [num_blocks, H, block_size] float32, the tokens each slot stands for.
A request's blocks are a row of block ids indexed by logical block (position // block_size).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..compress import compress
from ..ops import attention
from .plan import MergePlan


def write_tokens(key_cache: Tensor, value_cache: Tensor, sizes: Tensor, key: Tensor, value: Tensor,
                 slot_mapping: Tensor) -> None:
    """Stores new tokens ([T, H, D]) at their slots (block * block_size + offset; negative =
    padding, skipped) with size 1."""
    block_size = key_cache.shape[2]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    key_cache[blocks, :, offsets] = key.to(key_cache.dtype)
    value_cache[blocks, :, offsets] = value.to(value_cache.dtype)
    sizes[blocks, :, offsets] = 1.0


def gather_rows(cache: Tensor, block_ids: Tensor) -> Tensor:
    """[N, H, nb * bs, ...]: for each row of block_ids [N, nb], its blocks' slots in order
    (cache [blocks, H, bs, ...])."""
    picked = cache[block_ids]  # [N, nb, H, bs, ...]
    return picked.transpose(1, 2).reshape(block_ids.shape[0], cache.shape[1], -1, *cache.shape[3:])


def gather_blocks(cache: Tensor, block_ids: Tensor, length: int) -> Tensor:
    """[H, length, ...] of the given blocks' slots in order (cache [blocks, H, bs, ...])."""
    return gather_rows(cache, block_ids[None])[0, :, :length]


def attend(query: Tensor, key_cache: Tensor, value_cache: Tensor, sizes: Tensor, live_block_ids: Tensor,
           live_tokens: int, scale: float) -> Tensor:
    """Causal attention of one request's new queries [Tq, Hq, D] over its live blocks; the last Tq
    of the `live_tokens` slots are the queries' own tokens. Returns [Tq, Hq, Dv]."""
    keys = gather_blocks(key_cache, live_block_ids, live_tokens)
    values = gather_blocks(value_cache, live_block_ids, live_tokens)
    slot_sizes = gather_blocks(sizes, live_block_ids, live_tokens)
    out = attention(query.transpose(0, 1).unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
                    slot_sizes.unsqueeze(0), scale=scale)
    return out[0].transpose(0, 1)


def attend_fresh(query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
    """Causal attention of a request's first tokens (query [T, Hq, D], key/value [T, H, D], every
    slot exact): SDPA, which is faster than the clustered-cache op where no size is needed."""
    out = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(0, 1).unsqueeze(0), key.transpose(0, 1).unsqueeze(0).to(query.dtype),
        value.transpose(0, 1).unsqueeze(0).to(query.dtype), is_causal=True, scale=scale,
        enable_gqa=query.shape[1] != key.shape[1])
    return out[0].transpose(0, 1)


def attend_decodes(query: Tensor, key_cache: Tensor, value_cache: Tensor, sizes: Tensor, blocks: Tensor,
                   lengths: Tensor, scale: float) -> Tensor:
    """Attention of N single-token requests at once: query [N, Hq, D], blocks [N, nb] each row's
    live block ids (padded: slots past lengths[i] are not read). Returns [N, Hq, Dv]."""
    out = attention(query.unsqueeze(2), gather_rows(key_cache, blocks), gather_rows(value_cache, blocks),
                    gather_rows(sizes, blocks), scale=scale, lengths=lengths)
    return out.squeeze(2)


def cluster_groups(key_cache: Tensor, value_cache: Tensor, sizes: Tensor, group_block_ids: Tensor,
                   plan: MergePlan) -> None:
    """Clusters groups of blocks in place: group_block_ids [N, G] (each row one group's blocks in
    logical order); the centroids fill each row's first K blocks. Every (group, KV head) is
    clustered on its own (SPEC.md), so no data crosses heads or tensor-parallel ranks."""
    num_groups = group_block_ids.shape[0]
    if num_groups == 0:
        return
    heads, bs = key_cache.shape[1], plan.block_size
    gathered = (gather_rows(cache, group_block_ids) for cache in (key_cache, value_cache, sizes))
    keys, values, slot_sizes = compress(*gathered, ratio=plan.ratio, chunk_size=plan.chunk_size)
    kept = group_block_ids[:, :plan.kept_blocks].reshape(-1)

    def scatter(cache: Tensor, merged: Tensor) -> None:
        merged = merged.reshape(num_groups, heads, plan.kept_blocks, bs, *cache.shape[3:]).transpose(1, 2)
        cache[kept] = merged.reshape(-1, heads, bs, *cache.shape[3:]).to(cache.dtype)

    scatter(key_cache, keys)
    scatter(value_cache, values)
    scatter(sizes, slot_sizes)
