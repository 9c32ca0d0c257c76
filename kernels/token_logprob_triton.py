"""Fused Triton forward of the token logprob + entropy (definition and backward in
kernels/token_logprob.py).

`_token_stats_kernel`: one program per (tile of BLOCK_T positions, vocabulary split). It
sweeps its split BLOCK_V entries at a time; each [BLOCK_T, BLOCK_V] logits tile is a
`tl.dot` over the hidden size, scaled, and folded at once into the running max m, sum
l = sum exp(z - m), q = sum exp(z - m) z and the target's logit, so logits never reach
memory. With float16/bfloat16 inputs each logit is rounded to that dtype first, as the
reference (F.linear), the recomputing backward and the engine's LM head have it: the
trainer's logprob is then the same function as the engine's behaviour logprob, and the
backward is the gradient of this forward. Splits (to fill the GPU when T is small) write
partial (m, l, q, target logit), merged by an exact log-sum-exp in torch ([splits, T]
floats). The grid runs the position tiles fastest, so the programs resident at one time
read the same weight rows (L2 reuse). Imported lazily.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from brorl.kernels.token_logprob import _check
from brorl.kernels.triton_common import check_device, dot_precision, interpreted


@triton.jit
def _token_stats_kernel(h, w, bias, tgt, out_m, out_l, out_q, out_t, T, V, Hd, split_len,
                        temp, s_h, s_w, HAS_BIAS: tl.constexpr, ROUND: tl.constexpr,
                        BLOCK_T: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                        PRECISION: tl.constexpr):
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    target = tl.load(tgt + rows, mask=rmask, other=-1)
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_T], dtype=tl.float32)
    q = tl.zeros([BLOCK_T], dtype=tl.float32)
    zt = tl.zeros([BLOCK_T], dtype=tl.float32)
    v_start = split * split_len
    v_end = tl.minimum(v_start + split_len, V)
    offs_h = tl.arange(0, BLOCK_H)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < v_end
        acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
        for k0 in range(0, Hd, BLOCK_H):
            kmask = (k0 + offs_h) < Hd
            a = tl.load(h + rows[:, None].to(tl.int64) * s_h + k0 + offs_h[None, :],
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(w + cols[:, None].to(tl.int64) * s_w + k0 + offs_h[None, :],
                        mask=cmask[:, None] & kmask[None, :], other=0.0)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if ROUND:  # 16-bit inputs: the logits in the input dtype, as F.linear returns them
            acc = acc.to(h.dtype.element_ty).to(tl.float32)
        z = tl.math.div_rn(acc, temp)  # IEEE division, as the reference and the sampler
        z = tl.where(cmask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        alpha = tl.exp2((m - m_new) * 1.4426950408889634)
        e = tl.exp2((z - m_new[:, None]) * 1.4426950408889634)
        l = l * alpha + tl.sum(e, 1)
        q = q * alpha + tl.sum(e * tl.where(cmask[None, :], z, 0.0), 1)
        m = m_new
        zt += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), 1)
    o = split * T + rows
    tl.store(out_m + o, m, mask=rmask)
    tl.store(out_l + o, l, mask=rmask)
    tl.store(out_q + o, q, mask=rmask)
    tl.store(out_t + o, zt, mask=rmask)


def _blocks(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_T, BLOCK_V, BLOCK_H, num_warps, num_stages); tiny tiles under the
    interpreter."""
    if interpreted():
        return 16, 32, 32, 4, 1
    if dtype == torch.float32:
        return 64, 64, 32, 4, 3
    return 128, 128, 64, 8, 3


def _num_splits(T: int, V: int, block_t: int, block_v: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device.index or 0).multi_processor_count
    tiles = triton.cdiv(T, block_t)
    return max(1, min(triton.cdiv(2 * sms, tiles), triton.cdiv(V, 8 * block_v)))


def token_stats_triton(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       targets: torch.Tensor, temperature: float = 1.0
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`token_stats_ref`'s contract, fused: (logp [T], entropy [T], lse [T]) float32 from
    hidden [T, H] and weight [V, H] (float16/bfloat16/float32, CUDA or the interpreter),
    bias [V] or None, targets int [T] in [0, V) (checked: one host sync, as in the
    reference)."""
    _check(hidden, weight, bias, targets, temperature)
    named = [("hidden", hidden), ("weight", weight), ("targets", targets)]
    for name, t in named + ([("bias", bias)] if bias is not None else []):
        check_device(name, t)
        if t.device != hidden.device:
            raise ValueError(f"devices differ: hidden {hidden.device}, {name} {t.device}")
    T, Hd = hidden.shape
    V = weight.shape[0]
    if T > 0:
        lo, hi = torch.stack(torch.aminmax(targets)).tolist()
        if lo < 0 or hi >= V:  # the kernel would give logp -lse or -inf
            raise ValueError(f"targets outside [0, {V})")
    # the kernel indexes every operand with unit last stride (a strided bias read wrong)
    hidden, weight = hidden.contiguous(), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    bt, bv, bh, warps, stages = _blocks(hidden.dtype)
    splits = _num_splits(T, V, bt, bv, hidden.device)
    split_len = triton.cdiv(triton.cdiv(V, splits), bv) * bv
    splits = triton.cdiv(V, split_len)
    part = torch.empty((4, splits, T), dtype=torch.float32, device=hidden.device)
    if T > 0:
        _token_stats_kernel[(triton.cdiv(T, bt), splits)](
            hidden, weight, bias if bias is not None else hidden,
            targets.contiguous(), part[0], part[1], part[2], part[3], T, V, Hd, split_len,
            float(temperature), hidden.stride(0), weight.stride(0), HAS_BIAS=bias is not None,
            ROUND=hidden.dtype != torch.float32, BLOCK_T=bt, BLOCK_V=bv, BLOCK_H=bh,
            PRECISION=dot_precision(hidden.dtype),
            num_warps=warps, num_stages=stages)
    m, l, q, zt = part
    m_all = m.max(0).values
    scale = torch.exp(m - m_all)
    l_all = (l * scale).sum(0)
    lse = m_all + torch.log(l_all)
    entropy = lse - (q * scale).sum(0) / l_all
    return zt.sum(0) - lse, entropy, lse

