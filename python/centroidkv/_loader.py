"""Loads the compiled ops into torch.ops.centroidkv.

Installed packages carry centroidkv._C. From a source checkout that was never installed, set
CENTROIDKV_JIT_BUILD=1 to compile the same sources on the fly with
torch.utils.cpp_extension.load; the result is cached under torch's extensions folder.
"""
from __future__ import annotations

import glob
import importlib
import os

import torch

SOURCE_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _source_files(with_cuda: bool) -> list[str]:
    csrc = os.path.join(SOURCE_ROOT, "csrc")
    files = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    files = [f for f in files if not f.endswith("python_module.cpp")]
    if with_cuda:
        files += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    return files


def build_extension(verbose: bool = False, with_cuda: bool | None = None) -> str:
    """Compiles the kernels from the source checkout and loads them; returns the library path."""
    from torch.utils import cpp_extension

    from . import _libstdcxx

    if with_cuda is None:
        with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    files = _source_files(with_cuda)
    if not files:
        raise RuntimeError(f"centroidkv: no C++ sources under {SOURCE_ROOT}/csrc to build from")
    name = "centroidkv_jit_cuda" if with_cuda else "centroidkv_jit"
    cpp_extension.load(
        name=name,
        sources=files,
        extra_include_paths=[os.path.join(SOURCE_ROOT, "csrc")],
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"] + _libstdcxx.link_args(),
        extra_cuda_cflags=["-O3", "--use_fast_math", "--expt-relaxed-constexpr"],
        is_python_module=False,
        verbose=verbose,
    )
    library = os.path.join(cpp_extension._get_build_directory(name, verbose), f"{name}.so")
    _libstdcxx.check_extension(library)  # after loading: a bad link is an error, not a later crash
    return library


def load_ops() -> str:
    """Makes torch.ops.centroidkv available; returns how ("installed" or "jit")."""
    if os.environ.get("CENTROIDKV_JIT_BUILD") == "1":
        build_extension()
        return "jit"
    try:
        importlib.import_module("centroidkv._C")
        return "installed"
    except ImportError as error:
        raise ImportError(
            "centroidkv's compiled kernels are missing. Install the package with "
            "`pip install --no-build-isolation .` from the source folder, or set "
            "CENTROIDKV_JIT_BUILD=1 to compile them on the fly."
        ) from error
