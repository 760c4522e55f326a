"""The scheduler side: a full-attention KV spec that carries the merge plan's options, and its
block manager, which returns a clustered group's dead blocks to the pool."""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from .plan import MergePlan

@functools.lru_cache(maxsize=None)  # read by the metadata builder on every step
def _plan(block_size: int, ratio: float, chunk_size: int, sink: int, recent: int) -> MergePlan:
    return MergePlan.build(block_size=block_size, ratio=ratio, chunk_size=chunk_size, sink=sink, recent=recent)


_PLAN_FIELDS = ("centroidkv_ratio", "centroidkv_chunk_size", "centroidkv_sink", "centroidkv_recent")


@dataclass(frozen=True, kw_only=True)
class CentroidKVSpec(FullAttentionSpec):
    """Full attention whose old blocks are clustered (plan.py); same page layout and size."""

    centroidkv_ratio: float = 0.0
    centroidkv_chunk_size: int = 32
    centroidkv_sink: int = 4
    centroidkv_recent: int = 64

    @classmethod
    def from_spec(cls, spec: FullAttentionSpec, options: dict) -> "CentroidKVSpec":
        fields = {name: getattr(spec, name) for name in spec.__dataclass_fields__}
        return cls(**fields, centroidkv_ratio=options["ratio"], centroidkv_chunk_size=options["chunk_size"],
                   centroidkv_sink=options["sink"], centroidkv_recent=options["recent"])

    @property
    def plan(self) -> MergePlan:
        return _plan(self.block_size, self.centroidkv_ratio, self.centroidkv_chunk_size, self.centroidkv_sink,
                     self.centroidkv_recent)

    @classmethod
    def merge(cls, specs):
        merged = super().merge(specs)
        options = {name: getattr(specs[0], name) for name in _PLAN_FIELDS}
        if any({name: getattr(spec, name) for name in _PLAN_FIELDS} != options for spec in specs):
            raise ValueError("centroidkv.vllm: every layer of a KV cache group must share one merge plan")
        return replace(merged, **options)


class CentroidKVManager(FullAttentionManager):
    """Frees the dead blocks of every group the plan has clustered once the request's tokens
    up to that point are processed (the worker clustered them at the end of that step), and
    puts the null block in their place, as the sliding-window manager does for its window."""

    def __init__(self, kv_cache_spec: CentroidKVSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.plan = kv_cache_spec.plan
        self.freed_groups: dict[str, int] = {}  # request id -> groups whose dead blocks are freed

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens=None) -> None:
        if request_id not in self.req_to_blocks:
            return
        plan, done = self.plan, self.freed_groups.get(request_id, 0)
        target = plan.clustered_groups(processed_computed_tokens)
        for group in range(done, target):
            first = plan.first_block(group)
            self._remove_blocks_in_range(request_id, first + plan.kept_blocks, first + plan.group_blocks)
        self.freed_groups[request_id] = max(done, target)

    def pop_blocks_for_free(self, request_id: str):
        self.freed_groups.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)


def register_spec() -> None:
    """Registers the spec with its manager; the built-in specs first (the registry registers
    them only while it is empty)."""
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(CentroidKVSpec, CentroidKVManager, uniform_type_base_spec=FullAttentionSpec)
