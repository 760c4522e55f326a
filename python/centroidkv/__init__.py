"""CentroidKV: online KV-cache clustering with size-weighted centroids.

    import centroidkv
    keys, values, sizes = centroidkv.compress(keys, values, ratio=0.75)

The ops live in torch.ops.centroidkv (usable from TorchScript, torch.compile and C++);
this package loads them and adds typed wrappers, fake kernels and a pure-PyTorch reference.
"""
import importlib.util

from ._loader import build_extension, load_ops

LOADED_FROM = load_ops()

from . import reference  # noqa: E402
from .compress import compress, merge_passes  # noqa: E402
from .ops import attention, match, merge  # noqa: E402

__all__ = ["attention", "build_extension", "compress", "match", "merge", "merge_passes", "reference"]

# The transformers integration (optional dependency `centroidkv[hf]`): CentroidKVCache, the
# policies, and attn_implementation="centroidkv", registered here so that loading a model works
# right after `import centroidkv`.
if importlib.util.find_spec("transformers") is not None:
    from . import hf_attention, policies  # noqa: E402
    from .cache import CentroidKVCache  # noqa: E402
    from .policies import AbsorbIntoSurvivors, PlainClustering, Policy, ProtectedClustering  # noqa: E402
    from .prefill import prefill  # noqa: E402

    hf_attention.register()
    __all__ += ["AbsorbIntoSurvivors", "CentroidKVCache", "PlainClustering", "Policy", "ProtectedClustering",
                "policies", "prefill"]
__version__ = "0.1.0"
