"""brorl: a large-N rollout engine and BroRL trainer.

`python setup.py build_ext --inplace` builds the optional C++ extension from csrc/
(when there is one); `pip install -e .` installs the packages and the `brorl` command.
"""

from setuptools import find_packages, setup


def get_extensions() -> list:
    """C++/CUDA extensions in csrc/; none yet, so the pure-Python engine is used."""
    return []


setup(
    name="brorl",
    version="0.1.0",
    description="High-throughput large-N rollout engine and BroRL training loop",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*",
                                    "trainer", "trainer.*"]),
    package_data={"trainer": ["configs/*.yaml"]},
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
    ],
    extras_require={
        "test": ["pytest>=8", "triton>=3.2", "reasoning-gym>=0.1.19", "math-verify>=0.7",
                 "matplotlib", "pyarrow", "ruff"],
        "train": ["reasoning-gym>=0.1.19", "math-verify>=0.7", "matplotlib", "pyarrow"],
    },
    ext_modules=get_extensions(),
    entry_points={"console_scripts": ["brorl=trainer.cli:main"]},
)
