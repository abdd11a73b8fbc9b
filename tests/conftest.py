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


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored after): the loops under test pin theirs the same way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny():
    """The small RLHF task of tests/_rlhf_tiny.py as (task, cache_dir), built once per test process."""
    from _rlhf_tiny import tiny_task

    return tiny_task()
