"""Chooses between the compiled ops and the pure-PyTorch reference, per device.

The transformers integration always calls torch.ops.centroidkv.*; only when the op has no kernel
registered for a tensor's device (for example a build without CUDA kernels) does it fall back to
centroidkv.reference, which computes the same thing more slowly. Keeping the choice here means
the fallback is one explicit place, not a pattern scattered through the cache code.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops, reference


_HAS_KERNEL: dict[tuple[str, str], bool] = {}


def has_kernel(op_name: str, device_type: str) -> bool:
    """Whether torch.ops.centroidkv.<op_name> has a kernel for the device type ("cpu", "cuda")."""
    if torch.compiler.is_compiling():  # a constant at trace time, no guard (a dict would guard on its keys)
        return _dispatcher_has_kernel(op_name, device_type)
    known = _HAS_KERNEL.get((op_name, device_type))
    if known is None:
        known = _HAS_KERNEL[(op_name, device_type)] = _dispatcher_has_kernel(op_name, device_type)
    return known


@torch.compiler.assume_constant_result  # a compiled graph asks the dispatcher once, at trace time
def _dispatcher_has_kernel(op_name: str, device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"centroidkv::{op_name}", key)


def merge(keys: Tensor, values: Tensor, sizes: Optional[Tensor], chunk_size: int, num_merge: int,
          metric: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """One clustering pass (SPEC.md) through the op, or the reference where the op is missing.

    For the library's own callers, whose sizes are a cache's buffers or a previous pass's output:
    the op variant that does not read the sizes back to check them (on CUDA that read is a device
    sync, once per pass, in the middle of a prefill)."""
    if has_kernel("_merge_unchecked", keys.device.type):
        return torch.ops.centroidkv._merge_unchecked(keys, values, sizes, chunk_size, num_merge, metric)
    return reference.merge(keys, values, sizes, chunk_size, num_merge, metric)


def match(metric: Tensor, chunk_size: int, num_merge: int) -> Tensor:
    """Merge map of one pass through the op, or the reference where the op is missing."""
    if has_kernel("match", metric.device.type):
        return ops.match(metric, chunk_size, num_merge)
    return reference.match(metric, chunk_size, num_merge)


def attention_op_available(device: torch.device) -> bool:
    return has_kernel("attention", device.type)
