import pytest
import torch


def _cuda_ok() -> bool:
    return torch.cuda.is_available()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """Every op test runs on the CPU, and on CUDA where a GPU exists (asked at run time only)."""
    if request.param == "cuda" and not _cuda_ok():
        pytest.skip("no CUDA device")
    return torch.device(request.param)
