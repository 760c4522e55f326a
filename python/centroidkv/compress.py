"""Reaching a target compression ratio by several merge passes (SPEC.md, "Several passes")."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .arguments import as_float, as_int
from .ops import merge


def merge_passes(ratio: float, chunk_size: int) -> list[int]:
    """num_merge of each pass that brings the kept fraction to about 1 - ratio.

    Full passes (r = c/2) halve the kept fraction while that stays at or above the target; the
    last pass uses the r that lands nearest it. ratio 0.5 -> [c/2], 0.75 -> [c/2, c/2]."""
    ratio, chunk_size = as_float("centroidkv", "ratio", ratio), as_int("centroidkv", "chunk_size", chunk_size)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"centroidkv: ratio must be in [0, 1), got {ratio}")
    if chunk_size < 2 or chunk_size % 2:
        raise ValueError(f"centroidkv: chunk_size must be an even number >= 2, got {chunk_size}")
    target, kept, passes = 1.0 - ratio, 1.0, []
    while kept > target + 1e-9:
        if kept / 2 >= target - 1e-9:
            r = chunk_size // 2
        else:
            r = round(chunk_size * (1.0 - target / kept))
            if r == 0:
                break
        passes.append(r)
        kept *= (chunk_size - r) / chunk_size
    return passes


def compress(keys: Tensor, values: Tensor, sizes: Optional[Tensor] = None, *, ratio: float,
             chunk_size: int = 32) -> tuple[Tensor, Tensor, Tensor]:
    """Clusters a cache to keep about (1 - ratio) of its chunked tokens.

    Args:
        keys, values: [B, H, L, D] (post-rotary keys).
        sizes: [B, H, L] float32, default all ones.
        ratio: fraction of tokens to remove, in [0, 1); 0.5 is one pass, 0.75 two.
        chunk_size: chunk length of every pass.

    Returns:
        (keys, values, sizes) after the passes; sizes always a tensor.
    """
    # A ratio too small for one merge still runs one pass, with r = 0: it checks the arguments and
    # returns copies, as every other ratio does.
    passes = merge_passes(ratio, chunk_size) or [0]
    if sizes is None:
        sizes = torch.ones(keys.shape[:3], dtype=torch.float32, device=keys.device)
    for num_merge in passes:
        keys, values, sizes = merge(keys, values, sizes, chunk_size, num_merge)
    return keys, values, sizes
