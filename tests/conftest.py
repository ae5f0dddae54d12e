"""Suite-wide settings. The tests run thousands of forwards of tiny models; on a 2-core machine
two intra-op threads only contend (measured 4-30x slower than one when the machine is busy), so
the whole suite runs on one thread. Subprocess tests (scripts, torchrun) are not affected."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
