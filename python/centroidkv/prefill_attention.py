"""Attention of a prompt block (prefill) without a dense [queries, keys] mask.

Row b's keys are its cached prefix [0, length_b - T) followed by the T new tokens. The new block
is causal and every new token has size 1, so it runs through torch's causal flash kernel with
grouped KV heads. The prefix is visible to every new query with bias log(size); when it holds
clustered slots (or padding a stock cache kept), it runs as a second, non-causal attention with
that bias, and the two merge exactly by log-sum-exp (attention_lse.py). A first prefill has no
prefix: it is one causal flash call, the kernel stock transformers uses.

Left padding: row b's first pad_b new tokens are padding. Rows are grouped by (length, padding)
and each group attends with its padding sliced off, so no mask is needed; padded queries get
zeros. Padding that is not a leading run (right padding, holes) returns None: the caller falls
back to the dense path.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import attention_lse


def leading_padding(new_mask: Optional[Tensor], batch: int) -> Optional[list[int]]:
    """Padded tokens at the start of each row's new block ([B, T] mask, 0 = padding); None if
    some row's padding is not a leading run. One small device-to-host copy."""
    if new_mask is None:
        return [0] * batch
    real = new_mask.bool()
    tokens = real.shape[1]
    first_real = torch.where(real.any(-1), real.int().argmax(-1), tokens)
    first, count = torch.stack([first_real, real.sum(-1)]).tolist()
    if any(f + c != tokens for f, c in zip(first, count)):
        return None
    return first


def causal_block(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Square causal attention through torch's fused kernels (flash where it applies)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def prefill_attention(query: Tensor, key: Tensor, value: Tensor, scale: float, sizes: Optional[Tensor],
                      lengths: Optional[Tensor], prefix_all_ones: bool, padding: list[int]) -> Tensor:
    """query [B, Hq, T, D] of the new tokens; key / value [B, Hkv, L, D] hold each row's slots
    left-aligned, the new tokens last; sizes [B, 1 or Hkv, L] (None: all 1); lengths [B] live
    slots per row (None: all L); prefix_all_ones: every prefix slot has size 1 (no bias needed);
    padding: leading pads of each row's new block. Returns [B, Hq, T, Dv]."""
    batch, _, tokens, _ = query.shape
    slots = key.shape[2]
    row_lengths = [slots] * batch if lengths is None else lengths.tolist()
    groups: dict[tuple[int, int], list[int]] = {}
    for row, (length, pad) in enumerate(zip(row_lengths, padding)):
        groups.setdefault((length, pad), []).append(row)
    if len(groups) == 1 and (slots, 0) in groups and slots == tokens:  # first prefill, no padding
        return causal_block(query, key, value, scale)

    out = query.new_zeros(*query.shape[:3], value.shape[3])  # padded queries stay zero
    for (length, pad), rows in groups.items():
        if pad == tokens:
            continue  # nothing real in these rows' block
        index = slice(None) if len(rows) == batch else torch.tensor(rows, device=query.device)
        start = length - tokens  # first new token
        q = query[index][:, :, pad:]
        k, v = key[index], value[index]
        if start == 0:
            result = causal_block(q, k[:, :, pad:length], v[:, :, pad:length], scale)
        else:
            bias = None
            if not prefix_all_ones:
                prefix_sizes = sizes[index][:, :, :start].float()
                bias = prefix_sizes.log().expand(-1, k.shape[1], -1)  # log 0 = -inf masks
            prefix = attention_lse.attend(q, k[:, :, :start], v[:, :, :start], scale, key_bias=bias)
            block = attention_lse.attend(q, k[:, :, start + pad:length], v[:, :, start + pad:length], scale,
                                         causal=True)
            result = attention_lse.merge([prefix, block])
        out[index, :, pad:] = result
    return out
