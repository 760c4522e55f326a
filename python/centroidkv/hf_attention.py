"""The "centroidkv" attention implementation for transformers models.

`import centroidkv` registers it, so `AutoModelForCausalLM.from_pretrained(...,
attn_implementation="centroidkv")` works without touching model files. It computes

    softmax(scale * q.k + log(size)) v,   query head h reading KV head h // (Hq / Hkv),

over the slots a CentroidKVCache layer holds (size 1 for original tokens, s for a centroid of s
tokens, 0 for padding or empty slots), then lets that layer cluster what left its recent window.

Masks. transformers builds no mask for an implementation it does not know, so this module also
registers a mask "creator" that hands the user's 2D padding mask [B, seen + q] through unchanged.
Causality is built here from per-row slot counts: query i of the q new tokens sees slot j iff
j <= length[b] - q + i, which stays right however many slots clustering removed. Padded new
tokens get size 0; queries that see no slot of positive size return zeros (never NaN, which
would poison later layers through 0 * NaN).

Kernels. Short query blocks (decoding) go to torch.ops.centroidkv.attention when it has a kernel
for the device. Prompt blocks go to prefill_attention.py: torch's causal flash kernel for the new
tokens and, over a clustered prefix, a second attention with the log-size bias merged by
log-sum-exp; no [queries, keys] mask is built. The dense path (torch's scaled_dot_product_attention
with a float bias [B, 1 or Hkv, T, L]) remains for sliding-window layers, soft-capping and padding
that is not a leading run.
"""
from __future__ import annotations

import threading
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend
from .cache import active_layer
from .prefill_attention import leading_padding, prefill_attention

NAME = "centroidkv"
_PADDING_MEMO = threading.local()
# Query blocks up to this long use the attention op (decoding, short continuations); longer ones
# (prefill) use SDPA, whose fused kernels are built for long query blocks.
OP_MAX_QUERIES = 16


def new_token_padding(attention_mask: Optional[Tensor], queries: int, batch: int) -> Optional[list[int]]:
    """leading_padding of the mask's last `queries` columns. Every layer of a forward receives
    the same mask tensor, so it is computed (one device-to-host copy) once per forward."""
    if attention_mask is None:
        return [0] * batch
    key = (queries, attention_mask._version)  # the version counter: an in-place change misses
    memo = getattr(_PADDING_MEMO, "last", None)
    if memo is not None and memo[0]() is attention_mask and memo[1] == key:
        return memo[2]
    padding = leading_padding(attention_mask[:, -queries:], batch)
    _PADDING_MEMO.last = (weakref.ref(attention_mask), key, padding)
    return padding


def padding_mask_passthrough(*args, attention_mask: Optional[Tensor] = None, q_length: Optional[int] = None,
                             kv_length: Optional[int] = None, **kwargs) -> Optional[Tensor]:
    """Mask creation for "centroidkv": the 2D padding mask [B, seen + q] (or None), unchanged;
    only its last q columns where the cache asks for no more (kv_length == q_length: a
    CentroidKVCache with static buffers, whose captured steps need an input of fixed width)."""
    if (attention_mask is not None and attention_mask.dim() == 2 and kv_length is not None
            and kv_length == q_length and attention_mask.shape[1] > kv_length):
        return attention_mask[:, -kv_length:].contiguous()  # a stride that does not change either
    return attention_mask


def build_bias(sizes: Optional[Tensor], lengths: Optional[Tensor], batch: int, queries: int,
               slots: int, window: Optional[int], device, dtype) -> Tensor:
    """[B, Hs, Tq, L] additive bias: log(size) where visible, -inf elsewhere (Hs = 1 or Hkv)."""
    key = torch.arange(slots, device=device)
    if lengths is None:
        lengths = torch.full((batch,), slots, device=device)
    last = lengths.to(device)[:, None] - queries + torch.arange(queries, device=device)  # [B, Tq]
    visible = key[None, None, :] <= last[:, :, None]  # [B, Tq, L]
    if window is not None:  # transformers' sliding window: kv > q - window
        visible &= key[None, None, :] > (last - window)[:, :, None]
    if sizes is None:
        bias = torch.zeros(batch, 1, 1, slots, device=device)
    else:
        bias = sizes.float().log()[:, :, None, :]  # log 0 = -inf masks empty slots
    bias = bias.masked_fill(~visible[:, None], float("-inf"))
    return bias.to(dtype)


def attend_torch(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float,
                 softcap: Optional[float] = None) -> Tensor:
    """Attention with a [B, 1 or Hkv, Tq, L] bias; [B, Hq, Tq, Dv]; zeros where nothing is visible."""
    batch, q_heads, queries, dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    visible = (bias > float("-inf")).any(-1, keepdim=True)  # [B, Hs, Tq, 1]
    if softcap is not None:  # Gemma-2-style capping needs the logits: plain math
        logits = (q.float() @ k.float().repeat_interleave(group, 1).transpose(-1, -2)) * scale
        logits = torch.tanh(logits / softcap) * softcap
        logits = logits + bias.float().repeat_interleave(group if bias.shape[1] > 1 else 1, 1)
        out = torch.softmax(logits, -1).nan_to_num(0.0) @ v.float().repeat_interleave(group, 1)
        return out.to(q.dtype)
    if bias.shape[1] == 1:  # the same bias for every head: GQA-native SDPA, no copies
        if group > 1 and queries > 1:
            # With a mask, SDPA's fused CUDA kernels do not take enable_gqa: it would fall back to
            # the math kernel, whose [B, Hq, Tq, L] scores do not fit at 32k tokens. Repeating
            # the KV heads costs little next to a prefill's attention.
            k, v, group = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=group > 1)
        return torch.where(visible, out, 0.0)
    # Per-KV-head bias: fold each group's query heads into the query axis of its KV head.
    grouped = q.reshape(batch, kv_heads, group * queries, dim)
    if queries > 1:
        bias = bias[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, kv_heads, group * queries, -1)
        visible = visible[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, kv_heads, group * queries, 1)
    out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=bias, scale=scale)
    out = torch.where(visible, out, 0.0)
    return out.reshape(batch, q_heads, queries, v.shape[3])


def observation_scores(q: Tensor, k: Tensor, bias: Tensor, scale: float, window: int) -> Tensor:
    """Attention probabilities of the last `window` queries, summed over them and over each KV
    head's query heads: [B, Hkv, L] float32 (what SnapKV-style policies rank tokens by)."""
    batch, q_heads, queries, _ = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    w = min(window, queries)
    qw = q[:, :, -w:].float().reshape(batch, kv_heads, group, w, -1)
    logits = torch.einsum("bhgqd,bhld->bhgql", qw, k.float()) * scale
    logits = logits + bias[:, :, None, -w:].float()
    probs = torch.softmax(logits, -1).nan_to_num(0.0)
    return probs.sum(dim=(2, 3))


def stock_cache_inputs(attention_mask: Optional[Tensor], position_ids: Optional[Tensor], batch: int,
                       slots: int, device) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(sizes [B, 1, slots], lengths [B]) for a stock transformers cache, whose slots hold the last
    tokens seen, in order. A static cache also holds slots it has not written yet, so the tokens
    seen are counted: the padding mask's length, or without a mask the last position + 1 (no
    padding: positions count tokens). Sliding-window layers keep fewer slots than tokens seen."""
    if attention_mask is not None:
        seen = min(attention_mask.shape[1], slots)
        sizes = torch.zeros(batch, 1, slots, device=device)
        sizes[:, 0, :seen] = attention_mask[:, -seen:].to(device).float()
        return sizes, torch.full((batch,), seen, device=device)
    if position_ids is not None and position_ids.dim() == 2:  # (not multimodal 3D positions)
        return None, (position_ids[:, -1].to(device) + 1).clamp(max=slots).expand(batch)
    return None, None  # every slot holds a token


def centroidkv_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                         attention_mask: Optional[Tensor], scaling: Optional[float] = None,
                         dropout: float = 0.0, sliding_window: Optional[int] = None,
                         softcap: Optional[float] = None, **kwargs) -> tuple[Tensor, None]:
    """transformers attention interface: query [B, Hq, Tq, D], key/value [B, Hkv, L, D] as the
    cache returned them; returns ([B, Tq, Hq, Dv], None)."""
    if dropout and module.training:
        raise NotImplementedError("centroidkv attention is for inference; dropout is not supported")
    if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2):
        raise ValueError("centroidkv attention expects a 2D padding mask [batch, tokens] or None, got "
                         f"{getattr(attention_mask, 'shape', type(attention_mask))}")
    batch, _, queries, dim = query.shape
    scale = float(scaling) if scaling is not None else dim ** -0.5
    layer = active_layer(key)
    # Leading padding of each row's new tokens (None: not a leading run, or a masked decode step,
    # which needs none and must not read the mask back).
    padding = new_token_padding(attention_mask, queries, batch) if queries > 1 or attention_mask is None else None
    if layer is not None:
        if sliding_window is not None:
            layer.mark_sliding(sliding_window)
        if attention_mask is not None:
            layer.mark_padding(attention_mask[:, -queries:], None if queries == 1 else padding != [0] * batch)
        sizes, lengths, heads_alike = layer.attention_inputs()
    else:  # no CentroidKVCache (a stock cache or none): every key is an original token
        sizes, lengths = stock_cache_inputs(attention_mask, kwargs.get("position_ids"), batch, key.shape[2],
                                            key.device)
        heads_alike = True

    use_op = (sliding_window is None and softcap is None and queries <= OP_MAX_QUERIES
              and sizes is not None and backend.attention_op_available(query.device))
    bias = out = None
    if use_op:
        op_sizes = sizes.expand(batch, key.shape[1], -1) if sizes.shape[1] != key.shape[1] else sizes
        out = torch.ops.centroidkv.attention(query, key, value, op_sizes, scale, lengths)
    elif sliding_window is None and softcap is None and padding is not None:
        # A CentroidKVLayer dropped earlier padding, so its unclustered slots all have size 1.
        all_ones = sizes is None or (layer is not None and heads_alike)
        out = prefill_attention(query, key, value, scale, sizes, lengths, all_ones, padding)
    if out is None:
        bias_sizes = sizes[:, :1] if (sizes is not None and heads_alike) else sizes
        bias = build_bias(bias_sizes, lengths, batch, queries, key.shape[2], sliding_window,
                          query.device, query.dtype)
        out = attend_torch(query, key, value, bias, scale, softcap)

    if layer is not None:
        policy = layer.options.policy
        # A window policy (SnapKV-style) ranks tokens by what the prompt's last queries attend
        # to, so it observes prefill calls only: a decode step then costs no extra pass over the
        # cache. Accumulating policies (H2O-style) pay that pass on every call, by design.
        window = policy.score_window if (queries > 1 or policy.accumulate_scores) else 0
        if window > 0 and layer.scores is not None and not layer.is_sliding:
            if bias is None or bias.shape[1] == 1 and key.shape[1] > 1:
                # Rows of the last `window` queries only (the causal rule is relative to the
                # end): a long prefill never materialises a [queries, keys] bias for scoring.
                bias = build_bias(sizes, lengths, batch, min(window, queries), key.shape[2],
                                  sliding_window, query.device, torch.float32)
            layer.observe(observation_scores(query, key, bias.expand(-1, key.shape[1], -1, -1), scale, window))
        layer.settle()
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Makes attn_implementation="centroidkv" available to every transformers model."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, centroidkv_attention)
    AttentionMaskInterface.register(NAME, padding_mask_passthrough)
