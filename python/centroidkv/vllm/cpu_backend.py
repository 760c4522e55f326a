"""vLLM's CPU attention backend with clustering (worker.py) when an engine asks for it."""
from __future__ import annotations

import torch
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadataBuilder)

from .worker import ClusteringBuilder, ClusteringImpl, clustered_spec


class CentroidKVCPUBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"  # it stands in for the CPU backend

    @classmethod
    def customize_spec(cls, spec):
        return clustered_spec(super().customize_spec(spec))

    @staticmethod
    def get_impl_cls():
        return CentroidKVCPUImpl

    @staticmethod
    def get_builder_cls():
        return CentroidKVCPUMetadataBuilder


class CentroidKVCPUMetadataBuilder(ClusteringBuilder, CPUAttentionMetadataBuilder):
    pass


class CentroidKVCPUImpl(ClusteringImpl, CPUAttentionBackendImpl):
    def split_cache(self, kv_cache: torch.Tensor):
        # [blocks, H, block_size, 2 * D] seen as [blocks, H, 2 * block_size, D]: keys first.
        num_blocks, heads, block_size, _ = kv_cache.shape
        key_cache, value_cache = kv_cache.view(num_blocks, heads, 2 * block_size, -1).chunk(2, dim=2)
        return key_cache, value_cache
