"""Machine-code checks of the built CUDA kernels with cuobjdump; no GPU needed.

Every kernel of d2f_ext._C runs without a local-memory stack (register spills or arrays indexed
at run time) on every architecture it was built for, and the tensor-core attention kernel does
use the tensor cores (HMMA instructions).
"""

import importlib.util
import os
import pathlib
import re
import shutil
import subprocess

import pytest

import d2f_ext
from d2f_ext import ops

INFO = ops.build_info()
pytestmark = pytest.mark.skipif(not INFO.get("cuda"), reason="d2f_ext._C was built without CUDA kernels")

# "8.0", "9.0+PTX" -> sm_80, sm_90: the SASS the build must contain.
ARCHS = sorted({"sm_{}{}".format(*re.match(r"(\d+)\.(\d+)", a).groups()) for a in INFO.get("cuda_archs", [])})
MMA_KERNEL = "attention_mma_kernel"
MMA_INSTANTIATIONS = 4  # bfloat16 and float16, head_dim 64 and 128


def find_cuobjdump():
    """cuobjdump on PATH, beside nvcc, under CUDA_HOME / CUDA_PATH, or in the triton wheel."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    dirs = [os.path.join(os.environ[v], "bin") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        dirs.append(os.path.dirname(os.path.realpath(nvcc)))
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.origin:
        dirs.append(os.path.join(os.path.dirname(triton.origin), "backends", "nvidia", "bin"))
    for d in dirs:
        tool = os.path.join(d, "cuobjdump")
        if os.path.isfile(tool) and os.access(tool, os.X_OK):
            return tool
    return None


@pytest.fixture(scope="module")
def cuobjdump():
    tool = find_cuobjdump()
    if tool is None:
        message = "cuobjdump not found (PATH, nvcc's folder, CUDA_HOME, CUDA_PATH, the triton wheel)"
        if os.environ.get("CI") == "true":  # CI must check the kernels it built
            pytest.fail(message)
        pytest.skip(message)
    return tool


@pytest.fixture(scope="module")
def library():
    found = sorted(pathlib.Path(d2f_ext.__file__).parent.glob("_C*.so"))
    assert found, f"no d2f_ext/_C*.so beside {d2f_ext.__file__}"
    return str(found[0])


def dump(tool, flag, library):
    run = subprocess.run([tool, flag, library], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{tool} {flag} failed: {run.stderr}"
    return run.stdout


def functions(listing):
    """{(arch, mangled function name): its lines} of a cuobjdump listing."""
    out, arch, name = {}, None, None
    for line in listing.splitlines():
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch, name = m.group(1), None
            continue
        m = re.match(r"\s*Function\s*:?\s*(\S+?):?\s*$", line)
        if m:
            name = m.group(1)
            out[(arch, name)] = []
        elif name is not None:
            out[(arch, name)].append(line)
    return out


def readable(name):
    """The demangled name where c++filt exists (the mangled one is still exact)."""
    tool = shutil.which("c++filt")
    if tool is None:
        return name
    return subprocess.run([tool, name], capture_output=True, text=True).stdout.strip() or name


def test_every_kernel_has_no_stack(cuobjdump, library):
    usage = functions(dump(cuobjdump, "--dump-resource-usage", library))
    for arch in ARCHS:
        assert any(a == arch for a, _ in usage), f"no kernels for {arch} in {library}"
    stacks = {}
    for (arch, name), lines in usage.items():
        m = re.search(r"\bSTACK:(\d+)", " ".join(lines))
        assert m, f"no STACK figure for {name} ({arch})"
        stacks[(arch, name)] = int(m.group(1))
    spilling = [f"{readable(name)} ({arch}): STACK {n}" for (arch, name), n in sorted(stacks.items()) if n]
    assert not spilling, "kernels with a local-memory stack:\n" + "\n".join(spilling)


def test_mma_attention_kernel_uses_tensor_cores(cuobjdump, library):
    sass = functions(dump(cuobjdump, "--dump-sass", library))
    for arch in ARCHS:
        kernels = {name: lines for (a, name), lines in sass.items() if a == arch and MMA_KERNEL in name}
        assert len(kernels) == MMA_INSTANTIATIONS, f"{arch}: {sorted(kernels)}"
        for name, lines in kernels.items():
            assert any(re.search(r"\bHMMA\.16816\.F32", line) for line in lines), f"no HMMA in {name} ({arch})"


def test_tensor_core_kernel_builds_for_an_older_target(tmp_path):
    """TORCH_CUDA_ARCH_LIST may name a target below sm_80 (images often set "7.5;8.0"): the
    tensor-core kernel, whose instructions need sm_80, must still build for it."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    csrc = pathlib.Path(__file__).resolve().parents[1] / "csrc"
    run = subprocess.run([nvcc, "-std=c++17", "-DD2F_WITH_CUDA", "-arch=sm_75", f"-I{csrc}", "-c",
                          str(csrc / "kernels" / "attention_mma_cuda.cu"), "-o", str(tmp_path / "mma.o")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
