"""CMakeLists.txt builds the kernels into a plain shared library for LibTorch users: a fresh
process loads it with torch.ops.load_library and gets the reference's results, and the C++
example links it and runs."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from centroidkv import _libstdcxx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
CMAKE = shutil.which("cmake", path=os.path.dirname(sys.executable)) or shutil.which("cmake")


@pytest.fixture(scope="module")
def cmake_build(tmp_path_factory):
    if CMAKE is None:
        pytest.skip("cmake is not installed")
    build = tmp_path_factory.mktemp("cmake_build")
    prefix = torch.utils.cmake_prefix_path
    subprocess.run([CMAKE, "-S", ROOT, "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}",
                    "-DCMAKE_BUILD_TYPE=Release", f"-DPython3_EXECUTABLE={sys.executable}", "-G", "Ninja"],
                   check=True, capture_output=True, text=True)
    result = subprocess.run([CMAKE, "--build", str(build), "-j", "2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return build


def test_library_loads_and_matches_reference(cmake_build):
    library = str(cmake_build / "libcentroidkv_ops.so")
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "_subprocess_check.py"), library,
         os.path.join(ROOT, "python", "centroidkv", "reference.py")],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "library ok" in result.stdout


def test_library_links_the_shared_libstdcxx(cmake_build):
    needed, _ = _libstdcxx.read_elf(str(cmake_build / "libcentroidkv_ops.so"))
    assert "libstdc++.so.6" in needed


def test_cpp_example_runs(cmake_build):
    result = subprocess.run([str(cmake_build / "merge_example"), "1000", "32", "16"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # 31 full chunks keep 16 each, the 8-token tail passes through.
    assert "tokens 1000 -> 504;" in result.stdout
    errors = [float(x.split(";")[0]) for x in result.stdout.split("error ")[1:]]
    assert len(errors) == 2 and max(errors) < 1e-3, result.stdout
