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
    if scale is None:  # with D = 0 every logit is 0 whatever the scale
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    return torch.ops.centroidkv.attention(q, k, v, sizes, float(scale), lengths)


def merged_length(length, chunk_size: int, num_merge: int):
    """Slots one merge pass leaves of `length` tokens (SPEC.md); also for symbolic lengths."""
    return (length // chunk_size) * (chunk_size - num_merge) + length % chunk_size


# The fake kernels repeat the C++ argument checks (csrc/checks.cpp) on metadata only: they run
# when torch.compile traces, and for real calls in which any input is a meta tensor (meta wins
# dispatch, so a CPU call with one meta argument lands here, not in the CPU kernel). Their
# messages are the kernels' word for word (C++ spells shapes [2, 3] and dtypes Float), so one
# table of expected messages tests every backend.
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(n) for n in t.shape) + "]"


_C10_DTYPE_NAMES = {torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16",
                    torch.float64: "Double", torch.int64: "Long", torch.int32: "Int",
                    torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool"}


def _dtype(dtype: torch.dtype) -> str:
    """c10's name of a dtype (torch.float32 -> Float), as the C++ checks print it."""
    return _C10_DTYPE_NAMES.get(dtype, str(dtype))


def _check_chunking(chunk_size: int, num_merge: int) -> None:
    torch._check(chunk_size >= 2 and chunk_size % 2 == 0,
                 lambda: f"centroidkv: chunk_size must be an even number >= 2, got {chunk_size}")
    torch._check(0 <= num_merge <= chunk_size // 2,
                 lambda: f"centroidkv: num_merge must be in [0, chunk_size / 2] = [0, {chunk_size // 2}], "
                         f"got {num_merge}")


def _check_rank(op: str, name: str, t: Tensor, layout: str) -> None:
    rank = layout.count(",") + 1
    torch._check(t.dim() == rank, lambda: f"{op}: {name} must have {rank} dimensions {layout}, got shape "
                                          f"{_shape(t)}")


def _check_float(op: str, name: str, t: Tensor) -> None:
    torch._check(t.dtype in _FLOATS,
                 lambda: f"{op}: {name} must be float32, float16 or bfloat16, got {_dtype(t.dtype)}")


def _check_device(op: str, name: str, t: Tensor, ref: Tensor, ref_name: str) -> None:
    torch._check(t.device == ref.device, lambda: f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_leading(op: str, name: str, t: Tensor, ref: Tensor, ref_name: str, dims: range,
                   layout: str = "[B, H, L]") -> None:
    """`t` and `ref` agree in `dims` of their leading [B, H, L]."""
    torch._check(all(t.shape[d] == ref.shape[d] for d in dims),
                 lambda: f"{op}: {name} shape {_shape(t)} does not match {ref_name} shape {_shape(ref)} "
                         f"in {layout}")


def _check_sizes(op: str, sizes: Optional[Tensor], ref: Tensor, ref_name: str) -> None:
    if sizes is None:
        return
    _check_rank(op, "sizes", sizes, "[B, H, L]")
    torch._check(sizes.dtype == torch.float32, lambda: f"{op}: sizes must be float32, got {_dtype(sizes.dtype)}")
    _check_device(op, "sizes", sizes, ref, ref_name)
    _check_leading(op, "sizes", sizes, ref, ref_name, range(3))


# Each fake kernel checks in the C++ order, so a call with several faults names the same one.
@torch.library.register_fake("centroidkv::match")
def _match_fake(metric, chunk_size, num_merge):
    _check_rank("centroidkv.match", "metric", metric, "[B, H, L, D]")
    _check_float("centroidkv.match", "metric", metric)
    _check_chunking(chunk_size, num_merge)
    return metric.new_empty(metric.shape[:3], dtype=torch.int64)


@torch.library.register_fake("centroidkv::merge")
def _merge_fake(keys, values, sizes, chunk_size, num_merge, metric=None):
    op = "centroidkv.merge"
    _check_rank(op, "keys", keys, "[B, H, L, Dk]")
    _check_rank(op, "values", values, "[B, H, L, Dv]")
    _check_float(op, "keys", keys)
    _check_float(op, "values", values)
    torch._check(values.dtype == keys.dtype,
                 lambda: f"{op}: values dtype {_dtype(values.dtype)} differs from keys dtype "
                         f"{_dtype(keys.dtype)}")
    _check_device(op, "values", values, keys, "keys")
    _check_leading(op, "values", values, keys, "keys", range(3))
    _check_sizes(op, sizes, keys, "keys")
    if metric is not None:
        _check_rank(op, "metric", metric, "[B, H, L, Dm]")
        _check_float(op, "metric", metric)
        _check_device(op, "metric", metric, keys, "keys")
        _check_leading(op, "metric", metric, keys, "keys", range(3))
    _check_chunking(chunk_size, num_merge)
    batch, heads, length = keys.shape[:3]
    out_len = merged_length(length, chunk_size, num_merge)
    return (
        keys.new_empty((batch, heads, out_len, keys.shape[3])),
        values.new_empty((batch, heads, out_len, values.shape[3])),
        keys.new_empty((batch, heads, out_len), dtype=torch.float32),
    )


# The internal variant for sizes the library produced itself has the same shapes and checks.
torch.library.register_fake("centroidkv::_merge_unchecked")(_merge_fake)


@torch.library.register_fake("centroidkv::attention")
def _attention_fake(q, k, v, sizes, scale, lengths=None):
    op = "centroidkv.attention"
    _check_rank(op, "q", q, "[B, Hq, Tq, D]")
    _check_rank(op, "k", k, "[B, Hkv, L, D]")
    _check_rank(op, "v", v, "[B, Hkv, L, Dv]")
    _check_float(op, "q", q)
    torch._check(k.dtype == q.dtype and v.dtype == q.dtype,
                 lambda: f"{op}: q, k and v must share a dtype, got {_dtype(q.dtype)}, {_dtype(k.dtype)}, "
                         f"{_dtype(v.dtype)}")
    _check_device(op, "k", k, q, "q")
    _check_device(op, "v", v, q, "q")
    torch._check(k.shape[0] == q.shape[0] and v.shape[0] == q.shape[0],
                 lambda: f"{op}: batch sizes differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    torch._check(k.shape[3] == q.shape[3],
                 lambda: f"{op}: k head dim {k.shape[3]} differs from q head dim {q.shape[3]}")
    _check_leading(op, "v", v, k, "k", range(1, 3), "[B, Hkv, L]")
    torch._check(k.shape[1] > 0, lambda: f"{op}: k must have at least one KV head, got shape {_shape(k)}")
    torch._check(q.shape[1] % k.shape[1] == 0,
                 lambda: f"{op}: query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")
    torch._check(math.isfinite(scale), lambda: f"{op}: scale must be a finite number, got {scale}")
    _check_sizes(op, sizes, k, "k")
    if lengths is not None:
        torch._check(lengths.dim() == 1 and lengths.shape[0] == q.shape[0],
                     lambda: f"{op}: lengths must have shape [B] = [{q.shape[0]}], got {_shape(lengths)}")
        torch._check(lengths.dtype in (torch.int64, torch.int32),
                     lambda: f"{op}: lengths must be int64 or int32, got {_dtype(lengths.dtype)}")
        _check_device(op, "lengths", lengths, q, "q")
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))
