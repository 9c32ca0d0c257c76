"""Triton RoPE in the rotate-half layout with `apply_rope_ref`'s contract:
out = x * cos + rotate_half(x) * sin for x [T, heads, head_dim] and cos/sin [T, head_dim].
One program per (token, block of heads); x may be a strided view (q/k split out of a
fused projection)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from brorl.kernels.triton_common import check_float


@triton.jit
def _rope_kernel(x, cos, sin, out, heads, s_xt, s_xh, s_ct, s_st, s_ot, s_oh,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HALF
    mask = (offs_h < heads)[:, None] & dmask[None, :]
    xp = x + t * s_xt + offs_h[:, None] * s_xh + offs_d[None, :]
    x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos + t * s_ct + offs_d, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos + t * s_ct + HALF + offs_d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin + t * s_st + offs_d, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin + t * s_st + HALF + offs_d, mask=dmask, other=0.0).to(tl.float32)
    o1 = x1 * c1[None, :] - x2 * s1[None, :]
    o2 = x2 * c2[None, :] + x1 * s2[None, :]
    op = out + t * s_ot + offs_h[:, None] * s_oh + offs_d[None, :]
    tl.store(op, o1.to(out.dtype.element_ty), mask=mask)
    tl.store(op + HALF, o2.to(out.dtype.element_ty), mask=mask)


def apply_rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope_ref`'s contract: x [T, heads, head_dim], cos/sin [T, head_dim] of x's
    dtype -> a new contiguous tensor (computed in float32, rounded once)."""
    check_float("x", x, 3)
    check_float("cos", cos, 2)
    check_float("sin", sin, 2)
    T, heads, d = x.shape
    if d % 2:
        raise ValueError(f"head_dim must be even, got {d}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (T, d):
            raise ValueError(f"{name} must be [{T}, {d}], got {tuple(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device}, x is {x.dtype} on "
                             f"{x.device}")
    out = torch.empty(T, heads, d, dtype=x.dtype, device=x.device)
    if T == 0 or heads == 0:
        return out
    block_h = min(16, triton.next_power_of_2(heads))
    _rope_kernel[(T, triton.cdiv(heads, block_h))](
        x, cos, sin, out, heads, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
        out.stride(0), out.stride(1), HALF=d // 2, BLOCK_H=block_h,
        BLOCK_D=triton.next_power_of_2(d // 2))
    return out
