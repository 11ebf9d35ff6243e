import json
import os
import pathlib

import pytest
import torch

import d2f_ext


def pytest_configure(config):
    # Without _C the ops fall back to the references and every kernel test skips: a run that
    # imported a source tree without the built extension would look green while testing little.
    if not d2f_ext.ops.HAVE_C and os.environ.get("D2F_EXT_ALLOW_NO_C") != "1":
        raise pytest.UsageError(
            f"d2f_ext imported from {pathlib.Path(d2f_ext.__file__).parent} has no compiled d2f_ext._C "
            f"({d2f_ext.build_info().get('error')}). Install it (pip install --no-build-isolation .) and run "
            "`pytest` (not `python -m pytest` from the repository root, which imports the source tree), "
            "or set D2F_EXT_ALLOW_NO_C=1 to test the plain-PyTorch fallback.")
    # The bad-input tests expect the index value checks, which only debug mode makes.
    d2f_ext.ops.set_debug_checks(True)


def pytest_report_header(config):
    return f"d2f_ext from {pathlib.Path(d2f_ext.__file__).parent}: {d2f_ext.build_info()}"


def _cuda_ok() -> bool:
    return torch.cuda.is_available()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """Every op test runs on the CPU, and on CUDA where a GPU exists (asked at run time only)."""
    if request.param == "cuda" and not _cuda_ok():
        pytest.skip("no CUDA device")
    return torch.device(request.param)


# --- model checkpoints (built once per session) ---------------------------------------------

CONFORMANCE_DIR = pathlib.Path(__file__).parent / "data" / "conformance"


def conformance_case(name: str) -> dict:
    """A conformance case (llada, dream) from tests/data/conformance."""
    with open(CONFORMANCE_DIR / f"{name}.json", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def conformance_checkpoint(tmp_path_factory):
    """get(name) -> (folder, case): the case's model written as sharded safetensors, once."""
    from d2f_bench.tiny import write_conformance_checkpoint

    built = {}

    def get(name: str):
        if name not in built:
            case = conformance_case(name)
            folder = tmp_path_factory.mktemp(f"conformance_{name}")
            built[name] = (str(write_conformance_checkpoint(str(folder), case)), case)
        return built[name]

    return get


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """get(arch, **options) -> folder: a tiny checkpoint (see d2f_bench.tiny), once per options."""
    from d2f_bench.tiny import write_tiny_checkpoint

    built = {}

    def get(arch: str = "llada", **options):
        key = (arch, tuple(sorted(options.items())))
        if key not in built:
            folder = tmp_path_factory.mktemp(f"tiny_{arch}")
            built[key] = write_tiny_checkpoint(str(folder), arch=arch, **options)
        return built[key]

    return get
