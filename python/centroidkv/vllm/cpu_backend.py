"""The worker side on the CPU: vLLM's CPU attention backend, with clustering when the engine's
`additional_config` asks for it (options.py) and unchanged otherwise.

Per step, the metadata builder derives from each request's token counts (plan.py) which logical
blocks are live and which groups this step makes old enough to cluster. Each layer then writes
its new tokens (size 1), runs attention over the live blocks with log(size) added to the logits,
and clusters those groups in its own cache: per KV head, so tensor-parallel ranks need no
communication. The scheduler frees the dead blocks once the step is processed (spec.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from vllm.config import get_current_vllm_config, get_current_vllm_config_or_none
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadataBuilder)
from vllm.v1.kv_cache_interface import FullAttentionSpec

from .options import requested
from .paged import attend, attend_decodes, attend_fresh, cluster_groups, write_tokens
from .plan import MergePlan
from .spec import CentroidKVSpec
from .step import StepPlan


class CentroidKVCPUBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"  # it stands in for the CPU backend

    # The config of the engine whose layers this process built last: vLLM asks customize_spec
    # for the KV spec outside its config context, after the layers were made within it.
    model_config = None

    @classmethod
    def customize_spec(cls, spec):
        spec = super().customize_spec(spec)
        config = get_current_vllm_config_or_none() or cls.model_config
        options = requested(config)
        if options is None:
            return spec
        if type(spec) is not FullAttentionSpec or spec.sliding_window is not None:
            raise ValueError(f"centroidkv.vllm clusters full-attention layers only; this model has a "
                             f"{type(spec).__name__} layer (sliding-window and other layer kinds are not "
                             "supported yet)")
        spec = CentroidKVSpec.from_spec(spec, options)
        spec.plan  # validates the options against the block size now, at engine start
        return spec

    @staticmethod
    def get_impl_cls():
        return CentroidKVCPUImpl

    @staticmethod
    def get_builder_cls():
        return CentroidKVCPUMetadataBuilder


class CentroidKVCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.plan: Optional[MergePlan] = kv_cache_spec.plan if isinstance(kv_cache_spec, CentroidKVSpec) else None

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        common = common_attn_metadata
        metadata.centroidkv = None if self.plan is None else StepPlan.build(
            self.plan, common.seq_lens[:common.num_reqs].tolist(),
            common.query_start_loc_cpu[:common.num_reqs + 1].tolist(), common.block_table_tensor)
        return metadata


class CentroidKVCPUImpl(CPUAttentionBackendImpl):
    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 sinks=None):
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        config = get_current_vllm_config()
        CentroidKVCPUBackend.model_config = config
        self.enabled = requested(config) is not None
        if self.enabled:
            unsupported = [name for name, used in (
                ("ALiBi", alibi_slopes is not None), ("logit soft-capping", bool(logits_soft_cap)),
                ("attention sinks", sinks is not None), ("a sliding window", sliding_window is not None),
                ("a non-decoder attention type", attn_type != AttentionType.DECODER),
                ("a quantized KV cache", self.is_fp8_kv_cache),
                ("KV sharing across layers", kv_sharing_target_layer_name is not None)) if used]
            if unsupported:
                raise ValueError("centroidkv.vllm does not support attention layers with " + ", ".join(unsupported))
        self._sizes: Optional[torch.Tensor] = None

    def _caches(self, kv_cache: torch.Tensor):
        """Key and value views [blocks, H, bs, D] of vLLM's CPU cache, and this layer's sizes."""
        num_blocks, heads, block_size, _ = kv_cache.shape
        key_cache, value_cache = kv_cache.view(num_blocks, heads, 2 * block_size, -1).chunk(2, dim=2)
        if self._sizes is None or self._sizes.shape != (num_blocks, heads, block_size):
            self._sizes = torch.zeros(num_blocks, heads, block_size, dtype=torch.float32, device=kv_cache.device)
        return key_cache, value_cache, self._sizes

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        if not self.enabled:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        n = slot_mapping.shape[0]
        write_tokens(*self._caches(kv_cache), key[:n], value[:n], slot_mapping)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        step = getattr(attn_metadata, "centroidkv", None)
        if not self.enabled or step is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("centroidkv.vllm: fused output quantization is not supported")
        key_cache, value_cache, sizes = self._caches(kv_cache)
        if step.decode_tokens.numel():
            out = attend_decodes(query[step.decode_tokens], key_cache, value_cache, sizes, step.decode_blocks,
                                 step.decode_lengths, self.scale)
            output[step.decode_tokens] = out.reshape(output[step.decode_tokens].shape).to(output.dtype)
        for first, end in step.fresh:
            out = attend_fresh(query[first:end], key[first:end], value[first:end], self.scale)
            output[first:end] = out.reshape(output[first:end].shape).to(output.dtype)
        for first, end, live, live_tokens in step.prefills:
            out = attend(query[first:end], key_cache, value_cache, sizes, live, live_tokens, self.scale)
            output[first:end] = out.reshape(output[first:end].shape).to(output.dtype)
        cluster_groups(key_cache, value_cache, sizes, step.groups, step.plan)
        return output
