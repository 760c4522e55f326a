"""vLLM's FlashAttention backend with clustering (worker.py) when an engine asks for it: the GPU
path. Written, not yet run on a GPU (README, Known issues): attention over clustered blocks uses
centroidkv's own kernels on gathered live blocks, so vLLM must not capture it in a full CUDA
graph; its piecewise graphs run attention eagerly.
"""
from __future__ import annotations

import torch
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.flash_attn import (FlashAttentionBackend, FlashAttentionImpl,
                                                   FlashAttentionMetadataBuilder)

from .spec import CentroidKVSpec
from .worker import ClusteringBuilder, ClusteringImpl, clustered_spec


class CentroidKVFlashBackend(FlashAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "FLASH_ATTN"  # it stands in for FlashAttention

    @classmethod
    def customize_spec(cls, spec):
        return clustered_spec(super().customize_spec(spec))

    @staticmethod
    def get_impl_cls():
        return CentroidKVFlashImpl

    @staticmethod
    def get_builder_cls():
        return CentroidKVFlashMetadataBuilder


class CentroidKVFlashMetadataBuilder(ClusteringBuilder, FlashAttentionMetadataBuilder):
    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        if isinstance(kv_cache_spec, CentroidKVSpec):
            return AttentionCGSupport.NEVER  # host-side plans and gathers of varying size
        return super().get_cudagraph_support(vllm_config, kv_cache_spec)


class CentroidKVFlashImpl(ClusteringImpl, FlashAttentionImpl):
    def split_cache(self, kv_cache: torch.Tensor):
        # [blocks, H, block_size, 2 * D]: keys in the first half of the last dimension.
        return kv_cache.split(self.head_size, dim=-1)
