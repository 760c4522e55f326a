"""Typed Python entry points to torch.ops.centroidkv, and the fake kernels that let
torch.compile and torch.export trace them (shapes only, computed from the inputs)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def match(metric: Tensor, chunk_size: int = 32, num_merge: Optional[int] = None) -> Tensor:
    """Merge map of one clustering pass (SPEC.md).

    Args:
        metric: [B, H, L, D] float tensor the similarity is computed on (usually the keys).
        chunk_size: even chunk length c >= 2; the last L % c tokens pass through.
        num_merge: sources merged per chunk, 0 <= r <= c/2 (default c/2).

    Returns:
        int64 [B, H, L]: for each token, the index of the output slot it lands in.
    """
    num_merge = chunk_size // 2 if num_merge is None else num_merge
    return torch.ops.centroidkv.match(metric, chunk_size, num_merge)


def merge(
    keys: Tensor,
    values: Tensor,
    sizes: Optional[Tensor] = None,
    chunk_size: int = 32,
    num_merge: Optional[int] = None,
    metric: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One clustering pass: each cluster becomes its size-weighted centroid (SPEC.md).

    Args:
        keys: [B, H, L, Dk] float32, float16 or bfloat16.
        values: [B, H, L, Dv], same dtype and device as keys.
        sizes: [B, H, L] float32 >= 0, tokens each slot stands for (default all ones; 0 = padding).
        chunk_size: even chunk length c >= 2.
        num_merge: sources merged per chunk, 0 <= r <= c/2 (default c/2).
        metric: [B, H, L, Dm] tensor to match on (default: keys).

    Returns:
        (keys, values, sizes) of length (L // c) * (c - r) + L % c.
    """
    num_merge = chunk_size // 2 if num_merge is None else num_merge
    return torch.ops.centroidkv.merge(keys, values, sizes, chunk_size, num_merge, metric)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sizes: Optional[Tensor] = None,
    *,
    scale: Optional[float] = None,
    lengths: Optional[Tensor] = None,
) -> Tensor:
    """Attention over a clustered cache: softmax(scale * q.k + log(size)) v, GQA-native.

    Args:
        q: [B, Hq, Tq, D]; k: [B, Hkv, L, D]; v: [B, Hkv, L, Dv]; Hq a multiple of Hkv
            (query head h reads KV head h // (Hq / Hkv)).
        sizes: [B, Hkv, L] float32; 0 masks a slot (default all ones).
        scale: logit scale (default 1 / sqrt(D)).
        lengths: [B] int, valid keys per row (default L). Query i sees keys 0 .. length - Tq + i.

    Returns:
        [B, Hq, Tq, Dv] in q's dtype (softmax in float32).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return torch.ops.centroidkv.attention(q, k, v, sizes, float(scale), lengths)


def merged_length(length, chunk_size: int, num_merge: int):
    """Slots one merge pass leaves of `length` tokens (SPEC.md); also for symbolic lengths."""
    return (length // chunk_size) * (chunk_size - num_merge) + length % chunk_size


def _check_chunking(chunk_size: int, num_merge: int) -> None:
    torch._check(chunk_size >= 2 and chunk_size % 2 == 0,
                 lambda: f"centroidkv: chunk_size must be an even number >= 2, got {chunk_size}")
    torch._check(0 <= num_merge <= chunk_size // 2,
                 lambda: f"centroidkv: num_merge must be in [0, {chunk_size // 2}], got {num_merge}")


@torch.library.register_fake("centroidkv::match")
def _match_fake(metric, chunk_size, num_merge):
    torch._check(metric.dim() == 4, lambda: "centroidkv.match: metric must be [B, H, L, D]")
    _check_chunking(chunk_size, num_merge)
    return metric.new_empty(metric.shape[:3], dtype=torch.int64)


@torch.library.register_fake("centroidkv::merge")
def _merge_fake(keys, values, sizes, chunk_size, num_merge, metric=None):
    torch._check(keys.dim() == 4, lambda: "centroidkv.merge: keys must be [B, H, L, Dk]")
    torch._check(values.dim() == 4, lambda: "centroidkv.merge: values must be [B, H, L, Dv]")
    # Mixed devices would otherwise reach this kernel (meta wins dispatch) and trace silently.
    for name, t in (("values", values), ("sizes", sizes), ("metric", metric)):
        torch._check(t is None or t.device == keys.device,
                     lambda: f"centroidkv.merge: {name} is on {t.device} but keys is on {keys.device}")
    _check_chunking(chunk_size, num_merge)
    batch, heads, length = keys.shape[:3]
    out_len = merged_length(length, chunk_size, num_merge)
    return (
        keys.new_empty((batch, heads, out_len, keys.shape[3])),
        values.new_empty((batch, heads, out_len, values.shape[3])),
        keys.new_empty((batch, heads, out_len), dtype=torch.float32),
    )


@torch.library.register_fake("centroidkv::attention")
def _attention_fake(q, k, v, sizes, scale, lengths=None):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                 lambda: "centroidkv.attention: q, k, v must be 4-D")
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))
