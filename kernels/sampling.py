"""Sampling: temperature, top-k / top-p / min-p truncation and Gumbel-max with a
counter-based noise, plus the behaviour logprob of the sampled token.

The definition every implementation (torch reference, numba CPU path, Triton) follows:

  z_i     = float32(logits_i) / float32(temperature)            (float32 division)
  thr     = a per-row logit threshold; a token survives truncation iff z_i >= thr
            (top-k, top-p and min-p each keep a top set by value, so their intersection
            is again a threshold: see `truncation_threshold_ref`)
  key     = splitmix64 chain of (seed, request, sample, position)   (`row_keys`)
  h_i     = fmix32(fmix32(key_lo ^ (i * 0x9E3779B1)) ^ key_hi)      (uint32 arithmetic)
  u_i     = ((h_i >> 8) + 0.5) / 2**24                               (exact in float64)
  g_i     = -log(-log(u_i))                                          (float64)
  token   = first argmax over surviving i of float64(z_i) + g_i
  logprob = z_token - logsumexp(z)        (full vocabulary, before truncation)

Greedy rows (temperature 0) take the first argmax of the logits and report
log_softmax(logits) at it. Because the noise of a row depends only on its key, results
do not depend on which other rows share the batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_M32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B1
# Largest noise the 24-bit uniform can produce: lets fast paths skip tokens exactly.
GUMBEL_MAX = -math.log(-math.log((2**24 - 1 + 0.5) / 2**24))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_keys(seed, request, sample, position) -> np.ndarray:
    """64-bit noise keys, one per row, from equal-length integer sequences (or scalars)."""
    parts = [np.atleast_1d(np.asarray(p, dtype=np.uint64))
             for p in (seed, request, sample, position)]
    key = _splitmix64(parts[0])
    for p in parts[1:]:
        key = _splitmix64(key ^ p)
    return key


def split_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint64 keys -> (low, high) 32-bit halves as uint32 arrays."""
    keys = np.asarray(keys, dtype=np.uint64)
    return ((keys & np.uint64(_M32)).astype(np.uint32),
            (keys >> np.uint64(32)).astype(np.uint32))


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    # int64 container holding uint32 values: products wrap in two's complement and the
    # low 32 bits stay exact after masking.
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def gumbel_noise_ref(keys: np.ndarray, vocab_size: int, device="cpu") -> torch.Tensor:
    """float64 Gumbel noise [B, vocab_size] for the given uint64 row keys."""
    lo, hi = split_keys(keys)
    lo = torch.from_numpy(lo.astype(np.int64)).to(device)[:, None]
    hi = torch.from_numpy(hi.astype(np.int64)).to(device)[:, None]
    tok = torch.arange(vocab_size, dtype=torch.int64, device=device)[None, :]
    h = _fmix32(lo ^ ((tok * _GOLDEN32) & _M32))
    h = _fmix32(h ^ hi)
    u = ((h >> 8).to(torch.float64) + 0.5) * (1.0 / 2**24)
    return -torch.log(-torch.log(u))


def scaled_logits(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """z = logits / T in float32; greedy rows (T == 0) keep T = 1."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return logits.float() / t.float()[:, None]


def truncation_threshold_ref(z: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                             min_p: torch.Tensor) -> torch.Tensor:
    """Per-row threshold [B] such that tokens with z >= thr survive truncation.

    top-k keeps z >= the k-th largest value; top-p (applied after top-k, on renormalised
    probabilities) keeps the smallest top set whose mass reaches top_p; min-p keeps
    p >= min_p * p_max, i.e. z >= z_max + log(min_p). Ties at a threshold are kept.
    """
    B, V = z.shape
    thr = torch.full((B,), -math.inf, dtype=z.dtype, device=z.device)
    k_on = top_k > 0
    if bool(k_on.any()):
        k = top_k.clamp(1, V)
        kth = torch.topk(z, int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])[:, 0]
        thr = torch.where(k_on, kth, thr)
    p_on = top_p < 1.0
    if bool(p_on.any()):
        rows = p_on.nonzero()[:, 0]
        zr = z[rows]
        zr = torch.where(zr >= thr[rows, None], zr, torch.full_like(zr, -math.inf))
        sorted_z, _ = torch.sort(zr, dim=-1, descending=True)
        cum = torch.softmax(sorted_z, dim=-1).cumsum(-1)
        idx = torch.searchsorted(cum, top_p[rows].to(cum.dtype)[:, None]).clamp(max=V - 1)
        thr[rows] = torch.maximum(thr[rows], sorted_z.gather(1, idx)[:, 0])
    m_on = min_p > 0
    if bool(m_on.any()):
        zmax = z.max(dim=-1).values
        thr = torch.where(m_on, torch.maximum(thr, zmax + torch.log(min_p.to(z.dtype))), thr)
    return thr


def gumbel_argmax_ref(z: torch.Tensor, thr: torch.Tensor, keys: np.ndarray) -> torch.Tensor:
    """First argmax of float64(z) + Gumbel noise over tokens with z >= thr."""
    score = z.double() + gumbel_noise_ref(keys, z.shape[1], z.device)
    score = score.masked_fill(z < thr[:, None], -math.inf)
    return score.argmax(dim=-1)


def sample_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
               top_p: torch.Tensor, min_p: torch.Tensor, keys: np.ndarray,
               banned: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference sampler. logits [B, V]; per-row parameters [B]; keys uint64 [B];
    banned [B, V] bool (tokens that may not be drawn, e.g. EOS before min_tokens).
    Returns (tokens int64 [B], behaviour logprobs float32 [B])."""
    z = scaled_logits(logits, temperature)
    zb = z if banned is None else z.masked_fill(banned, -math.inf)
    thr = truncation_threshold_ref(zb, top_k, top_p, min_p)
    tokens = gumbel_argmax_ref(zb, thr, keys)
    greedy = temperature == 0
    if bool(greedy.any()):
        tokens = torch.where(greedy, zb.argmax(dim=-1), tokens)
    return tokens, _token_logprobs(z, tokens)


def _token_logprobs(z: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return (z.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(z, dim=-1)).float()


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, min_p: torch.Tensor, keys: np.ndarray,
           banned: torch.Tensor | None = None, impl: str = "auto"
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `sample_ref`. impl: "auto" (numba on CPU when installed, else the
    reference), "torch" or "numba"."""
    if impl not in ("auto", "torch", "numba"):
        raise ValueError(f"unknown sampling impl {impl!r}; supported: auto, torch, numba")
    if logits.dim() != 2 or len(keys) != logits.shape[0]:
        raise ValueError(f"logits must be [B, V] with one key per row, got {tuple(logits.shape)}"
                         f" and {len(keys)} keys")
    if impl == "auto":
        impl = "numba" if logits.device.type == "cpu" and _numba_available() else "torch"
    if impl == "torch":
        return sample_ref(logits, temperature, top_k, top_p, min_p, keys, banned)
    from kernels.sampling_numba import gumbel_argmax_numba

    z = scaled_logits(logits, temperature)
    zb = z if banned is None else z.masked_fill(banned, -math.inf)
    thr = truncation_threshold_ref(zb, top_k, top_p, min_p)
    greedy = temperature == 0
    thr = torch.where(greedy, torch.full_like(thr, math.inf), thr)  # greedy rows: skip noise
    tokens = gumbel_argmax_numba(zb, thr, keys)
    if bool(greedy.any()):
        tokens = torch.where(greedy, zb.argmax(dim=-1), tokens)
    return tokens, _token_logprobs(z, tokens)


def _numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True
