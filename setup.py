"""Build and install explaind_fast.

    pip install torch==2.13.0 && pip install --no-build-isolation -e ".[test]"

Always build without isolation: the extension compiles against the torch already installed, and an
isolated build would let pip fetch a different (possibly CUDA) torch. Switches (environment):

    USE_CUDA=0      never build CUDA sources (default: build them when torch has CUDA and nvcc exists)
    DEBUG=1         -O0 -g instead of -O3
    MAX_JOBS=n      parallel compile jobs (ninja); default capped by CPU count and memory
    TORCH_CUDA_ARCH_LIST   respected by torch.utils.cpp_extension for CUDA sources

The package has one compiled extension, explaind_fast._C (csrc/: op schema, input checks, CPU
kernel). The CUDA kernel is a Triton kernel (kernels/) registered from Python, so today there are no
.cu sources; any csrc/*.cu added later is built only on a CUDA machine.
"""
import glob
import os
import shutil
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
os.chdir(ROOT)  # setuptools wants source paths relative to the project root


def _flag(name, default):
    return os.environ.get(name, default) not in ("0", "", "false", "False", "OFF")


def _openmp_flags():
    # at::parallel_for expands to an OpenMP region inside our own code, so the extension itself
    # must be compiled with -fopenmp or the CPU kernel runs single-threaded.
    if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
        return ["-fopenmp"]
    return []


def _default_max_jobs():
    # Each compile of a torch extension source needs ~1.5 GiB; don't let ninja exhaust memory.
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 4.0
    return str(max(1, min(os.cpu_count() or 1, int(mem_gib // 1.5))))


os.environ.setdefault("MAX_JOBS", _default_max_jobs())

debug = _flag("DEBUG", "0")
cpp_sources = sorted(glob.glob("csrc/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/*.cu"))
build_cuda = (
    _flag("USE_CUDA", "1")
    and torch.version.cuda is not None
    and CUDA_HOME is not None
    and shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin") + os.pathsep + os.environ.get("PATH", ""))
    is not None
    and bool(cuda_sources)
)

cxx_flags = (["-O0", "-g"] if debug else ["-O3"]) + ["-std=c++17"] + _openmp_flags()
ext_kwargs = dict(
    name="explaind_fast._C",
    sources=cpp_sources + (cuda_sources if build_cuda else []),
    include_dirs=[os.path.join(ROOT, "csrc")],
    extra_compile_args={"cxx": cxx_flags},
    extra_link_args=_openmp_flags(),
)
if build_cuda:
    ext_kwargs["extra_compile_args"]["nvcc"] = ["-O0", "-g"] if debug else ["-O3"]
    ext_kwargs["define_macros"] = [("EXPLAIND_FAST_WITH_CUDA", "1")]
    extension = CUDAExtension(**ext_kwargs)
else:
    extension = CppExtension(**ext_kwargs)

DEMOS = ["matplotlib", "scikit-learn"]

with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="explaind_fast",
    version="0.1.0",
    description="Fast, exact ExPLAIND: a trained model as an exact kernel machine (PyTorch)",
    long_description=long_description,
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # kernels/ is installed as the subpackage explaind_fast.kernels, not as a top-level package.
    packages=find_packages(include=["explaind_fast", "explaind_fast.*"]) + ["explaind_fast.kernels"],
    package_dir={"explaind_fast": "explaind_fast", "explaind_fast.kernels": "kernels"},
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    # The runtime: torch, numpy, safetensors (the trajectory store and saved results), tqdm
    # (progress bars) and triton where it runs (the CUDA kernel; Linux): 3.6 (the GPU machine's,
    # tested in CI by .ci/triton_oldest.sh) through 3.9 are tested. ninja and pybind11 are build
    # requirements (pyproject.toml), not runtime ones.
    install_requires=["torch>=2.4", "numpy", "safetensors", "tqdm",
                      "triton>=3.6,<4; platform_system == 'Linux'"],
    entry_points={"console_scripts": ["explaind-fast = explaind_fast.cli:main"]},
    extras_require={
        # the demos' figures and scikit-learn's bundled 8×8 digits
        "demos": DEMOS,
        # explaind_fast.integrations.huggingface (the Trainer needs accelerate)
        "huggingface": ["transformers", "accelerate>=1.1.0"],
        # the test suite runs the demos' smoke tests and checks the layer contract
        "test": ["pytest", "pytest-benchmark", "hypothesis", "import-linter>=2.1", "transformers",
                 "accelerate>=1.1.0"] + DEMOS,
    },
    zip_safe=False,
)
