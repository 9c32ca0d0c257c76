"""CPU fast path of paged decode attention (same contract as `paged_decode_ref`): one
fused, parallel kernel per (row, KV head) that reads K/V straight from the pages (no
gather), computes the scores of the query heads sharing that KV head, a two-pass
softmax and the weighted sum of V. float32 only. Imported lazily (compiles on first use,
then cached on disk)."""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange


@njit(parallel=True, fastmath=True, cache=True)
def _paged_decode_kernel(q, kc, vc, pt, lens, scale, out, lse):
    B, H, D = q.shape
    PS, HKV = kc.shape[1], kc.shape[2]
    R = H // HKV
    for bg in prange(B * HKV):
        b, g = bg // HKV, bg % HKV
        n = lens[b]
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


def paged_decode_numba(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       page_table: torch.Tensor, seq_lens: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out float32 [B, H, D], lse float32 [B, H]) as `paged_decode_ref` returns."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"numba decode attention needs float32 CPU tensors, {name} is "
                             f"{t.dtype} on {t.device}")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"{q.shape[1]} query heads do not group over {k_cache.shape[2]} "
                         f"KV heads")
    B, H, D = q.shape
    out = np.empty((B, H, D), dtype=np.float32)
    lse = np.empty((B, H), dtype=np.float32)
    _paged_decode_kernel(q.contiguous().numpy(), k_cache.numpy(), v_cache.numpy(),
                         page_table.contiguous().numpy(), seq_lens.contiguous().numpy(),
                         np.float32(scale), out, lse)
    return torch.from_numpy(out), torch.from_numpy(lse)
