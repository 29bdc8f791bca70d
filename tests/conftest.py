import fcntl
import os
import shutil
from pathlib import Path

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


@pytest.fixture(scope="session")
def once_per_session(tmp_path_factory):
    """``once_per_session(name, build)`` -> a folder that ``build(folder)`` filled exactly once per test
    session. Under pytest-xdist (CI runs -n 2) the workers share one folder behind a file lock instead
    of each running ``build`` (e.g. a pair of torchrun launches); ``build`` must end by creating
    ``folder / "DONE"``, so a folder left by an interrupted build is rebuilt."""

    def run(name: str, build) -> Path:
        if not os.environ.get("PYTEST_XDIST_WORKER"):
            d = tmp_path_factory.mktemp(name)
            build(d)
            return d
        d = tmp_path_factory.getbasetemp().parent / f"hedgehog_{name}"
        d.mkdir(exist_ok=True)
        with open(d.parent / f"hedgehog_{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if not (d / "DONE").exists():
                    shutil.rmtree(d)
                    d.mkdir()
                    build(d)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return d

    return run
