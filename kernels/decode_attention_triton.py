"""Triton decode attention over the paged KV cache, with the contracts of the references in
kernels/decode_attention.py (layout and partial-result conventions are documented there).

Kernels:
- `_paged_decode_kernel`: one program per (row, KV head, KV split); the query heads sharing
  the KV head form one tile, keys are read straight from the pages (split-KV over long
  sequences, the splits merged by `_merge_splits_kernel`).
- `_shared_prefix_kernel`: cascade stage 1, one program per (group, KV head, tile of
  samples x query heads, prefix split): a `tl.dot` of the packed tile against the group's
  prefix pages, so the prefix KV is read once per tile instead of once per sample.
- `_merge_splits_kernel`: exact log-sum-exp merge of S partial results per (row, head).

`cascade_decode_triton` writes the prefix splits and the suffix splits into one partials
buffer and merges them in a single pass. Imported lazily: importing the engine never
imports triton.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from brorl.kernels.triton_common import (
    LOG2E,
    check_cache,
    check_device,
    check_int,
    dot_precision,
    num_splits,
)

DECODE_BLOCK_N = 64  # keys per step of the paged / suffix kernel
PREFIX_BLOCK_M = 64  # samples x query heads per prefix tile
PREFIX_WARPS = 8


def prefix_block_n(dtype: torch.dtype) -> int:
    """Prefix keys per step. At head dim 128 on sm_90 (`python -m brorl.kernels.triton_aot`,
    bench/results/triton-resources-sm90.json), 64 with 8 warps compiles without spills in
    bf16; float32's exact products run on the FMA units, whose 64-key tiles spilled 14 KB
    a thread, 32-key ones none. Chosen from the compiled kernels' resources, not timed."""
    return 32 if dtype == torch.float32 else 64


@triton.jit
def _attend_pages(acc, m_i, l_i, qt, kc, vc, pages_row, start, end, kvh, s_kp, s_ks, s_kh,
                  s_vp, s_vs, s_vh, qk_scale, D: tl.constexpr, PS: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax of the tile qt [M, BLOCK_D] over keys start..end of one page table
    row; scores in log2 units (qk_scale includes log2(e))."""
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    for t0 in range(start, end, BLOCK_N):
        offs_t = t0 + tl.arange(0, BLOCK_N)
        tmask = offs_t < end
        page = tl.load(pages_row + offs_t // PS, mask=tmask, other=0).to(tl.int64)
        slot = offs_t % PS
        kmask = tmask[:, None] & dmask[None, :]
        k = tl.load(kc + page[:, None] * s_kp + slot[:, None] * s_ks + kvh * s_kh
                    + offs_d[None, :], mask=kmask, other=0.0)
        s = tl.dot(qt, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc + page[:, None] * s_vp + slot[:, None] * s_vs + kvh * s_vh
                    + offs_d[None, :], mask=kmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _finish(acc, m_i, l_i):
    """(out, natural-log lse); an empty key set gives out 0, lse -inf."""
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) / 1.4426950408889634, float("-inf"))
    return acc / l_safe[:, None], lse


@triton.jit
def _paged_decode_kernel(q, kc, vc, pt, lens, o_part, l_part, qk_scale, split_len,
                         s_qb, s_qh, s_kp, s_ks, s_kh, s_vp, s_vs, s_vh, s_pt,
                         s_ob, s_oh, s_os, s_lb, s_lh, s_ls,
                         R: tl.constexpr, D: tl.constexpr, PS: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         PRECISION: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    n = tl.load(lens + b).to(tl.int32)
    start = sp * split_len
    end = tl.minimum(n, start + split_len)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    hmask = offs_h < R
    heads = kvh * R + offs_h
    qmask = hmask[:, None] & (offs_d < D)[None, :]
    qt = tl.load(q + b * s_qb + heads[:, None] * s_qh + offs_d[None, :], mask=qmask, other=0.0)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc, m_i, l_i = _attend_pages(acc, m_i, l_i, qt, kc, vc, pt + b * s_pt, start, end, kvh,
                                  s_kp, s_ks, s_kh, s_vp, s_vs, s_vh, qk_scale, D, PS,
                                  BLOCK_N, BLOCK_D, PRECISION)
    out, lse = _finish(acc, m_i, l_i)
    tl.store(o_part + b * s_ob + heads[:, None] * s_oh + sp * s_os + offs_d[None, :], out,
             mask=qmask)
    tl.store(l_part + b * s_lb + heads * s_lh + sp * s_ls, lse, mask=hmask)


@triton.jit
def _shared_prefix_kernel(q, kc, vc, group_rows, prefix_pages, prefix_lens, o_part, l_part,
                          qk_scale, split_len, nmax,
                          s_qb, s_qh, s_kp, s_ks, s_kh, s_vp, s_vs, s_vh, s_gr, s_pp,
                          s_ob, s_oh, s_os, s_lb, s_lh, s_ls,
                          HKV: tl.constexpr, R: tl.constexpr, D: tl.constexpr,
                          PS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    g = (tl.program_id(0) // HKV).to(tl.int64)
    kvh = tl.program_id(0) % HKV
    sp = tl.program_id(2)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    sample = offs_m // R  # tile row -> (sample of the group, query head of this KV head)
    heads = kvh * R + offs_m % R
    rows = tl.load(group_rows + g * s_gr + sample, mask=sample < nmax, other=-1).to(tl.int64)
    valid = rows >= 0
    rows = tl.where(valid, rows, 0)
    offs_d = tl.arange(0, BLOCK_D)
    qmask = valid[:, None] & (offs_d < D)[None, :]
    qt = tl.load(q + rows[:, None] * s_qb + heads[:, None] * s_qh + offs_d[None, :],
                 mask=qmask, other=0.0)
    plen = tl.load(prefix_lens + g).to(tl.int32)
    start = sp * split_len
    end = tl.minimum(plen, start + split_len)
    end = tl.where(tl.sum(valid.to(tl.int32), 0) > 0, end, start)  # all-padding tile
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _attend_pages(acc, m_i, l_i, qt, kc, vc, prefix_pages + g * s_pp, start,
                                  end, kvh, s_kp, s_ks, s_kh, s_vp, s_vs, s_vh, qk_scale, D, PS,
                                  BLOCK_N, BLOCK_D, PRECISION)
    out, lse = _finish(acc, m_i, l_i)
    tl.store(o_part + rows[:, None] * s_ob + heads[:, None] * s_oh + sp * s_os
             + offs_d[None, :], out, mask=qmask)
    tl.store(l_part + rows * s_lb + heads * s_lh + sp * s_ls, lse, mask=valid)


@triton.jit
def _merge_splits_kernel(o_part, l_part, out, lse, S, H,
                         s_ob, s_oh, s_os, s_lb, s_lh, s_ls, s_outb, s_outh, s_lseb, s_lseh,
                         D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b = (tl.program_id(0) // H).to(tl.int64)
    h = tl.program_id(0) % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    smask = offs_s < S
    dmask = offs_d < D
    ls = tl.load(l_part + b * s_lb + h * s_lh + offs_s * s_ls, mask=smask, other=float("-inf"))
    m = tl.max(ls, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(ls - m)
    total = tl.sum(w, 0)
    o = tl.load(o_part + b * s_ob + h * s_oh + offs_s[:, None] * s_os + offs_d[None, :],
                mask=smask[:, None] & dmask[None, :], other=0.0)
    merged = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out + b * s_outb + h * s_outh + offs_d, merged, mask=dmask)
    tl.store(lse + b * s_lseb + h * s_lseh, m + tl.log(total))


def _check_q(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    check_cache(q, k_cache, v_cache, q_dims=3)
    if q.shape[0] == 0:
        raise ValueError("q has no rows")


def _launch_paged(q, k_cache, v_cache, page_table, seq_lens, scale, o_part, l_part,
                  splits: int, split_len: int) -> None:
    B, H, D = q.shape
    hkv, ps = k_cache.shape[2], k_cache.shape[1]
    r = H // hkv
    _paged_decode_kernel[(B, hkv, splits)](
        q, k_cache, v_cache, page_table, seq_lens, o_part, l_part, scale * LOG2E, split_len,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        page_table.stride(0), *o_part.stride()[:3], *l_part.stride(),
        R=r, D=D, PS=ps, BLOCK_H=max(16, triton.next_power_of_2(r)), BLOCK_N=DECODE_BLOCK_N,
        BLOCK_D=max(16, triton.next_power_of_2(D)), PRECISION=dot_precision(q.dtype))


def _launch_prefix(q, k_cache, v_cache, group_rows, prefix_pages, prefix_lens, scale, o_part,
                   l_part, splits: int, split_len: int) -> None:
    _, H, D = q.shape
    hkv, ps = k_cache.shape[2], k_cache.shape[1]
    r = H // hkv
    G, nmax = group_rows.shape
    m_tiles = triton.cdiv(nmax * r, PREFIX_BLOCK_M)
    _shared_prefix_kernel[(G * hkv, m_tiles, splits)](
        q, k_cache, v_cache, group_rows, prefix_pages, prefix_lens, o_part, l_part,
        scale * LOG2E, split_len, nmax, q.stride(0), q.stride(1), *k_cache.stride()[:3],
        *v_cache.stride()[:3], group_rows.stride(0), prefix_pages.stride(0),
        *o_part.stride()[:3], *l_part.stride(),
        HKV=hkv, R=r, D=D, PS=ps, BLOCK_M=PREFIX_BLOCK_M, BLOCK_N=prefix_block_n(q.dtype),
        BLOCK_D=max(16, triton.next_power_of_2(D)), PRECISION=dot_precision(q.dtype),
        num_warps=PREFIX_WARPS)


def _merge(o_part: torch.Tensor, l_part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """o_part [B, H, S, D], l_part [B, H, S] -> (out [B, H, D], lse [B, H]) float32."""
    B, H, S, D = o_part.shape
    out = torch.empty(B, H, D, dtype=torch.float32, device=o_part.device)
    lse = torch.empty(B, H, dtype=torch.float32, device=o_part.device)
    _merge_splits_kernel[(B * H,)](
        o_part, l_part, out, lse, S, H, *o_part.stride()[:3], *l_part.stride(),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        D=D, BLOCK_S=max(2, triton.next_power_of_2(S)), BLOCK_D=triton.next_power_of_2(D))
    return out, lse


def _partials(B: int, H: int, S: int, D: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(B, H, S, D, dtype=torch.float32, device=device),
            torch.empty(B, H, S, dtype=torch.float32, device=device))


def _split_plan(work: int, max_tokens: int, device, requested: int | None,
                block: int) -> tuple[int, int]:
    """(number of splits, tokens per split, a multiple of `block`)."""
    if requested is not None and not (isinstance(requested, int) and requested >= 1):
        raise ValueError(f"splits must be a positive int or None, got {requested!r}")
    s = requested if requested is not None else num_splits(work, max_tokens, device)
    split_len = max(block, triton.cdiv(triton.cdiv(max(max_tokens, 1), s), block) * block)
    return triton.cdiv(max(max_tokens, 1), split_len), split_len


def paged_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        page_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                        splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`paged_decode_ref`'s contract: (out float32 [B, H, D], lse float32 [B, H]).
    `splits` forces the number of KV splits (default: enough programs to fill the GPU).
    seq_lens[b] must not exceed what page_table[b] holds: not checked, as that would cost
    a host sync per layer (the cascade launcher checks it with the sync it needs)."""
    _check_q(q, k_cache, v_cache)
    B = q.shape[0]
    check_int("page_table", page_table, 2, q.device, rows=B)
    check_int("seq_lens", seq_lens, 1, q.device, rows=B)
    max_tokens = page_table.shape[1] * k_cache.shape[1]
    s, split_len = _split_plan(B * k_cache.shape[2], max_tokens, q.device, splits,
                               DECODE_BLOCK_N)
    o_part, l_part = _partials(B, q.shape[1], s, q.shape[2], q.device)
    _launch_paged(q, k_cache, v_cache, page_table, seq_lens, scale, o_part, l_part, s,
                  split_len)
    return _merge(o_part, l_part)


def shared_prefix_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         group_rows: torch.Tensor, prefix_pages: torch.Tensor,
                         prefix_lens: torch.Tensor, scale: float, splits: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """`shared_prefix_ref`'s contract (rows in no group: out 0, lse -inf)."""
    _check_q(q, k_cache, v_cache)
    o_part, l_part, _ = _prefix_partials(q, k_cache, v_cache, group_rows, prefix_pages,
                                             prefix_lens, scale, 0, splits)
    return _merge(o_part, l_part)


def _prefix_partials(q, k_cache, v_cache, group_rows, prefix_pages, prefix_lens, scale,
                     extra_splits: int, splits: int | None, suffix=None,
                     padded: bool | None = None):
    """Runs stage 1 into a fresh partials buffer with `extra_splits` free split slots after
    the prefix splits (`suffix`: checked with the groups, see `_check_groups`; `padded`
    given: the caller vouches for the bounds, nothing is checked). Returns (o_part, l_part,
    number of prefix splits)."""
    B, H, D = q.shape
    check_int("group_rows", group_rows, 2, q.device)
    G = group_rows.shape[0]
    check_int("prefix_pages", prefix_pages, 2, q.device, rows=G)
    check_int("prefix_lens", prefix_lens, 1, q.device, rows=G)
    r = H // k_cache.shape[2]
    max_tokens = prefix_pages.shape[1] * k_cache.shape[1]
    work = G * k_cache.shape[2] * triton.cdiv(max(group_rows.shape[1] * r, 1), PREFIX_BLOCK_M)
    s, split_len = _split_plan(work, max_tokens, q.device, splits, prefix_block_n(q.dtype))
    o_part, l_part = _partials(B, H, s + extra_splits, D, q.device)
    if padded is None:
        padded = _check_groups(group_rows, prefix_lens, B, max_tokens, suffix)
    if G * group_rows.shape[1] < B or padded:
        o_part[:, :, :s].zero_()  # rows outside every group: an empty prefix
        l_part[:, :, :s].fill_(-math.inf)
    if G > 0:
        _launch_prefix(q, k_cache, v_cache, group_rows, prefix_pages, prefix_lens, scale,
                       o_part, l_part, s, split_len)
    return o_part, l_part, s


def _check_groups(group_rows: torch.Tensor, prefix_lens: torch.Tensor, B: int,
                  max_tokens: int, suffix: tuple[torch.Tensor, int] | None) -> bool:
    """Raises unless every group row is -1 or a row of q and every prefix (and suffix:
    (suffix_lens, tokens its pages hold)) fits its pages: else the kernels would write or
    read out of bounds. One host sync (the launcher needs one anyway, to know whether to
    clear the prefix partials). A row listed twice is not detected. Returns whether some
    group row is padding (-1)."""
    if group_rows.numel() == 0:
        return False
    stats = [*torch.aminmax(group_rows), prefix_lens.max()]
    if suffix is not None:
        stats.append(suffix[0].max())
    bounds = torch.stack(stats).tolist()  # stack promotes int32 to int64
    if bounds[0] < -1 or bounds[1] >= B:
        raise ValueError(f"group_rows must be -1 (padding) or rows of q in [0, {B}), got "
                         f"values in [{bounds[0]}, {bounds[1]}]")
    if bounds[2] > max_tokens:
        raise ValueError(f"a prefix of {bounds[2]} tokens does not fit its prefix_pages "
                         f"({max_tokens} tokens)")
    if suffix is not None and bounds[3] > suffix[1]:
        raise ValueError(f"a suffix of {bounds[3]} tokens does not fit its suffix_pages "
                         f"({suffix[1]} tokens)")
    return bounds[0] < 0


def merge_states_triton(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor,
                        lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`merge_states_ref`'s contract for float32 o [..., d] and lse [...] (stacks the two
    sides, then merges them with the split-merge kernel)."""
    for name, t in (("lse_a", lse_a), ("o_b", o_b), ("lse_b", lse_b), ("o_a", o_a)):
        if t.dtype != torch.float32 or t.device != o_a.device:
            raise ValueError(f"{name} must be float32 on {o_a.device}, got {t.dtype} on "
                             f"{t.device}")
    check_device("o_a", o_a)
    if o_a.shape != o_b.shape or lse_a.shape != lse_b.shape or o_a.shape[:-1] != lse_a.shape:
        raise ValueError(f"shapes do not match: o {tuple(o_a.shape)}/{tuple(o_b.shape)}, "
                         f"lse {tuple(lse_a.shape)}/{tuple(lse_b.shape)}")
    lead, d = o_a.shape[:-1], o_a.shape[-1]
    o = torch.stack((o_a.reshape(-1, d), o_b.reshape(-1, d)), dim=1)[:, None]
    lse = torch.stack((lse_a.reshape(-1), lse_b.reshape(-1)), dim=1)[:, None]
    out, l_out = _merge(o, lse)
    return out.view(*lead, d), l_out.view(lead)


def cascade_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          group_rows: torch.Tensor, prefix_pages: torch.Tensor,
                          prefix_lens: torch.Tensor, suffix_pages: torch.Tensor,
                          suffix_lens: torch.Tensor, scale: float,
                          paged_fn=None, prefix_splits: int | None = None,
                          suffix_splits: int | None = None,
                          padded: bool | None = None) -> torch.Tensor:
    """`cascade_decode_ref`'s contract -> out float32 [B, H, D]. The prefix and suffix
    stages write into one partials buffer, merged once. `paged_fn` is accepted for
    signature compatibility and ignored (the suffix stage is always the Triton kernel).

    `padded` None: the metadata's bounds are checked on the device, one host sync per
    call (`_check_groups`). A bool (whether some group row is -1 padding): the caller
    built the metadata on the host and vouches that every group row is -1 or a row of q
    and every prefix and suffix fits its pages, so nothing waits on the device; the
    engine does this, once per step rather than once per layer. Wrong bounds then read
    or write out of bounds."""
    _check_q(q, k_cache, v_cache)
    B = q.shape[0]
    if group_rows.shape[0] == 0:
        return paged_decode_triton(q, k_cache, v_cache, suffix_pages, suffix_lens, scale,
                                   suffix_splits)[0]
    check_int("suffix_pages", suffix_pages, 2, q.device, rows=B)
    check_int("suffix_lens", suffix_lens, 1, q.device, rows=B)
    max_suffix = suffix_pages.shape[1] * k_cache.shape[1]
    ss, split_len = _split_plan(B * k_cache.shape[2], max_suffix, q.device, suffix_splits,
                                DECODE_BLOCK_N)
    o_part, l_part, sp = _prefix_partials(q, k_cache, v_cache, group_rows, prefix_pages,
                                          prefix_lens, scale, ss, prefix_splits,
                                          (suffix_lens, max_suffix), padded)
    _launch_paged(q, k_cache, v_cache, suffix_pages, suffix_lens, scale, o_part[:, :, sp:],
                  l_part[:, :, sp:], ss, split_len)
    return _merge(o_part, l_part)[0]
