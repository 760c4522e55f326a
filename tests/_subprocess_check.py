"""Run in a fresh interpreter by test_libtorch.py: loads a CentroidKV library built outside the
Python package, and checks merge and match against the pure-PyTorch reference.

Usage: python _subprocess_check.py LIBRARY_PATH REFERENCE_PY
"""
import importlib.util
import sys

import torch

library, reference_file = sys.argv[1], sys.argv[2]
torch.ops.load_library(library)
spec = importlib.util.spec_from_file_location("reference", reference_file)
reference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reference)

torch.manual_seed(1)
keys, values = torch.randn(2, 3, 203, 64), torch.randn(2, 3, 203, 32)
sizes = torch.rand(2, 3, 203) + 0.25
got = torch.ops.centroidkv.merge(keys, values, sizes, 32, 16, None)
want = reference.merge(keys, values, sizes, 32, 16)
for g, w in zip(got, want):
    torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
assert torch.equal(torch.ops.centroidkv.match(keys, 32, 16), reference.match(keys, 32, 16))
print("library ok")
