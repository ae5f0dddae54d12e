"""Suite-wide settings. The tests run thousands of forwards of tiny models; on a 2-core machine
two intra-op threads only contend (measured 4-30x slower than one when the machine is busy), so
the whole suite runs on one thread. Subprocess tests (scripts, torchrun) are not affected.

The token-shard cache of the training scripts goes to a temporary directory of this session
(set before any test module copies os.environ for its subprocesses), never to ~/.cache.

Tests marked `cuda` (the GPU check, tests/test_cuda.py) are skipped, saying why, where no CUDA
GPU is, unless MINIDIFF_TEST_DEVICE=cpu asks for them on the CPU (the check's dry run)."""
import atexit
import os
import shutil
import tempfile

import pytest
import torch

os.environ["MINIDIFF_SHARD_CACHE"] = tempfile.mkdtemp(prefix="minidiff-shards-")
atexit.register(shutil.rmtree, os.environ["MINIDIFF_SHARD_CACHE"], True)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or os.environ.get("MINIDIFF_TEST_DEVICE") == "cpu":
        return
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
