import os

# The Triton interpreter must be chosen before any @triton.jit decorator runs.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import make_checkpoint  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family -> (checkpoint dir, transformers model) for qwen2, qwen3 and llama."""
    out = {}
    for family in ("qwen2", "qwen3", "llama"):
        path = tmp_path_factory.mktemp(family)
        out[family] = (str(path), make_checkpoint(path, family))
    return out


@pytest.fixture(scope="session")
def qwen2(checkpoints):
    return checkpoints["qwen2"]
