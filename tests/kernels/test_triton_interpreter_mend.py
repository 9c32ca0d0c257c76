"""brorl.kernels.triton_common mends Triton's interpreter where it turns a scalar tensor into a
Python int with `int(data)` on a 1-element 1-d array, which numpy 2.5 refuses (Triton 3.6,
the GPU image's, with numpy 2.5). Here an interpreter of that kind is made from the
installed one, so the mend is checked with any Triton and numpy."""

import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from brorl.kernels import triton_common  # noqa: E402

# the kernels below run on CPU tensors: under the interpreter only (tests/conftest.py turns
# it on unless TRITON_INTERPRET is set otherwise, as on a GPU machine's GPU-only run)
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the mend is for Triton's interpreter")


@triton.jit
def _sum_range_kernel(bounds, out):
    start = tl.load(bounds)
    end = tl.load(bounds + 1)
    acc = tl.zeros((), dtype=tl.int32)
    for i in range(start, end):  # the loop bounds are scalar tensors: __index__
        acc += i
    tl.store(out, acc)


def _sum_range(start: int, end: int) -> int:
    out = torch.zeros(1, dtype=torch.int32)
    _sum_range_kernel[(1,)](torch.tensor([start, end], dtype=torch.int32), out)
    return int(out.item())


def _strict_int(data):
    """int() as numpy 2.5 does it: no arrays with dimensions."""
    if getattr(data, "ndim", 0) > 0:
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
    return int(data)


def test_an_interpreter_that_refuses_1d_scalars_is_mended(monkeypatch):
    installed = interpreter._patch_lang_tensor

    def old_patch(tensor, scope):
        installed(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: _strict_int(self.handle.data))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", old_patch)
    with pytest.raises(Exception, match="0-dimensional"):
        _sum_range(2, 5)  # the old interpreter fails on this machine's numpy too
    assert triton_common._mend_interpreter_index() is True
    assert _sum_range(2, 5) == 2 + 3 + 4
    assert triton_common._mend_interpreter_index() is False  # once only


def test_the_installed_interpreter_runs_tensor_loop_bounds():
    assert triton_common._mend_interpreter_index() is False  # mended at import, or sound
    assert _sum_range(3, 7) == 3 + 4 + 5 + 6
