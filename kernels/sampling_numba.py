"""CPU fast path of the sampler (see kernels/sampling.py for the definition): one fused,
row-parallel kernel that finds the max, accumulates the float64 weights of allowed
tokens and of the whole vocabulary in index order (the log-sum-exp of the logprob comes
from the same pass), then walks the cumulative sum to the drawn token. Imported lazily:
compiling takes about a second on first use (cached on disk afterwards)."""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import njit, prange

from kernels.sampling import uniforms


@njit(parallel=True, cache=True)
def _inverse_cdf_kernel(z, thr, u, out_tok, out_lse):
    B, V = z.shape
    for b in prange(B):
        m = -math.inf
        for i in range(V):
            if z[b, i] > m:
                m = z[b, i]
        m64 = np.float64(m)
        t = thr[b]
        total = 0.0
        allowed = 0.0
        for i in range(V):
            e = math.exp(np.float64(z[b, i]) - m64)
            total += e
            if z[b, i] >= t:
                allowed += e
        out_lse[b] = m64 + math.log(total)
        target = u[b] * allowed
        c = 0.0
        tok = V - 1
        for i in range(V):
            if z[b, i] >= t:
                c += math.exp(np.float64(z[b, i]) - m64)
                if c > target:
                    tok = i
                    break
        out_tok[b] = tok


def inverse_cdf_numba(z: torch.Tensor, thr: torch.Tensor,
                      keys: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Same results as `inverse_cdf_ref`: (tokens int64 [B], float64 log-sum-exp [B])."""
    if z.device.type != "cpu" or z.dtype != torch.float32:
        raise ValueError(f"numba sampler needs float32 CPU logits, got {z.dtype} on {z.device}")
    B = z.shape[0]
    tok = np.empty(B, dtype=np.int64)
    lse = np.empty(B, dtype=np.float64)
    _inverse_cdf_kernel(z.contiguous().numpy(), thr.float().contiguous().numpy(),
                        uniforms(keys), tok, lse)
    return torch.from_numpy(tok), torch.from_numpy(lse)


def set_num_threads(n: int) -> None:
    numba.set_num_threads(n)
