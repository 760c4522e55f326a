"""The switch: `additional_config={"centroidkv": {...}}` on the engine, read where vLLM hands
its config over; and the refusals of what the plugin does not support yet."""
from __future__ import annotations

from typing import Any, Optional

from .plan import MergePlan

KEY = "centroidkv"
# The merge plan's options (MergePlan.build's arguments but the block size), with defaults.
PLAN_DEFAULTS = {"ratio": 0.75, "chunk_size": 32, "sink": 4, "recent": 64}
# Everything a user may set. experimental_gpu: run the GPU path (cuda_backend.py), which has not
# been run on a GPU yet; without it a CUDA engine that asks for clustering is refused.
DEFAULTS = {**PLAN_DEFAULTS, "experimental_gpu": False}


def plan_options(options: dict) -> dict:
    return {name: options[name] for name in PLAN_DEFAULTS}


def requested(vllm_config: Any) -> Optional[dict]:
    """The centroidkv options of this engine (defaults filled in), or None when it is off."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    if KEY not in extra:
        return None
    given = extra[KEY]
    if given is None or given is True:
        given = {}
    if not isinstance(given, dict):
        raise ValueError(f"centroidkv.vllm: additional_config['{KEY}'] must be a dict of options "
                         f"{sorted(DEFAULTS)}, got {given!r}")
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"centroidkv.vllm: unknown option(s) {unknown} in additional_config['{KEY}']; "
                         f"known: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **given}


def refuse_unsupported(vllm_config: Any, platform: Any) -> None:
    """Raises at engine start (when vLLM checks its config) for what the clustered cache cannot
    serve yet; does nothing for an engine that did not ask for clustering."""
    options = requested(vllm_config)
    if options is None:
        return
    cache = vllm_config.cache_config
    problems = []
    if platform.is_cuda():
        backend = vllm_config.attention_config.backend
        if not options["experimental_gpu"]:
            problems.append("CUDA yet: its path (FlashAttention backend) has not been run on a GPU; "
                            "add \"experimental_gpu\": true to the centroidkv options to try it")
        elif backend is not None and backend.name != "FLASH_ATTN":
            problems.append(f"the {backend.name} attention backend (it clusters in FLASH_ATTN only)")
    elif not platform.is_cpu():
        problems.append(f"the {type(platform).__name__} platform (vLLM's CPU and CUDA backends only)")
    if cache.enable_prefix_caching:
        problems.append("prefix caching (clustered blocks no longer hold the tokens their hashes name): "
                        "pass enable_prefix_caching=False (vllm serve: --no-enable-prefix-caching)")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding")
    if vllm_config.kv_transfer_config is not None or getattr(cache, "kv_offloading_size", None):
        problems.append("KV transfer and offload connectors")
    if problems:
        raise ValueError("centroidkv.vllm does not support " + "; ".join(problems))
    MergePlan.build(block_size=cache.block_size, **plan_options(options))  # the options themselves
    if platform.is_cuda():
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        vllm_config.attention_config.backend = AttentionBackendEnum.FLASH_ATTN  # the one that clusters
