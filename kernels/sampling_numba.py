"""CPU fast path of the sampler (see kernels/sampling.py for the definition): one fused,
row-parallel kernel per batch, vectorised (AVX2/AVX-512 through LLVM).

Per row it scales the logits by the temperature (float32 division, as the definition
says), takes the max, and computes each float64 weight exp(z_i - m) once with a
vectorisable exp (Cody-Waite reduction, degree-13 Taylor polynomial, exponent built from
bits: within 1 ulp of libm; weights below exp(-708) count as 0, which cannot change a
float64 sum that holds the max's weight 1). The whole-vocabulary sum (for the logprob's
log-sum-exp) and the allowed sum are vectorised reductions; the cumulative walk goes a
block at a time and then token by token inside the block that crosses u * total. The
summation order therefore differs from the reference's index-order cumsum, which the
definition allows: draws agree unless u * c lies within ~1e-16 of a boundary. Greedy
rows skip the walk and take the first argmax.

Imported lazily: compiling takes a few seconds on first use (cached on disk
afterwards)."""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from brorl.kernels.sampling import uniforms

_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that k * _LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10
_BLOCK = 64  # tokens per block of the cumulative walk


@intrinsic
def _bits_as_f64(typingctx, bits):
    """Reinterprets an int64 as the float64 with the same bits (LLVM bitcast)."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


@njit(fastmath={"contract"}, cache=True)
def _exp_nonpositive(x):
    """exp(x) for x <= 0 (-inf and anything below -708 give 0), vectorisable. No
    reassociation is allowed here: it would fold the two halves of ln 2 together."""
    xc = max(x, -708.0)
    k = math.floor(xc * _LOG2E + 0.5)
    r = (xc - k * _LN2_HI) - k * _LN2_LO
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    e = p * _bits_as_f64((np.int64(k) + 1023) << 52)
    return e if x >= -708.0 else 0.0


@njit(parallel=True, fastmath={"reassoc", "contract"}, cache=True)
def _sample_kernel(x, temperature, thr, u, out_tok, out_lse, out_lp):
    B, V = x.shape
    for b in prange(B):
        greedy = temperature[b] == 0
        t = np.float32(1.0) if greedy else np.float32(temperature[b])
        z = np.empty(V, dtype=np.float32)
        m = np.float32(-np.inf)
        for i in range(V):
            z[i] = x[b, i] / t
            m = max(m, z[i])
        m64 = np.float64(m)
        cut = thr[b]
        w = np.empty(V, dtype=np.float64)
        total = 0.0
        allowed = 0.0
        for i in range(V):
            e = _exp_nonpositive(np.float64(z[i]) - m64)
            total += e
            a = e if z[i] >= cut else 0.0
            w[i] = a
            allowed += a
        lse = m64 + math.log(total)
        tok = -1
        if greedy:  # the first NaN if there is one (as torch.argmax), else the first max
            first_max = -1
            for i in range(V):
                if z[i] != z[i]:
                    tok = i
                    break
                if first_max < 0 and z[i] == m:
                    first_max = i
            if tok < 0:
                tok = max(first_max, 0)
        else:
            target = u[b] * allowed
            c = 0.0
            for start in range(0, V, _BLOCK):
                stop = min(start + _BLOCK, V)
                s = 0.0
                for i in range(start, stop):
                    s += w[i]
                if c + s > target:
                    for i in range(start, stop):
                        c += w[i]
                        if w[i] > 0.0 and c > target:
                            tok = i
                            break
                    if tok >= 0:
                        break
                else:
                    c += s
            if tok < 0:  # u * allowed rounded onto the sum: the last allowed token
                for i in range(V - 1, -1, -1):
                    if w[i] > 0.0:
                        tok = i
                        break
                if tok < 0:
                    tok = V - 1
        out_tok[b] = tok
        out_lse[b] = lse
        out_lp[b] = np.float32(np.float64(z[tok]) - lse)


def sample_numba(x: torch.Tensor, temperature: torch.Tensor, thr: torch.Tensor | None,
                 keys: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draws one token per row of x [B, V] (raw logits, scaled here by `temperature`;
    0 = greedy). thr: per-row threshold on the scaled logits (None: no truncation).
    Returns (tokens int64 [B], float64 log-sum-exp [B], behaviour logprobs float32 [B]),
    equal to the reference's."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise ValueError(f"numba sampler needs float32 CPU logits, got {x.dtype} on {x.device}")
    # the kernel has no bounds checks: every per-row input must have B entries
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"logits must be [B, V] with V >= 1, got {tuple(x.shape)}")
    B = x.shape[0]
    keys = np.asarray(keys)
    for name, t in (("temperature", temperature), ("thr", thr), ("keys", keys)):
        if t is not None and tuple(t.shape) != (B,):
            raise ValueError(f"{name} must have shape ({B},), got {tuple(t.shape)}")
    tok = np.empty(B, dtype=np.int64)
    lse = np.empty(B, dtype=np.float64)
    lp = np.empty(B, dtype=np.float32)
    cut = (np.full(B, -np.inf, dtype=np.float32) if thr is None
           else thr.float().contiguous().numpy())
    _sample_kernel(x.contiguous().numpy(), temperature.float().contiguous().numpy(), cut,
                   uniforms(keys), tok, lse, lp)
    return torch.from_numpy(tok), torch.from_numpy(lse), torch.from_numpy(lp)


def set_num_threads(n: int) -> None:
    numba.set_num_threads(n)
