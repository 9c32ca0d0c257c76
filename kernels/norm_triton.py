"""Triton RMSNorm and fused residual-add + RMSNorm with the contracts of
kernels/norm.py: the sum of squares in float32, the normalised row cast back to the input
dtype, then multiplied by the weight. One program per row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from brorl.kernels.triton_common import check_float


@triton.jit
def _rms_norm_kernel(x, res, w, out, sum_out, eps, s_x, s_r, s_o, s_s, N: tl.constexpr,
                     BLOCK: tl.constexpr, ADD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    xr = tl.load(x + row * s_x + offs, mask=mask, other=0.0)
    if ADD:
        # the sum is rounded to the input dtype first, as `x + residual` in torch is
        r = tl.load(res + row * s_r + offs, mask=mask, other=0.0)
        xr = (xr.to(tl.float32) + r.to(tl.float32)).to(xr.dtype)
        tl.store(sum_out + row * s_s + offs, xr, mask=mask)
    xf = xr.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
    normed = (xf * rstd).to(xr.dtype).to(tl.float32)
    wf = tl.load(w + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + row * s_o + offs, (normed * wf).to(out.dtype.element_ty), mask=mask)


def _rows(name: str, x: torch.Tensor) -> torch.Tensor:
    """x [..., hidden] -> a 2-D [rows, hidden] view (or copy) with unit last stride."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dim")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    check_float(name, x2, 2)
    return x2


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    x2 = _rows("x", x)
    hidden = x2.shape[1]
    check_float("weight", weight, 1)
    if weight.shape[0] != hidden:
        raise ValueError(f"weight has {weight.shape[0]} elements, hidden size is {hidden}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight is {weight.dtype} on {weight.device}, x is {x.dtype} on "
                         f"{x.device}")
    r2 = s2 = None
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} does not "
                             f"match x {tuple(x.shape)} {x.dtype}")
        r2 = _rows("residual", residual)
        s2 = torch.empty_like(x2)
    out = torch.empty_like(x2)
    if x2.shape[0]:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2 if r2 is not None else x2, weight, out, s2 if s2 is not None else out,
            eps, x2.stride(0), (r2 if r2 is not None else x2).stride(0), out.stride(0),
            (s2 if s2 is not None else out).stride(0), N=hidden, BLOCK=block,
            ADD=residual is not None, num_warps=min(16, max(1, block // 256)))
    summed = s2.view(x.shape) if s2 is not None else None
    return out.view(x.shape), summed


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm_ref`'s contract for x [..., hidden] and weight [hidden] of x's dtype."""
    return _launch(x, None, weight, eps)[0]


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rms_norm_ref`'s contract: (norm(x + residual), x + residual)."""
    out, summed = _launch(x, residual, weight, eps)
    return out, summed
