import os

import pytest
import torch

os.environ.setdefault("FASTATTR_STRICT", "1")  # a missing CPU kernel must fail the tests, not fall back silently


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    skip = pytest.mark.skip(reason="needs a GPU and fastattr's CUDA kernels")
    for item in items:
        if "cuda" in item.keywords and not has_gpu:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
