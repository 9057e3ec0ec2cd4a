"""Test configuration.

Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors; the
interpreter must be switched on before any ``@triton.jit`` function is defined, i.e. before
``txfm_kernels`` is imported, so it is set here at collection time.
"""
import os
import pathlib

import pytest


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      str(pathlib.Path(__file__).resolve().parent.parent / ".cache" / "inductor"))

SHARED_DATA = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "data"
NO_GPU_REASON = ("needs a CUDA GPU: torch.cuda.is_available() is False; run on a machine with a "
                 "GPU and a CUDA build of torch (`python -m bench.gpu_check` does all GPU checks)")


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason=NO_GPU_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """``../shared/data`` beside the checkout; tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA}: check out the project with its "
                    "shared/ folder beside it (shared/data holds small public datasets)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def triton_device() -> str:
    """Device on which Triton kernels run here: 'cuda', or 'cpu' under the interpreter."""
    if importlib_find("triton") is None:
        pytest.skip("triton is not installed: pip install triton (it is in the [test] extra)")
    if _cuda_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "cuda"
    return "cpu"


@pytest.fixture
def one_blas_thread():
    """One BLAS thread for tests on small matrices: spinning OpenBLAS threads made them ~4x
    slower when they shared 2 cores with other jobs."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        yield


def importlib_find(name):
    import importlib.util

    return importlib.util.find_spec(name)


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core box two spinning OpenMP threads run ~5x slower.
    Test files that train use it for every test: ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
