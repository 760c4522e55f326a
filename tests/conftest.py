import pytest
import torch

import centroidkv  # noqa: F401  (loads torch.ops.centroidkv)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
