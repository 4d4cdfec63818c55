import os

# Tests never touch the network: no Hub lookups, no telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models run faster single-threaded, and subprocesses inherit it

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _autograd_left_on():
    """A test (or a benchmark it runs in-process) must not leave autograd off for the tests after it: that once made
    an unrelated local phase fail with "element 0 of tensors does not require grad"."""
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("this test left torch's grad mode disabled (use torch.no_grad() as a context or decorator)")


# ---- Flower: the task identity a ServerApp process has, for ServerApps run in this process (InProcessGrid) ----------
@pytest.fixture
def task_identity():
    pytest.importorskip("flwr")
    from fedsrd.integrations.inprocess import serverapp_task_identity

    with serverapp_task_identity():
        yield
