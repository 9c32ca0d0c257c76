"""Sampling: temperature, top-k / top-p / min-p truncation and inverse-transform
sampling with a counter-based uniform, plus the behaviour logprob of the sampled token.

The definition every implementation (torch reference, numba CPU path, GPU kernels)
follows, row by row:

  z_i     = float32(logits_i) / float32(temperature)            (float32 division)
  thr     = a logit threshold; token i survives truncation iff z_i >= thr
            (top-k, top-p and min-p each keep a top set by value, so their intersection
            is again a threshold: see `truncation_threshold_ref`)
  key     = splitmix64 chain of (seed, request, sample, position)   (`row_keys`)
  u       = (key >> 11) / 2**53                                      (uniform in [0, 1))
  m       = max_i z_i;  w_i = exp(float64(z_i) - m) if z_i >= thr else 0
  c_i     = w_0 + ... + w_i, summed in float64 in index order
  token   = the smallest i with c_i > u * c_{V-1}
  logprob = z_token - (m + log(sum_i exp(float64(z_i) - m)))   (full vocabulary)

Greedy rows (temperature 0) take the first argmax of the logits and report
log_softmax(logits) at it. A row's draw depends only on its logits and its key, never on
the other rows of the batch. Summation in float64 makes implementations agree exactly
unless u * c lands within ~1e-16 of a boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from brorl.kernels.transfer import upload


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_keys(seed, request, sample, position) -> np.ndarray:
    """64-bit keys (uint64 [B]), one per row, from equal-length integer sequences or
    scalars."""
    parts = [np.atleast_1d(np.asarray(p, dtype=np.uint64))
             for p in (seed, request, sample, position)]
    key = _splitmix64(parts[0])
    for p in parts[1:]:
        key = _splitmix64(key ^ p)
    return key


@dataclass(frozen=True)
class HostFlags:
    """What the caller knows on the host about a batch's per-row parameters, so that the
    reference samplers pick their branches without reading device values (each read is a
    host sync on a GPU). Without it they read the parameter tensors. The float parameters
    must be judged in float32, as the tensors hold them."""

    top_k_max: int  # the largest top_k of the rows (<= 0: no row truncates by top-k)
    top_p_rows: torch.Tensor | None  # int64 [n] rows with top_p < 1, ascending; None: none
    min_p: bool  # some row has min_p > 0
    greedy: bool  # some row has temperature 0
    row_counts: list[int] | None = None  # sample_rows_ref: the samples drawing from each row


def uniforms(keys: np.ndarray) -> np.ndarray:
    """float64 uniforms in [0, 1) from uint64 keys (their top 53 bits)."""
    return (np.asarray(keys, dtype=np.uint64) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def scaled_logits(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """z = logits / T in float32; greedy rows (T == 0) keep T = 1."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return logits.float() / t.float()[:, None]


def truncation_threshold_ref(z: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                             min_p: torch.Tensor, host: HostFlags | None = None
                             ) -> torch.Tensor:
    """Per-row threshold [B] such that tokens with z >= thr survive truncation.

    top-k keeps z >= the k-th largest value; top-p (applied after top-k, on renormalised
    probabilities) keeps the smallest top set whose mass reaches top_p; min-p keeps
    p >= min_p * p_max, i.e. z >= z_max + log(min_p). Ties at a threshold are kept.
    With `host` the branches are decided from it, reading nothing from the device.
    """
    B, V = z.shape
    thr = torch.full((B,), -math.inf, dtype=z.dtype, device=z.device)
    k_on = top_k > 0
    if bool(k_on.any()) if host is None else host.top_k_max > 0:
        k = top_k.clamp(1, V)
        k_max = int(k.max()) if host is None else min(max(host.top_k_max, 1), V)
        kth = torch.topk(z, k_max, dim=-1).values.gather(1, (k - 1)[:, None])[:, 0]
        thr = torch.where(k_on, kth, thr)
    if host is None:
        p_on = top_p < 1.0
        rows = p_on.nonzero()[:, 0] if bool(p_on.any()) else None
    else:
        rows = host.top_p_rows
    if rows is not None:
        zr = z[rows]
        zr = torch.where(zr >= thr[rows, None], zr, torch.full_like(zr, -math.inf))
        sorted_z, _ = torch.sort(zr, dim=-1, descending=True)
        cum = torch.softmax(sorted_z, dim=-1).cumsum(-1)
        idx = torch.searchsorted(cum, top_p[rows].to(cum.dtype)[:, None]).clamp(max=V - 1)
        thr[rows] = torch.maximum(thr[rows], sorted_z.gather(1, idx)[:, 0])
    m_on = min_p > 0
    if bool(m_on.any()) if host is None else host.min_p:
        zmax = z.max(dim=-1).values
        thr = torch.where(m_on, torch.maximum(thr, zmax + torch.log(min_p.to(z.dtype))), thr)
    return thr


def inverse_cdf_ref(z: torch.Tensor, thr: torch.Tensor,
                    keys: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens drawn by the definition above, and float64 log-sum-exp of z per row."""
    c, lse = _cumulative_weights(z, thr)
    u = upload([uniforms(keys)], z.device)[0]
    target = (u * c[:, -1])[:, None]
    tokens = (c <= target).sum(-1).clamp(max=z.shape[1] - 1)
    return tokens, lse


def _cumulative_weights(z: torch.Tensor, thr: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """c [B, V] (the float64 cumulative weights of the tokens that survive truncation, in
    index order) and the float64 log-sum-exp of z per row, as the definition says."""
    z64 = z.double()
    m = z64.max(dim=-1, keepdim=True).values
    e = torch.exp(z64 - m)
    lse = m[:, 0] + torch.log(e.sum(-1))
    return torch.where(z >= thr[:, None], e, torch.zeros_like(e)).cumsum(-1), lse


def sample_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
               top_p: torch.Tensor, min_p: torch.Tensor, keys: np.ndarray,
               banned: torch.Tensor | None = None, host: HostFlags | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference sampler. logits [B, V]; per-row parameters [B]; keys uint64 [B];
    banned [B, V] bool (tokens that may not be drawn, e.g. EOS before min_tokens); host:
    the parameters' `HostFlags` (then no device value is read).
    Returns (tokens int64 [B], behaviour logprobs float32 [B])."""
    z, zb, thr = _prepare(logits, temperature, top_k, top_p, min_p, banned, host)
    tokens, lse = inverse_cdf_ref(zb, thr, keys)
    if banned is not None:
        lse = _lse64(z)
    return _finish(logits, z, zb, temperature, tokens, lse, host)


def sample_rows_ref(logits: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor,
                    top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                    keys: np.ndarray, banned: torch.Tensor | None = None,
                    host: HostFlags | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The draws of samples that share rows of logits (identical contexts): logits [R, V]
    with per-row parameters [R] and banned [R, V]; rows int64 [B], each sample's row;
    keys uint64 [B], one per sample. Returns what `sample_ref` returns for logits[rows],
    params[rows], banned[rows] and keys, while each row's truncation, weights and
    cumulative sums are computed once and each sample costs a binary search. host: the
    parameters' `HostFlags` with row_counts (then no device value is read)."""
    if logits.dim() != 2 or rows.dim() != 1 or len(keys) != rows.shape[0]:
        raise ValueError(f"need logits [R, V], rows [B] and B keys, got {tuple(logits.shape)}, "
                         f"{tuple(rows.shape)} and {len(keys)} keys")
    V = logits.shape[1]
    z, zb, thr = _prepare(logits, temperature, top_k, top_p, min_p, banned, host)
    c, lse = _cumulative_weights(zb, thr)
    if banned is not None:
        lse = _lse64(z)
    u = upload([uniforms(keys)], logits.device)[0]
    target = u * c[rows, -1]
    tokens = torch.empty(rows.shape, dtype=torch.int64, device=logits.device)
    order = torch.argsort(rows, stable=True)
    counts = (torch.bincount(rows, minlength=logits.shape[0]).tolist()
              if host is None or host.row_counts is None else host.row_counts)
    start = 0
    for r, count in enumerate(counts):  # c[r] is sorted: #{c_i <= t} is a binary search
        if count:
            mine = order[start:start + count]
            tokens[mine] = torch.searchsorted(c[r], target[mine], right=True)
            start += count
    tokens = tokens.clamp(max=V - 1)
    greedy = temperature == 0
    if bool(greedy.any()) if host is None else host.greedy:
        tokens = torch.where(greedy[rows], zb.argmax(dim=-1)[rows], tokens)
    logprobs = (z[rows, tokens].double() - lse[rows]).float()
    return tokens, logprobs


def _prepare(logits, temperature, top_k, top_p, min_p, banned, host=None):
    z = scaled_logits(logits, temperature)
    zb = z if banned is None else z.masked_fill(banned, -math.inf)
    return z, zb, truncation_threshold_ref(zb, top_k, top_p, min_p, host)


def _lse64(z: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(z.double(), dim=-1)


def _finish(logits, z, zb, temperature, tokens, lse, host=None):
    greedy = temperature == 0
    if bool(greedy.any()) if host is None else host.greedy:
        tokens = torch.where(greedy, zb.argmax(dim=-1), tokens)
    logprobs = (z.gather(1, tokens[:, None])[:, 0].double() - lse).float()
    return tokens, logprobs


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, min_p: torch.Tensor, keys: np.ndarray,
           banned: torch.Tensor | None = None, impl: str = "auto",
           host: HostFlags | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `sample_ref`. impl: "auto" (the fused Triton kernel on CUDA when
    triton imports, numba on CPU when installed, else the reference), "torch", "numba" or
    "triton". host: the parameters' `HostFlags`, for the reference and numba's truncation
    (the fused Triton kernel reads no device values anyway)."""
    if impl not in ("auto", "torch", "numba", "triton"):
        raise ValueError(f"unknown sampling impl {impl!r}; supported: auto, torch, numba, "
                         f"triton")
    if logits.dim() != 2 or len(keys) != logits.shape[0]:
        raise ValueError(f"logits must be [B, V] with one key per row, got {tuple(logits.shape)}"
                         f" and {len(keys)} keys")
    if impl == "auto":
        impl = _auto_impl(logits.device)
    if impl == "triton":
        from brorl.kernels.sampling_triton import sample_triton

        return sample_triton(logits, temperature, top_k, top_p, min_p, keys, banned)
    if impl == "torch":
        return sample_ref(logits, temperature, top_k, top_p, min_p, keys, banned, host)
    from brorl.kernels.sampling_numba import sample_numba

    if host is None:
        truncating = bool((top_k > 0).any() or (top_p < 1.0).any() or (min_p > 0).any())
    else:
        truncating = host.top_k_max > 0 or host.top_p_rows is not None or host.min_p
    if banned is None and not truncating:  # the common case: one fused pass over raw logits
        tokens, _, logprobs = sample_numba(logits.float(), temperature, None, keys)
        return tokens, logprobs
    z, zb, thr = _prepare(logits, temperature, top_k, top_p, min_p, banned, host)
    greedy = temperature == 0
    tokens, lse, logprobs = sample_numba(zb, torch.where(greedy, 0.0, 1.0), thr, keys)
    if banned is not None:
        lse = _lse64(z)
        logprobs = (z.gather(1, tokens[:, None])[:, 0].double() - lse).float()
    return tokens, logprobs


def _numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _auto_impl(device: torch.device) -> str:
    if device.type == "cuda":
        return "triton" if _triton_available() else "torch"
    return "numba" if device.type == "cpu" and _numba_available() else "torch"


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
