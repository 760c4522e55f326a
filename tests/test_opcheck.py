"""torch.library.opcheck on match and merge (and merge's internal unchecked variant): schema, fake kernels, autograd registration and
AOT dispatch agree with the real kernels on several samples."""
import pytest
import torch

import centroidkv  # noqa: F401  (registers torch.ops.centroidkv)

from clustering_helpers import DEVICES


def randn(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, device=device).to(dtype)


def match_samples(device):
    return [
        (randn(1, 2, 64, 16, device=device), 8, 4),
        (randn(2, 1, 37, 32, dtype=torch.float16, device=device), 4, 1),
        (randn(1, 3, 100, 24, dtype=torch.bfloat16, device=device), 32, 0),
        (randn(1, 1, 5, 8, device=device), 8, 4),  # shorter than a chunk
    ]


def merge_samples(device):
    sizes = torch.rand(2, 2, 70, device=device) + 0.5
    return [
        (randn(2, 2, 70, 16, device=device), randn(2, 2, 70, 24, device=device), None, 8, 4, None),
        (randn(2, 2, 70, 16, device=device), randn(2, 2, 70, 16, device=device), sizes, 16, 5, None),
        (randn(1, 2, 70, 32, dtype=torch.bfloat16, device=device),
         randn(1, 2, 70, 32, dtype=torch.bfloat16, device=device), sizes[:1], 32, 16,
         randn(1, 2, 70, 8, device=device)),  # fp32 metric for bf16 keys
        (randn(1, 1, 33, 64, dtype=torch.float16, device=device),
         randn(1, 1, 33, 64, dtype=torch.float16, device=device), None, 2, 1,
         randn(1, 1, 33, 12, dtype=torch.float16, device=device)),
    ]


@pytest.mark.parametrize("sample", range(4))
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_match(device, sample):
    torch.library.opcheck(torch.ops.centroidkv.match.default, match_samples(device)[sample])


@pytest.mark.parametrize("op", ["merge", "_merge_unchecked"])
@pytest.mark.parametrize("sample", range(4))
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_merge(device, sample, op):
    torch.library.opcheck(getattr(torch.ops.centroidkv, op).default, merge_samples(device)[sample])


@pytest.mark.parametrize("sample", range(4))
@pytest.mark.parametrize("device", DEVICES)
def test_unchecked_merge_equals_merge(device, sample):
    # The internal variant (sizes the library produced itself) differs only in not reading the
    # sizes back to check them.
    args = merge_samples(device)[sample]
    for got, want in zip(torch.ops.centroidkv._merge_unchecked(*args), torch.ops.centroidkv.merge(*args)):
        assert torch.equal(got, want)
