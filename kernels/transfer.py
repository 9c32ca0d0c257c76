"""Host -> device copies that do not make the host wait.

`torch.tensor(values, device="cuda")` and a pageable host tensor's `.to("cuda")` wait for
the stream (torch copies pageable memory synchronously), so each one stalls behind every
kernel queued before it. `upload` stages host arrays in one pinned buffer and queues one
asynchronous copy (the caching host allocator keeps the buffer until the copy is done);
off CUDA the arrays become tensors in place. Imports no triton.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_ALIGN = 16  # bytes: every array starts aligned (Triton specialises pointers on 16)


def upload(arrays: Sequence, device: torch.device | str) -> list[torch.Tensor]:
    """One tensor on `device` per host array (numpy arrays, or lists as np.asarray reads
    them), with its dtype and shape: views of one device buffer filled by one copy that
    does not wait for the device on CUDA."""
    device = torch.device(device)
    arrays = [np.asarray(a, order="C") for a in arrays]  # 0-d stays 0-d (ascontiguousarray: 1-d)
    offsets, total = [], 0
    for a in arrays:
        offsets.append(total)
        total += -(-a.nbytes // _ALIGN) * _ALIGN
    host = torch.empty(max(total, _ALIGN), dtype=torch.uint8,
                       pin_memory=device.type == "cuda")
    view = host.numpy()
    for a, off in zip(arrays, offsets):
        view[off:off + a.nbytes] = a.reshape(-1).view(np.uint8)
    buf = host.to(device, non_blocking=True)
    return [buf[off:off + a.nbytes].view(_torch_dtype(a.dtype)).view(a.shape)
            for a, off in zip(arrays, offsets)]


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype
