"""Triton extend (prefill) attention with `extend_attention_ref`'s contract (layout in
kernels/extend_attention.py): several sequences in one launch, each attending to its
cached prefix and causally to its own new tokens, all keys read from the KV pages.

One program per (block of new tokens, sequence, query head); the keys stop at the block's
last causal position. `pack_extend_meta` turns the per-sequence lists into tensors once
per step, so a model with many layers pays for that only once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from brorl.kernels.transfer import upload
from brorl.kernels.triton_common import LOG2E, check_cache, check_int, dot_precision

EXTEND_BLOCK_M = 32  # new tokens per program
EXTEND_BLOCK_N = 64  # keys per step
_NO_PAGES = 2**62  # min_page_size of a sequence with keys and an empty page table


@dataclass
class ExtendPacked:
    """Tensors of one extend step (on the q device)."""

    page_table: torch.Tensor  # [S, P] int64, padded with page 0
    prefix_lens: torch.Tensor  # [S] int32
    extend_lens: torch.Tensor  # [S] int32
    cu_seqlens: torch.Tensor  # [S] int64, first row of each sequence in q
    max_extend: int
    total_tokens: int
    # the smallest page size whose pages hold every sequence's prefix_len + extend_len
    # keys (a shorter page table would make the kernel read past its row)
    min_page_size: int = 0


def pack_extend_meta(page_tables: list[torch.Tensor], prefix_lens: list[int],
                     extend_lens: list[int], device: torch.device) -> ExtendPacked:
    """Per-sequence lists -> padded tensors."""
    if not len(page_tables) == len(prefix_lens) == len(extend_lens):
        raise ValueError(f"{len(page_tables)} page tables, {len(prefix_lens)} prefix lengths "
                         f"and {len(extend_lens)} extend lengths differ")
    if not page_tables:
        raise ValueError("no sequences to extend")
    if min(extend_lens) < 0 or min(prefix_lens) < 0:
        raise ValueError("prefix and extend lengths must be >= 0")
    table = torch.nn.utils.rnn.pad_sequence(
        [p.to(device=device, dtype=torch.int64).reshape(-1) for p in page_tables],
        batch_first=True)
    if table.shape[1] == 0:
        table = torch.zeros(len(page_tables), 1, dtype=torch.int64, device=device)
    starts = [0]
    for t in extend_lens[:-1]:
        starts.append(starts[-1] + t)
    need = 0
    for p, c, t in zip(page_tables, prefix_lens, extend_lens):
        if c + t:
            need = max(need, triton.cdiv(c + t, p.numel()) if p.numel() else _NO_PAGES)
    prefix, extend, first = upload([np.asarray(prefix_lens, dtype=np.int32),
                                    np.asarray(extend_lens, dtype=np.int32),
                                    np.asarray(starts, dtype=np.int64)], device)
    return ExtendPacked(table, prefix, extend, first, max(extend_lens), sum(extend_lens),
                        need)


@triton.jit
def _extend_kernel(q, kc, vc, pt, prefix_lens, extend_lens, cu, out, qk_scale,
                   s_qt, s_qh, s_kp, s_ks, s_kh, s_vp, s_vs, s_vh, s_pt, s_ot, s_oh,
                   R: tl.constexpr, D: tl.constexpr, PS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr):
    mb = tl.program_id(0)
    s = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2)
    kvh = h // R
    c = tl.load(prefix_lens + s)
    t = tl.load(extend_lens + s)
    first = tl.load(cu + s)
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < t
    dmask = offs_d < D
    qmask = mmask[:, None] & dmask[None, :]
    rows = first + offs_m
    qt = tl.load(q + rows[:, None] * s_qt + h * s_qh + offs_d[None, :], mask=qmask, other=0.0)
    q_pos = c + offs_m  # absolute position of each new token
    # keys up to the block's last causal position; none for a block past the sequence
    end = tl.where(mb * BLOCK_M < t, c + tl.minimum(t, (mb + 1) * BLOCK_M), 0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    pages_row = pt + s * s_pt
    for k0 in range(0, end, BLOCK_N):
        offs_k = k0 + tl.arange(0, BLOCK_N)
        kmask = offs_k < end
        page = tl.load(pages_row + offs_k // PS, mask=kmask, other=0).to(tl.int64)
        slot = offs_k % PS
        kvmask = kmask[:, None] & dmask[None, :]
        k = tl.load(kc + page[:, None] * s_kp + slot[:, None] * s_ks + kvh * s_kh
                    + offs_d[None, :], mask=kvmask, other=0.0)
        sc = tl.dot(qt, tl.trans(k), input_precision=PRECISION) * qk_scale
        causal = kmask[None, :] & (offs_k[None, :] <= q_pos[:, None])
        sc = tl.where(causal, sc, float("-inf"))
        # key 0 is in the first block and visible to every row, so m_new stays finite
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc + page[:, None] * s_vp + slot[:, None] * s_vs + kvh * s_vh
                    + offs_d[None, :], mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out + rows[:, None] * s_ot + h * s_oh + offs_d[None, :], o.to(out.dtype.element_ty),
             mask=qmask)


def extend_attention_packed(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            meta: ExtendPacked, scale: float) -> torch.Tensor:
    """q [T_total, H, D] -> out [T_total, H, D] in q's dtype, for packed metadata."""
    check_cache(q, k_cache, v_cache, q_dims=3)
    S = meta.page_table.shape[0]
    check_int("page_table", meta.page_table, 2, q.device)
    for name in ("prefix_lens", "extend_lens", "cu_seqlens"):
        check_int(name, getattr(meta, name), 1, q.device, rows=S)
    if q.shape[0] != meta.total_tokens:
        raise ValueError(f"q has {q.shape[0]} rows, the extend lengths sum to "
                         f"{meta.total_tokens}")
    T, H, D = q.shape
    hkv, ps = k_cache.shape[2], k_cache.shape[1]
    if meta.min_page_size > ps:
        raise ValueError(f"a page table is too short: its pages of {ps} tokens hold fewer "
                         f"keys than its prefix + extend length (pages of "
                         f"{meta.min_page_size} tokens would)")
    out = torch.empty_like(q)
    if T == 0:
        return out
    grid = (triton.cdiv(meta.max_extend, EXTEND_BLOCK_M), S, H)
    _extend_kernel[grid](
        q, k_cache, v_cache, meta.page_table, meta.prefix_lens, meta.extend_lens,
        meta.cu_seqlens, out, scale * LOG2E, q.stride(0), q.stride(1), *k_cache.stride()[:3],
        *v_cache.stride()[:3], meta.page_table.stride(0), out.stride(0), out.stride(1),
        R=H // hkv, D=D, PS=ps, BLOCK_M=EXTEND_BLOCK_M, BLOCK_N=EXTEND_BLOCK_N,
        BLOCK_D=max(16, triton.next_power_of_2(D)), PRECISION=dot_precision(q.dtype),
        num_warps=_warps(q.dtype))
    return out


def _warps(dtype: torch.dtype) -> int:
    """8 warps for float32, whose exact products run on the FMA units: at head dim 128 on
    sm_90 (`python -m brorl.kernels.triton_aot`) 4 warps spilled 15 KB a thread, 8 none; 4 for
    the half types (168 registers, no spills). From the compiled kernels, not timed."""
    return 8 if dtype == torch.float32 else 4


def extend_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            page_tables: list[torch.Tensor], prefix_lens: list[int],
                            extend_lens: list[int], scale: float) -> torch.Tensor:
    """`extend_attention_ref`'s contract: out [T_total, num_heads, head_dim] in q's dtype."""
    meta = pack_extend_meta(page_tables, prefix_lens, extend_lens, q.device)
    return extend_attention_packed(q, k_cache, v_cache, meta, scale)
