"""The worker side, shared by the CPU and CUDA backends: mixins over a vLLM attention backend's
metadata builder and implementation that add clustering when the engine's `additional_config`
asks for it (options.py) and leave the backend unchanged otherwise.

Per step, the builder derives from each request's token counts which blocks its attention reads
and which groups the step makes old enough to cluster (step.py). Each layer then writes its new
tokens (size 1), attends over the live blocks with log(size) added to the logits (single-token
requests in one padded call; a request's first prompt with plain causal SDPA) and, after the
attention, clusters those groups in its own cache: per KV head, so tensor-parallel ranks need no
communication. The scheduler frees the dead blocks once the step is processed (spec.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from vllm.config import get_current_vllm_config, get_current_vllm_config_or_none
from vllm.utils.torch_utils import is_quantized_kv_cache
from vllm.v1.attention.backend import AttentionType
from vllm.v1.kv_cache_interface import FullAttentionSpec

from .options import requested
from .paged import attend, attend_decodes, attend_fresh, cluster_groups, write_tokens
from .spec import CentroidKVSpec
from .step import StepPlan

# The config of the engine whose layers this process built last: vLLM asks a backend for its KV
# spec outside its config context, after the layers were made within it.
_MODEL_CONFIG = None


def clustered_spec(spec):
    """customize_spec's work: the clustered spec when the engine asked for clustering."""
    options = requested(get_current_vllm_config_or_none() or _MODEL_CONFIG)
    if options is None:
        return spec
    if type(spec) is not FullAttentionSpec or spec.sliding_window is not None:
        raise ValueError(f"centroidkv.vllm clusters full-attention layers only; this model has a "
                         f"{type(spec).__name__} layer (sliding-window and other layer kinds are not "
                         "supported yet)")
    spec = CentroidKVSpec.from_spec(spec, options)
    spec.plan  # validates the options against the block size now, at engine start
    return spec


class ClusteringBuilder:
    """Mixin for an AttentionMetadataBuilder: attaches the step's StepPlan as
    `metadata.centroidkv` (None when the layer group is not clustered)."""

    # Block tables are swapped into copied metadata for other KV cache groups; the plan holds
    # block ids, so it must be built per group.
    supports_update_block_table: bool = False

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        spec, common = self.kv_cache_spec, common_attn_metadata
        metadata.centroidkv = None if not isinstance(spec, CentroidKVSpec) else StepPlan.build(
            spec.plan, common.seq_lens[:common.num_reqs].tolist(),
            common.query_start_loc_cpu[:common.num_reqs + 1].tolist(), common.block_table_tensor)
        return metadata


class ClusteringImpl:
    """Mixin for an AttentionImpl. Subclasses say where keys and values live in the backend's
    cache tensor (`split_cache`); the size of every slot lives beside it (`_sizes`)."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 sinks=None):
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        global _MODEL_CONFIG
        _MODEL_CONFIG = get_current_vllm_config()
        self.clusters = requested(_MODEL_CONFIG) is not None
        if self.clusters:
            unsupported = [name for name, used in (
                ("ALiBi", alibi_slopes is not None), ("logit soft-capping", bool(logits_soft_cap)),
                ("attention sinks", sinks is not None), ("a sliding window", sliding_window is not None),
                ("a non-decoder attention type", attn_type != AttentionType.DECODER),
                ("a quantized KV cache", is_quantized_kv_cache(kv_cache_dtype)),
                ("KV sharing across layers", kv_sharing_target_layer_name is not None)) if used]
            if unsupported:
                raise ValueError("centroidkv.vllm does not support attention layers with " + ", ".join(unsupported))
        self._sizes: Optional[torch.Tensor] = None

    def split_cache(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value views [blocks, H, block_size, D] of this backend's cache tensor."""
        raise NotImplementedError

    def _caches(self, kv_cache: torch.Tensor):
        key_cache, value_cache = self.split_cache(kv_cache)
        shape = key_cache.shape[:3]
        if self._sizes is None or self._sizes.shape != shape or self._sizes.device != kv_cache.device:
            self._sizes = torch.zeros(shape, dtype=torch.float32, device=kv_cache.device)
        return key_cache, value_cache, self._sizes

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        if not self.clusters:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        n = slot_mapping.shape[0]
        write_tokens(*self._caches(kv_cache), key[:n], value[:n], slot_mapping)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        step = getattr(attn_metadata, "centroidkv", None)
        if not self.clusters or step is None:  # stock, or a warm-up / profiling run
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("centroidkv.vllm: fused output quantization is not supported")
        key_cache, value_cache, sizes = self._caches(kv_cache)

        def store(rows, out):
            output[rows] = out.reshape(output[rows].shape).to(output.dtype)

        if step.decode_tokens.numel():
            store(step.decode_tokens, attend_decodes(query[step.decode_tokens], key_cache, value_cache, sizes,
                                                     step.decode_blocks, step.decode_lengths, self.scale))
        for first, end in step.fresh:
            store(slice(first, end), attend_fresh(query[first:end], key[first:end], value[first:end], self.scale))
        for first, end, live, live_tokens in step.prefills:
            store(slice(first, end), attend(query[first:end], key_cache, value_cache, sizes, live, live_tokens,
                                            self.scale))
        cluster_groups(key_cache, value_cache, sizes, step.groups, step.plan)
        return output
