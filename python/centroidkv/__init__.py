"""CentroidKV: online KV-cache clustering with size-weighted centroids.

    import centroidkv
    keys, values, sizes = centroidkv.compress(keys, values, ratio=0.75)

The ops live in torch.ops.centroidkv (usable from TorchScript, torch.compile and C++);
this package loads them and adds typed wrappers, fake kernels and a pure-PyTorch reference.
"""
from ._loader import build_extension, load_ops

LOADED_FROM = load_ops()

from . import reference  # noqa: E402
from .compress import compress, merge_passes  # noqa: E402
from .ops import attention, match, merge  # noqa: E402

__all__ = ["attention", "build_extension", "compress", "match", "merge", "merge_passes", "reference"]
__version__ = "0.1.0"
