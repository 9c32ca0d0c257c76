"""Dense linear layers of the engine's decoder: y = x @ W^T (+ b).

Two implementations behind one small interface (`pack` once per weight change, then call):
- `torch`: `linear_ref`, torch's `F.linear` on the weight itself. The reference, and the
  choice off the CPU (cuBLAS is already the fast path there).
- `onednn`: each weight reordered once into oneDNN's blocked layout
  (`torch.ops.mkldnn._reorder_linear_weight`), then multiplied by oneDNN's matmul
  (`torch.ops.mkldnn._linear_pointwise`): the weight-prepacking path torch's own CPU
  inference graphs use. It skips F.linear's per-call MKL packing of W; over one decode
  step's GEMMs of the throughput bench model at batch 512 it is faster on our 2-core CI
  CPU (`python bench/linear.py`). Same float32 arithmetic (different summation order:
  results match the reference to float32 rounding, see tests/kernels/test_linear.py).

The packed copy is the weight's second copy in memory; the engine repacks the weights an
`update_weights` call changed, so a packed weight is never stale.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def linear_ref(x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ weight [out, in]^T + bias [out] -> [..., out] (torch's F.linear)."""
    return F.linear(x, weight, bias)


class TorchLinear:
    """`linear_ref` on the weight itself: packing is the identity (no copy)."""

    name = "torch"

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """The form `__call__` takes: the weight itself."""
        return weight

    def __call__(self, x: torch.Tensor, packed: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        return linear_ref(x, packed, bias)


class OneDNNLinear:
    """oneDNN matmul on a weight prepacked in its blocked layout (CPU only)."""

    name = "onednn"

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """A oneDNN-layout copy of weight [out, in] (an opaque `torch._mkldnn` tensor)."""
        _check_weight(weight)
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)

    def __call__(self, x: torch.Tensor, packed: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in] -> [..., out], in x's dtype (which must be the weight's)."""
        if x.dtype != packed.dtype:
            raise ValueError(f"onednn linear: input dtype {x.dtype} differs from the packed "
                             f"weight's {packed.dtype}")
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"onednn linear: weight must be 2-D [out, in], got shape "
                         f"{tuple(weight.shape)}")
    if not _onednn_supports(weight.device, weight.dtype):
        raise ValueError(f"onednn linear runs float32 and bfloat16 on the CPU, got "
                         f"{weight.dtype} on {weight.device}")


def _onednn_supports(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in _ONEDNN_DTYPES


LINEAR_BACKENDS = {"torch": TorchLinear, "onednn": OneDNNLinear}


@functools.cache
def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """True when this torch build has oneDNN and its prepacked-linear ops work in `dtype`
    on this CPU (oneDNN's bfloat16 path needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT; an
    AVX2-only CPU has float32 only)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        w, x = torch.ones(3, 2, dtype=dtype), torch.ones(1, 2, dtype=dtype)
        out = OneDNNLinear()(x, OneDNNLinear().pack(w))
        return bool(torch.equal(out, torch.full((1, 3), 2.0, dtype=dtype)))
    except (AttributeError, RuntimeError, ValueError):
        return False


def default_linear_backend(device: torch.device, dtype: torch.dtype) -> str:
    """What "auto" picks: onednn on the CPU for float32/bfloat16 when it works in that
    dtype here, else torch."""
    return "onednn" if _onednn_supports(device, dtype) and onednn_available(dtype) \
        else "torch"


def make_linear(name: str, device: torch.device, dtype: torch.dtype):
    """The linear implementation called `name` ("auto" resolves by device and dtype)."""
    if name == "auto":
        name = default_linear_backend(device, dtype)
    if name not in LINEAR_BACKENDS:
        raise ValueError(f"unknown linear_backend {name!r}; supported: auto, "
                         f"{', '.join(LINEAR_BACKENDS)}")
    if name == "onednn" and not _onednn_supports(device, dtype):
        raise ValueError(f"linear_backend 'onednn' needs a CPU device and float32 or "
                         f"bfloat16, got {device} / {dtype}")
    if name == "onednn" and not onednn_available(dtype):
        raise ValueError(f"linear_backend 'onednn': oneDNN's {str(dtype).removeprefix('torch.')}"
                         " linear does not work with this torch build on this CPU (bfloat16 "
                         "needs AVX-512 or AVX-NE-CONVERT); use 'torch' or 'auto'")
    return LINEAR_BACKENDS[name]()
