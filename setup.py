"""Builds d2f_ext._C: CPU kernels always, CUDA kernels when nvcc and a CUDA build of torch exist.

The decision never asks for a GPU (build machines have none): CUDA is compiled in when
D2F_EXT_CUDA is not "0", torch.version.cuda is set, and a CUDA toolkit with nvcc is found.
Install with `pip install --no-build-isolation .` so that the installed torch is used.
"""

import glob
import importlib.util
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"  # A100, H100/H200; PTX lets newer GPUs JIT the sm_90 code


def find_cuda_home():
    """A toolkit folder with bin/nvcc and include/cuda_runtime.h (nvcc may be a wrapper script)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in filter(None, candidates):
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
                os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def nvidia_wheel_includes():
    """Include folders of the nvidia-* wheels installed beside torch (cusparse.h and friends)."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    found = set()
    for root in spec.submodule_search_locations:
        for header in glob.glob(os.path.join(root, "**", "include", "cusparse.h"), recursive=True):
            found.add(os.path.dirname(header))
    return sorted(found)


def want_cuda():
    if os.environ.get("D2F_EXT_CUDA", "1") == "0":
        return False, None
    import torch
    if torch.version.cuda is None:
        return False, None
    home = find_cuda_home()
    return home is not None, home


def extension():
    with_cuda, cuda_home = want_cuda()
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home  # read by cpp_extension at import
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension
    version = [f'-DD2F_TORCH_VERSION="{torch.__version__}"']
    sources = sorted(glob.glob("csrc/kernels/*.cpp") + glob.glob("csrc/ops/*.cpp"))
    cxx = ["-O3", "-fopenmp"] + version  # the C++ standard comes from torch (C++20 since 2.14)
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    if not with_cuda:
        return CppExtension("d2f_ext._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    archs = os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";")
    arch_names = ",".join(a.strip() for a in archs.split(";") if a.strip())
    defines = ["-DD2F_WITH_CUDA", f'-DD2F_CUDA_ARCHS="{arch_names}"']
    kwargs["include_dirs"] += nvidia_wheel_includes()
    return CUDAExtension(
        "d2f_ext._C",
        sources + sorted(glob.glob("csrc/kernels/*.cu")),
        extra_compile_args={"cxx": cxx + defines,
                            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + defines},
        **kwargs,
    )


def build_ext_cmdclass():
    from torch.utils.cpp_extension import BuildExtension
    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


EVAL = ["lm-eval>=0.4,<0.5", "accelerate"]  # d2f-eval
SERVE = ["fastapi", "uvicorn", "uvloop; sys_platform != 'win32'", "httptools"]  # d2f-serve; uvicorn uses the last two
RECIPE = ["peft", "tqdm", "matplotlib", "psutil", "aiohttp"]  # python -m d2f_recipe.*, d2f_bench.* (plots, CPU shares, clients)

setup(
    name="d2f_ext",
    version="0.1.0",
    description="Discrete Diffusion Forcing (D2F) decoding for LLaDA and Dream: kernels and engine",
    # The recipe and the benchmarks are packages too, so they import each other without path edits.
    packages=find_packages(include=["d2f_ext", "d2f_ext.*"]) + ["d2f_recipe", "d2f_bench"],
    package_dir={"d2f_recipe": "python/d2f_recipe", "d2f_bench": "python/d2f_bench"},
    package_data={"d2f_ext": ["assets/**/*", "evaluation/tasks/**/*"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy", "safetensors", "tokenizers", "transformers>=4.46"],
    extras_require={
        "serve": SERVE,
        # lm-evaluation-harness for d2f-eval; accelerate for `accelerate launch` data parallelism.
        "eval": EVAL,
        "recipe": RECIPE,
        "test": ["pytest", "hypothesis", "expecttest", "openai"] + SERVE + EVAL + RECIPE,
    },
    ext_modules=[extension()],
    cmdclass=build_ext_cmdclass(),
    # lm-eval 0.4 discovers no plugins through entry points; d2f-eval registers the model itself.
    entry_points={"console_scripts": ["d2f-generate=d2f_ext.cli:main",
                                      "d2f-eval=d2f_ext.evaluation.cli:main",
                                      "d2f-serve=d2f_ext.serve.cli:main",
                                      "d2f-selftest=d2f_ext.selftest:main"]},
)
