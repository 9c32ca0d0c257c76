"""brorl: a large-N rollout engine and BroRL trainer.

`python setup.py build_ext --inplace` builds the optional C++ extensions from csrc/;
`pip install -e .` installs the packages, the `brorl` command, and builds them too.

Extensions (plain pybind11, no torch headers: each builds in seconds on 2 cores):
- `brorl.engine._cache_ext` from csrc/cache/*.cpp: radix tree and page allocator
- `brorl.kernels._attention_ext` from csrc/attention/*.cpp: CPU attention with OpenMP
CUDA sources (csrc/cuda/*.cu) are compiled with nvcc and linked into `brorl.kernels._cuda_ext`
only when nvcc and a CUDA build of torch are both present; otherwise one line says they
were skipped. A failing C++ build never fails the install: the engine then runs its
Python/numba paths, and `brorl info` says which ones it uses.

The top-level folders engine/, kernels/ and trainer/ install as `brorl.engine`,
`brorl.kernels` and `brorl.trainer` (package_dir below). Plain top-level names would
clash: Hugging Face's `kernels` package, which transformers >= 5.25 requires, has the
import name `kernels`, and pip would write both into site-packages/kernels/. kernels/ has
no __init__.py for the same reason: with the repository root on sys.path (pytest, the
bench scripts), a regular package there would still shadow theirs, while a folder without
one only counts when no `kernels` package is installed.
"""

import os
import shutil
import subprocess
import sys
from glob import glob

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
TOP_LEVEL = ("engine", "kernels", "trainer")


def _packages() -> list[str]:
    """brorl.engine, brorl.kernels, brorl.trainer and every folder of .py files below them
    (kernels/ has no __init__.py, so find_packages would miss it)."""
    found = []
    for top in TOP_LEVEL:
        for folder, subdirs, files in os.walk(os.path.join(HERE, top)):
            subdirs[:] = sorted(d for d in subdirs if d != "__pycache__")
            if any(f.endswith(".py") for f in files):
                found.append("brorl." + os.path.relpath(folder, HERE).replace(os.sep, "."))
    return found


def _sources(folder: str, pattern: str = "*.cpp") -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob(os.path.join(HERE, "csrc", folder,
                                                                        pattern)))


def _cuda_wanted() -> bool:
    """nvcc on the PATH and a CUDA build of torch (torch.version.cuda set)."""
    if not shutil.which("nvcc") or not _sources("cuda", "*.cu"):
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.version.cuda is not None


def _cuda_home() -> str:
    """CUDA_HOME, else the toolkit that the real nvcc (symlinks resolved) belongs to."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else ""
    return home if os.path.isdir(os.path.join(home, "lib64")) else "/usr/local/cuda"


def get_extensions() -> list:
    """One pybind11 extension per csrc/ folder that has sources."""
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        print("brorl: pybind11 is not installed; skipping the C++ extensions", file=sys.stderr)
        return []
    exts = []  # depends: the headers, rebuilt on change and shipped in an sdist
    # GCC prefers 256-bit vectors on AVX-512 CPUs; the attention tiles are written for 512.
    # -march=native tunes the build to this CPU: a tree copied to an older one (Ray workers
    # on other machines) dies there with SIGILL; BRORL_MARCH=x86-64-v3 (say) builds for all
    # AVX2 machines instead.
    march = os.environ.get("BRORL_MARCH", "native")
    cxx = (["-O3", f"-march={march}", "-mprefer-vector-width=512", "-fopenmp"]
           if sys.platform.startswith("linux") else ["-O3"])
    link = ["-fopenmp"] if sys.platform.startswith("linux") else []
    if _sources("cache"):
        exts.append(Pybind11Extension("brorl.engine._cache_ext", _sources("cache"),
                                      depends=_sources("cache", "*.h"),
                                      include_dirs=["csrc/cache"], cxx_std=17,
                                      extra_compile_args=["-O3"]))
    if _sources("attention"):
        exts.append(Pybind11Extension("brorl.kernels._attention_ext", _sources("attention"),
                                      depends=_sources("attention", "*.h"),
                                      include_dirs=["csrc/attention"], cxx_std=17,
                                      extra_compile_args=cxx, extra_link_args=link))
    if _sources("cuda", "*_bind.cpp") and _cuda_wanted():
        lib = os.path.join(_cuda_home(), "lib64")
        exts.append(Pybind11Extension("brorl.kernels._cuda_ext", _sources("cuda", "*_bind.cpp"),
                                      include_dirs=["csrc/cuda"], cxx_std=17,
                                      libraries=["cudart"], library_dirs=[lib],
                                      runtime_library_dirs=[lib]))
    elif _sources("cuda", "*.cu"):
        print("brorl: skipping the CUDA sources in csrc/cuda (needs nvcc and a CUDA build of "
              "torch)", file=sys.stderr)
    return exts


class OptionalBuildExt(build_ext):
    """Compiles .cu files with nvcc for the CUDA extension, and turns a failed C++ build
    into one warning instead of a failed install."""

    def build_extension(self, ext):
        try:
            if ext.name == "brorl.kernels._cuda_ext":
                self._compile_cu(ext)
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back to Python
            print(f"brorl: WARNING: could not build {ext.name} ({exc}); the engine will use "
                  "its Python/numba paths", file=sys.stderr)

    def _compile_cu(self, ext) -> None:
        os.makedirs(self.build_temp, exist_ok=True)
        for cu in _sources("cuda", "*.cu"):
            obj = os.path.join(self.build_temp, os.path.basename(cu) + ".o")
            subprocess.check_call(["nvcc", "-c", "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                                   "-gencode=arch=compute_90,code=sm_90",
                                   "-gencode=arch=compute_80,code=sm_80", cu, "-o", obj])
            ext.extra_objects.append(obj)


setup(
    name="brorl",
    version="0.1.0",
    description="High-throughput large-N rollout engine and BroRL training loop",
    packages=_packages(),
    package_dir={f"brorl.{top}": top for top in TOP_LEVEL},
    package_data={"brorl.trainer": ["configs/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        # torch is not pinned: CPU users `pip install torch==2.13.0` first, GPU users
        # bring their own CUDA build.
        "torch>=2.6",
        "transformers>=4.51",
        "safetensors",
        "tokenizers",
        "numpy",
        "numba>=0.60",
        "tqdm",
        "pyyaml",
        "pybind11>=2.12",
    ],
    extras_require={
        "test": ["pytest>=8", "triton>=3.2", "reasoning-gym>=0.1.19", "math-verify>=0.7",
                 "matplotlib", "pyarrow", "ruff", "ray==2.60.0"],
        "train": ["reasoning-gym>=0.1.19", "math-verify>=0.7", "matplotlib", "pyarrow"],
        "ray": ["ray>=2.40"],
    },
    ext_modules=get_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    entry_points={"console_scripts": ["brorl=brorl.trainer.cli:main"]},
)
