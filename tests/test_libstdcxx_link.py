"""The build links libstdc++ from the shared library torch uses, and refuses an extension that
carries its own copy of libstdc++'s stream code (such a copy garbled or crashed every error
message with a number in it)."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

import centroidkv
from centroidkv import _libstdcxx

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF and libstdc++ only")
COMPILER = shutil.which("g++") or shutil.which("c++")
SOURCE = '#include <sstream>\n#include <string>\nstd::string format(long n) { std::ostringstream s; s << n; return s.str(); }\n'


def build_library(tmp_path, name, flags):
    if COMPILER is None:
        pytest.skip("no C++ compiler")
    source = tmp_path / "format.cpp"
    source.write_text(SOURCE)
    library = tmp_path / name
    subprocess.run([COMPILER, "-shared", "-fPIC", str(source), "-o", str(library), *flags], check=True)
    return str(library)


def test_a_static_copy_is_refused_with_the_reason_and_the_fix(tmp_path):
    library = build_library(tmp_path, "static.so", ["-static-libstdc++"])
    with pytest.raises(_libstdcxx.LinkError) as error:
        _libstdcxx.check_extension(library)
    message = str(error.value)
    assert "carries its own copy of libstdc++'s stream/locale code" in message
    assert "libstdc++.so is not among its NEEDED libraries" in message
    assert "CENTROIDKV_LIBSTDCXX=" in message and "-static-libstdc++" in message
    # The command-line form (CMakeLists.txt's post-build step) fails the build the same way.
    result = subprocess.run([sys.executable, _libstdcxx.__file__, "check", library],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "carries its own copy" in result.stderr


def test_the_link_arguments_fix_a_static_toolchain(tmp_path):
    # -static-libstdc++ as a toolchain default: the shared library named first wins.
    library = build_library(tmp_path, "fixed.so", [*_libstdcxx.link_args(), "-static-libstdc++"])
    _libstdcxx.check_extension(library)
    needed, _ = _libstdcxx.read_elf(library)
    assert "libstdc++.so.6" in needed


def test_the_shared_library_is_the_one_this_process_uses():
    path = _libstdcxx.shared_libstdcxx()
    with open("/proc/self/maps") as maps:
        assert path in maps.read()


def test_override_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv(_libstdcxx.OVERRIDE, str(tmp_path / "missing.so"))
    with pytest.raises(_libstdcxx.LinkError, match="CENTROIDKV_LIBSTDCXX=.*missing.so: no such file"):
        _libstdcxx.link_args()


def test_the_installed_kernels_link_libstdcxx_dynamically():
    library = glob.glob(os.path.join(os.path.dirname(centroidkv.__file__), "_C*.so"))
    if not library:
        pytest.skip("kernels not built in the package folder")
    _libstdcxx.check_extension(library[0])
    assert "libstdc++.so.6" in _libstdcxx.read_elf(library[0])[0]
