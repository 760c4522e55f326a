"""CentroidKV inside vLLM: full KV blocks are clustered online and the freed blocks go back to
vLLM's block pool, so more requests fit. A vLLM plugin, no fork:

    pip install "centroidkv[vllm]"
    LLM(model, enable_prefix_caching=False,
        additional_config={"centroidkv": {"ratio": 0.75}})      # options: options.DEFAULTS

With the package installed, vLLM loads `register` in every process (entry point
`vllm.general_plugins`); without the `centroidkv` key an engine runs exactly as stock vLLM.
plan.py says which blocks are clustered and when (scheduler and workers derive it from token
counts alike), step.py and paged.py do the tensor work, spec.py frees blocks on the scheduler
side, worker.py clusters them inside an attention backend: cpu_backend.py (tested) and
cuda_backend.py (FlashAttention; written, not yet run on a GPU).
"""
from __future__ import annotations

_REGISTERED = False


def register() -> None:
    """vLLM's plugin hook: puts CentroidKV's backends in place of vLLM's CPU and FlashAttention
    backends, registers the clustered KV spec with its block manager, and adds the plugin's
    refusals to vLLM's config check. Safe to call more than once."""
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from .spec import register_spec

    register_spec()
    # Both stand in for vLLM's own backend and behave as it unless an engine asks for clustering.
    register_backend(AttentionBackendEnum.CPU_ATTN, "centroidkv.vllm.cpu_backend.CentroidKVCPUBackend")
    register_backend(AttentionBackendEnum.FLASH_ATTN, "centroidkv.vllm.cuda_backend.CentroidKVFlashBackend")
    _check_configs()
    _REGISTERED = True


def _check_configs() -> None:
    """Adds options.refuse_unsupported to the platform's config check, which vLLM runs on every
    engine config it builds: unsupported engines fail at once, before a model is loaded."""
    from vllm.platforms import current_platform

    from .options import refuse_unsupported

    platform = type(current_platform)
    original = platform.check_and_update_config  # bound to the platform class
    if getattr(original, "centroidkv_checked", False):
        return

    def check_and_update_config(cls, vllm_config):
        original(vllm_config)
        refuse_unsupported(vllm_config, current_platform)

    check_and_update_config.centroidkv_checked = True
    platform.check_and_update_config = classmethod(check_and_update_config)
