"""The switch: `additional_config={"centroidkv": {...}}` on the engine, read where vLLM hands
its config over; and the refusals of what the plugin does not support yet."""
from __future__ import annotations

from typing import Any, Optional

from .plan import MergePlan

KEY = "centroidkv"
# Options a user may set, with their defaults (MergePlan.build's arguments but the block size).
DEFAULTS = {"ratio": 0.75, "chunk_size": 32, "sink": 4, "recent": 64}


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
    if requested(vllm_config) is None:
        return
    cache = vllm_config.cache_config
    problems = []
    if not platform.is_cpu():
        problems.append(f"the {type(platform).__name__} platform (this release clusters in vLLM's CPU attention "
                        "backend only; the GPU path is not built yet)")
    if cache.enable_prefix_caching:
        problems.append("prefix caching (clustered blocks no longer hold the tokens their hashes name): "
                        "pass enable_prefix_caching=False (vllm serve: --no-enable-prefix-caching)")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding")
    if vllm_config.kv_transfer_config is not None or getattr(cache, "kv_offloading_size", None):
        problems.append("KV transfer and offload connectors")
    if problems:
        raise ValueError("centroidkv.vllm does not support " + "; ".join(problems))
    MergePlan.build(block_size=cache.block_size, **requested(vllm_config))  # the options themselves
