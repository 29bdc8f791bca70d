import os

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter. Set this before any test module (or library
# code they import) imports triton: the mode is fixed when a kernel is decorated, and mixing modes
# inside one pytest-xdist worker breaks the interpreter's kernel lookup.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep CI deterministic and inside 2 cores.
# Under pytest-xdist each worker gets one thread: two workers x two threads on CI's 2 cores
# oversubscribe and slow OpenMP kernels down by 10x or more.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
