import os

import pytest
import torch

# Without a GPU our Triton kernels run in Triton's CPU interpreter. The variable must be set before
# any flashlm Triton kernel is decorated (i.e. before any test module imports the attention registry).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
