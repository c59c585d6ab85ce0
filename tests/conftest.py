import os

import pytest
import torch

import flash_ext

CUDA_OK = torch.cuda.is_available() and flash_ext.cuda_built()
if not torch.cuda.is_available():
    CUDA_SKIP_REASON = "no CUDA device"
elif not flash_ext.cuda_built():
    CUDA_SKIP_REASON = "flash_ext was built without CUDA kernels"
else:
    CUDA_SKIP_REASON = ""

requires_cuda = pytest.mark.skipif(not CUDA_OK, reason=CUDA_SKIP_REASON or "CUDA available")


def device_params():
    """[cpu, cuda]: the CUDA case skips with its reason where it cannot run."""
    return [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=requires_cuda)]


def poison_cuda_allocator(*shapes_dtypes):
    """Fill cached CUDA blocks of the given sizes with NaN bytes and free them, so the op's own
    output allocations reuse NaN memory: an element the kernel never writes then fails the check."""
    if not CUDA_OK:
        return
    held = []
    for shape, dtype in shapes_dtypes:
        t = torch.empty(shape, dtype=dtype, device="cuda")
        t.view(torch.uint8).fill_(0xFF)
        held.append(t)
    del held


@pytest.fixture(autouse=True)
def _seed():
    """Fresh random inputs every run; the seed is printed so a failure can be replayed
    (FLASH_EXT_TEST_SEED=N)."""
    seed = int(os.environ.get("FLASH_EXT_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"seed {seed}")
    torch.manual_seed(seed)
    yield
