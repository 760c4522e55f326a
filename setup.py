"""Builds centroidkv._C: the C++ kernels always, the CUDA kernels whenever a CUDA build of torch
and nvcc are present (a visible GPU is not needed to compile them).

Environment switches:
  CENTROIDKV_CUDA=0   build the CPU kernels only, even where CUDA could be built
  CENTROIDKV_CUDA=1   require the CUDA kernels (fail if they cannot be built)
  TORCH_CUDA_ARCH_LIST  GPU architectures to compile for (required where no GPU is visible)
"""
import glob
import importlib.util
import os
import shutil

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


# Shared by the Python extension and CMakeLists.txt (which globs the same folders).
CPU_SOURCES = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
CUDA_SOURCES = sources("csrc/cuda/*.cu")


def cuda_available_for_build():
    switch = os.environ.get("CENTROIDKV_CUDA", "auto")
    if switch == "0":
        return False
    found = torch_has_cuda() and cpp_extension.CUDA_HOME is not None and (
        shutil.which("nvcc") or os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    )
    if switch == "1" and not found:
        raise RuntimeError(
            "CENTROIDKV_CUDA=1 but CUDA kernels cannot be built: need a CUDA build of torch and "
            "nvcc (set CUDA_HOME)"
        )
    return bool(found) and bool(CUDA_SOURCES)


def torch_has_cuda():
    import torch

    return torch.version.cuda is not None


def load_libstdcxx_helper():
    """python/centroidkv/_libstdcxx.py, loaded by path (the package itself needs the kernels)."""
    path = os.path.join(ROOT, "python", "centroidkv", "_libstdcxx.py")
    spec = importlib.util.spec_from_file_location("centroidkv_libstdcxx", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LIBSTDCXX = load_libstdcxx_helper()
# libstdc++ from the shared library torch uses, whatever the toolchain links by default (see
# _libstdcxx.py: a static copy crashes error messages).
LINK_ARGS = ["-fopenmp"] + LIBSTDCXX.link_args()


class BuildExtension(cpp_extension.BuildExtension):
    """torch's build_ext, then a check that the result carries no copy of libstdc++'s streams."""

    def build_extension(self, ext):
        super().build_extension(ext)
        try:
            LIBSTDCXX.check_extension(self.get_ext_fullpath(ext.name))
        except LIBSTDCXX.LinkError as error:
            raise RuntimeError(f"centroidkv build: {error}") from None


def extension():
    cxx = ["-O3", "-fopenmp"]
    if os.environ.get("CENTROIDKV_DEBUG") == "1":
        cxx = ["-O0", "-g", "-fopenmp"]
    if cuda_available_for_build():
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        return cpp_extension.CUDAExtension(
            "centroidkv._C",
            CPU_SOURCES + CUDA_SOURCES,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=LINK_ARGS,
            py_limited_api=True,
        )
    return cpp_extension.CppExtension(
        "centroidkv._C",
        CPU_SOURCES,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=LINK_ARGS,
        py_limited_api=True,
    )


setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
