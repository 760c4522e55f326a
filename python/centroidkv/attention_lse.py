"""Attention that also returns its log-sum-exp, so that attention over parts of the keys merges
exactly: softmax over [A | B] = (e^lse_A out_A + e^lse_B out_B) / (e^lse_A + e^lse_B).

Prefill over a cache that already holds clustered slots attends to the clustered prefix (log-size
bias, no causal mask) and to the new block (causal) separately and merges the two this way, so
neither needs a dense [queries, keys] mask.

Kernels: torch's fused flash-attention kernels, which return the log-sum-exp (CUDA: fp16/bf16,
head dim <= 256; CPU: any float dtype), read grouped KV heads without copying them. A per-key
bias has no slot in those kernels, so it is folded into two extra head-dim channels:

    q' = [q, 1, 1, 0...],  k' = [k, hi, lo, 0...],  hi + lo = bias / scale  (hi, lo in q's dtype)

    scale * q'.k' = scale * q.k + bias.

Two channels keep the bias exact to about 2^-16 relative in bf16; the padding keeps the head dim a
multiple of 8. Where no fused kernel applies (fp32 on CUDA, head dims over 248, a torch without
the kernel), an exact blocked computation in float32 runs instead, query block by query block,
so it never holds more than a bounded [block, keys] slab.
"""
from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# Bias of a masked key, in logit units before the scale. Finite, so no inf reaches the kernels'
# products; exp(scale * MASKED) is 0 in float32 for any scale >= 2e-3 (head dims up to 250k).
MASKED = -6.0e4
BLOCK_ELEMENTS = 1 << 25  # the blocked path's logits slab: at most this many float32 values
_UNAVAILABLE: set = set()  # (device type, dtype) whose fused kernel failed: not tried again


class Attended(NamedTuple):
    out: Tensor  # [B, Hq, T, Dv] in q's dtype; zeros where no key is visible
    lse: Tensor  # [B, Hq, T] float32, natural log; -inf where no key is visible


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool = False,
           key_bias: Optional[Tensor] = None) -> Attended:
    """softmax(scale * q.k + key_bias) v with its log-sum-exp.

    q [B, Hq, T, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv] (query head h reads KV head
    h // (Hq / Hkv)); key_bias [B, Hkv, L] float32, added to every query's logit of that key
    (-inf masks it); causal needs T == L (query i sees keys <= i)."""
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal attention needs as many queries as keys, got {q.shape[2]} and {k.shape[2]}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        return _nothing_visible(q, v)
    fused = _fused_kernel(q, v)
    if fused is not None:
        try:
            return _attend_fused(fused, q, k, v, scale, causal, key_bias)
        except RuntimeError as error:  # a kernel this torch lacks or refuses for these inputs
            _UNAVAILABLE.add((q.device.type, q.dtype))
            log.warning("centroidkv: fused attention with log-sum-exp failed on %s %s (%s); using the "
                        "exact blocked path", q.device.type, q.dtype, str(error).splitlines()[0])
    return _attend_blocked(q, k, v, scale, causal, key_bias)


def merge(parts: list[Attended]) -> Tensor:
    """The attention over the union of the parts' keys, from each part's output and lse."""
    lse = torch.stack([p.lse for p in parts])  # [P, B, Hq, T]
    top = lse.max(0).values
    weights = torch.exp(lse - torch.where(torch.isfinite(top), top, 0.0))  # 0 for empty parts
    total = weights.sum(0)
    out = sum(w[..., None] * p.out.float() for w, p in zip(weights, parts))
    out = out / torch.where(total > 0, total, 1.0)[..., None]
    return out.to(parts[0].out.dtype)


# ------------------------------------------------------------------------------ fused kernels
def _fused_kernel(q: Tensor, v: Tensor):
    """torch's flash kernel for q's device and dtype, or None where none applies."""
    if (q.device.type, q.dtype) in _UNAVAILABLE or q.shape[3] != v.shape[3]:
        return None
    if q.device.type == "cuda":
        if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[3] + 2 > 256:
            return None
        return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention", None)
    if q.device.type == "cpu":
        return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return None


_REPEAT_KV: set = set()  # device types whose fused kernel needed repeated KV heads


def _attend_fused(kernel, q, k, v, scale, causal, key_bias) -> Attended:
    dim = q.shape[3]
    if key_bias is not None:
        q, k, v = _fold_bias(q, k, v, key_bias, scale)
    group = q.shape[1] // k.shape[1]
    if group > 1 and q.device.type in _REPEAT_KV:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    try:
        result = kernel(q, k, v, 0.0, causal, scale=scale)
    except RuntimeError:
        if group == 1 or q.device.type in _REPEAT_KV:
            raise
        _REPEAT_KV.add(q.device.type)  # this kernel wants one KV head per query head
        return _attend_fused(kernel, q[..., :dim], k[..., :dim], v[..., :dim], scale, causal, key_bias)
    out, lse = result[0][..., :dim], result[1][..., :q.shape[2]].float()
    # Rows that see nothing: flash kernels report +inf (or NaN) there; a masked bias leaves a
    # finite lse far below any real one. Both become "nothing visible".
    seen = torch.isfinite(lse) & (lse > MASKED * scale / 2)
    return Attended(torch.where(seen[..., None], out, 0.0), torch.where(seen, lse, -torch.inf))


def _fold_bias(q: Tensor, k: Tensor, v: Tensor, key_bias: Tensor, scale: float):
    """(q', k', v') whose plain attention equals q, k, v's attention with key_bias (see module
    docstring); v is padded to the same head dim, since the kernels need equal ones."""
    dim = q.shape[3]
    pad = 2 + (-(dim + 2)) % 8
    channel = (key_bias.float() / scale).clamp(min=MASKED)  # [B, Hkv, L]
    hi = channel.to(q.dtype)
    lo = (channel - hi.float()).to(q.dtype)
    q2 = q.new_zeros(*q.shape[:3], dim + pad)
    q2[..., :dim] = q
    q2[..., dim:dim + 2] = 1
    k2 = k.new_zeros(*k.shape[:3], dim + pad)
    k2[..., :dim] = k
    k2[..., dim] = hi
    k2[..., dim + 1] = lo
    v2 = v.new_zeros(*v.shape[:3], dim + pad)
    v2[..., :dim] = v
    return q2, k2, v2


# ------------------------------------------------------------------------------ exact, blocked
def _attend_blocked(q, k, v, scale, causal, key_bias) -> Attended:
    batch, q_heads, queries, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    kf, vf = k.float(), v.float()
    bias = None if key_bias is None else key_bias.float()[:, :, None, None, :]  # [B, Hkv, 1, 1, L]
    out = torch.empty(batch, q_heads, queries, v.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, q_heads, queries, dtype=torch.float32, device=q.device)
    step = max(1, BLOCK_ELEMENTS // max(1, batch * q_heads * keys))
    for start in range(0, queries, step):
        stop = min(queries, start + step)
        qb = q[:, :, start:stop].float().reshape(batch, kv_heads, group, stop - start, dim)
        logits = torch.einsum("bhgqd,bhld->bhgql", qb, kf) * scale
        if bias is not None:
            logits = logits + bias
        if causal:
            above = torch.arange(keys, device=q.device) > torch.arange(start, stop, device=q.device)[:, None]
            logits = logits.masked_fill(above, -torch.inf)
        block_lse = torch.logsumexp(logits, -1)  # -inf where nothing is visible
        probs = torch.exp(logits - torch.where(torch.isfinite(block_lse), block_lse, 0.0)[..., None])
        block_out = torch.einsum("bhgql,bhld->bhgqd", probs, vf)
        out[:, :, start:stop] = block_out.reshape(batch, q_heads, stop - start, -1).to(q.dtype)
        lse[:, :, start:stop] = block_lse.reshape(batch, q_heads, stop - start)
    return Attended(out, lse)


def _nothing_visible(q: Tensor, v: Tensor) -> Attended:
    shape = (*q.shape[:3],)
    return Attended(q.new_zeros(*shape, v.shape[3]),
                    torch.full(shape, -torch.inf, dtype=torch.float32, device=q.device))
