"""CPU fast path of paged decode attention (same contract as `paged_decode_ref`): one
fused, parallel kernel per (row, KV head) that reads K/V straight from the pages (no
gather), computes the scores of the query heads sharing that KV head, a two-pass
softmax and the weighted sum of V. float32 only. Imported lazily (compiles on first use,
then cached on disk, in kernels/__pycache__, keyed by this file's path and modification
time)."""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange


@njit(parallel=True, fastmath=True, cache=True)
def _paged_decode_kernel(q, kc, vc, pt, lens, scale, out, lse, bad):
    B, H, D = q.shape
    NP, PS, HKV = kc.shape[0], kc.shape[1], kc.shape[2]
    R = H // HKV
    for bg in prange(B * HKV):
        b, g = bg // HKV, bg % HKV
        n = lens[b]
        # bounds of what this row reads, checked before it reads: bad[b] = 1 for a length
        # outside its table, 2 for a page id outside the pool (the launcher raises)
        if n < 0 or n > pt.shape[1] * PS:
            bad[b] = 1
            n = 0
        for p in range((n + PS - 1) // PS):
            if pt[b, p] < 0 or pt[b, p] >= NP:
                bad[b] = 2
                n = 0
        if n == 0:
            for j in range(R):
                out[b, g * R + j, :] = 0.0
                lse[b, g * R + j] = -np.inf
            continue
        sc = np.empty((R, n), dtype=np.float32)
        for t in range(n):
            page, off = pt[b, t // PS], t % PS
            for j in range(R):
                dot = np.float32(0.0)
                for d in range(D):
                    dot += q[b, g * R + j, d] * kc[page, off, g, d]
                sc[j, t] = dot * scale
        for j in range(R):
            h = g * R + j
            m = sc[j, 0]
            for t in range(1, n):
                m = max(m, sc[j, t])
            s = np.float32(0.0)
            for t in range(n):
                e = np.exp(sc[j, t] - m)
                sc[j, t] = e
                s += e
            lse[b, h] = m + np.log(s)
            inv = np.float32(1.0) / s
            out[b, h, :] = 0.0
            for t in range(n):
                page, off = pt[b, t // PS], t % PS
                p = sc[j, t] * inv
                for d in range(D):
                    out[b, h, d] += p * vc[page, off, g, d]


def _check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  page_table: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """Dtypes, devices and shapes; the kernel checks the page ids and lengths it reads."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"numba decode attention needs float32 CPU tensors, {name} is "
                             f"{t.dtype} on {t.device}")
    for name, t in (("page_table", page_table), ("seq_lens", seq_lens)):
        if (t.device.type != "cpu" or t.is_floating_point() or t.is_complex()
                or t.dtype == torch.bool):
            raise ValueError(f"{name} must be an integer CPU tensor, got {t.dtype} on "
                             f"{t.device}")
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"need q [B, H, D] and k_cache, v_cache [pages, page_size, kv_heads, "
                         f"D], got {tuple(q.shape)}, {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    B, H, D = q.shape
    num_pages, ps, hkv, dk = k_cache.shape
    if dk != D or ps < 1 or hkv < 1:
        raise ValueError(f"q {tuple(q.shape)} does not fit k_cache {tuple(k_cache.shape)}")
    if H % hkv:
        raise ValueError(f"{H} query heads do not group over {hkv} KV heads")
    if page_table.dim() != 2 or page_table.shape[0] != B or seq_lens.shape != (B,):
        raise ValueError(f"need page_table [{B}, P] and seq_lens [{B}], got "
                         f"{tuple(page_table.shape)} and {tuple(seq_lens.shape)}")


def paged_decode_numba(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       page_table: torch.Tensor, seq_lens: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out float32 [B, H, D], lse float32 [B, H]) as `paged_decode_ref` returns.
    Raises ValueError on bad dtypes, devices, shapes and lengths, IndexError on page ids
    outside the pool among those a row reads (table entries past a row's length are never
    read and may hold anything; the reference asks every entry to be a valid page id)."""
    _check_inputs(q, k_cache, v_cache, page_table, seq_lens)
    B, H, D = q.shape
    out = np.empty((B, H, D), dtype=np.float32)
    lse = np.empty((B, H), dtype=np.float32)
    bad = np.zeros(B, dtype=np.int8)
    # int64 index arrays: one compiled signature whatever integer type the caller used
    table = page_table.to(torch.int64).contiguous().numpy()
    lens = seq_lens.to(torch.int64).contiguous().numpy()
    _paged_decode_kernel(q.detach().contiguous().numpy(), k_cache.detach().numpy(),
                         v_cache.detach().numpy(), table, lens, np.float32(scale), out, lse,
                         bad)
    if bad.any():
        _raise_bounds(bad, table, lens, k_cache.shape[0], k_cache.shape[1])
    return torch.from_numpy(out), torch.from_numpy(lse)


def _raise_bounds(bad: np.ndarray, table: np.ndarray, lens: np.ndarray, num_pages: int,
                  page_size: int) -> None:
    """The error for the first row the kernel refused to read (see `bad` there)."""
    b = int(np.flatnonzero(bad)[0])
    if bad[b] == 1:
        raise ValueError(f"seq_lens[{b}] = {int(lens[b])} outside [0, pages * page_size = "
                         f"{table.shape[1] * page_size}]")
    ids = table[b, :-(-int(lens[b]) // page_size)]
    raise IndexError(f"page_table row {b} holds ids in [{int(ids.min())}, {int(ids.max())}], "
                     f"outside [0, {num_pages})")
