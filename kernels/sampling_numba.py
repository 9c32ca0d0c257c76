"""CPU fast path of the Gumbel-max sampler (see kernels/sampling.py for the definition):
one fused pass per row, parallel over rows, that skips tokens which cannot win
(z_i + GUMBEL_MAX <= best so far), so peaked distributions cost little. Imported lazily:
compiling takes about a second on first use."""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import njit, prange

from kernels.sampling import GUMBEL_MAX, split_keys

# uint32 arithmetic done in uint64 with explicit masks: numba widens small integer
# products, so wrap-around must be spelled out.
_M32 = np.uint64(0xFFFFFFFF)


@njit(inline="always")
def _fmix32(h):
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & _M32
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & _M32
    return h ^ (h >> np.uint64(16))


@njit(inline="always")
def _gumbel(lo, hi, i):
    h = _fmix32(np.uint64(lo) ^ ((np.uint64(i) * np.uint64(0x9E3779B1)) & _M32))
    h = _fmix32(h ^ np.uint64(hi))
    u = (np.float64(h >> np.uint64(8)) + 0.5) * (1.0 / 16777216.0)
    return -math.log(-math.log(u))


@njit(parallel=True, cache=True)
def _gumbel_argmax_kernel(z, thr, lo, hi, gmax, out):
    B, V = z.shape
    for b in prange(B):
        t = thr[b]
        if t == math.inf:  # greedy row, handled by the caller
            out[b] = 0
            continue
        # Warm start from the largest logit so most tokens can be skipped at once.
        arg = 0
        zmax = -math.inf
        for i in range(V):
            if z[b, i] > zmax:
                zmax = z[b, i]
                arg = i
        best = np.float64(zmax) + _gumbel(lo[b], hi[b], arg)
        for i in range(V):
            zi = np.float64(z[b, i])
            if zi < t or zi + gmax < best or i == arg:
                continue
            s = zi + _gumbel(lo[b], hi[b], i)
            if s > best or (s == best and i < arg):
                best = s
                arg = i
        out[b] = arg


def gumbel_argmax_numba(z: torch.Tensor, thr: torch.Tensor, keys: np.ndarray) -> torch.Tensor:
    """Same result as `gumbel_argmax_ref` (first argmax over z >= thr of z + noise).
    Rows with thr == +inf are skipped (return 0). z float32 [B, V] on CPU."""
    if z.device.type != "cpu" or z.dtype != torch.float32:
        raise ValueError(f"numba sampler needs float32 CPU logits, got {z.dtype} on {z.device}")
    zn = z.contiguous().numpy()
    lo, hi = split_keys(keys)
    out = np.empty(z.shape[0], dtype=np.int64)
    _gumbel_argmax_kernel(zn, thr.float().contiguous().numpy(), lo, hi, GUMBEL_MAX, out)
    return torch.from_numpy(out)


def set_num_threads(n: int) -> None:
    numba.set_num_threads(n)
