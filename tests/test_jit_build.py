"""The opt-in on-the-fly build: a source checkout that was never installed compiles the kernels
with torch.utils.cpp_extension.load when CENTROIDKV_JIT_BUILD=1."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = """
import torch, centroidkv
from centroidkv import reference
assert centroidkv.LOADED_FROM == "jit", centroidkv.LOADED_FROM
keys, values = torch.randn(1, 2, 77, 32), torch.randn(1, 2, 77, 32)
for got, want in zip(centroidkv.merge(keys, values, chunk_size=8, num_merge=3),
                     reference.merge(keys, values, None, 8, 3)):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
print("jit ok")
"""


def test_jit_build_from_source_checkout(tmp_path):
    env = dict(os.environ, CENTROIDKV_JIT_BUILD="1", TORCH_EXTENSIONS_DIR=str(tmp_path),
               PYTHONPATH=os.path.join(ROOT, "python"), MAX_JOBS="2")
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, cwd=str(tmp_path),
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "jit ok" in result.stdout
    # The kernels came from the on-the-fly build, not from an installed package.
    assert any(name.startswith("centroidkv_jit") for name in os.listdir(tmp_path))
