"""Triton fused sampler: the definition of kernels/sampling.py in one launch, one program
per row, the vocabulary read in blocks, without sorting it.

Per row (`_sample_kernel`):
1. one pass: z = logits / T (IEEE float32 division, `div_rn`), the max (and its first
   index for greedy rows), the smallest finite z and the count of finite z;
2. one pass: the float64 sums exp(z - max) (whole vocabulary for the logprob's
   log-sum-exp; without banned tokens for the draw);
3. truncation threshold by a multi-way search on values (`_search`): each pass
   evaluates NT candidate thresholds t_0 = lo < ... < t_{NT-1} = hi at once (count and
   float64 mass of z >= t_j), keeps the largest feasible candidate and narrows [lo, hi)
   to the gap up to the next one, until the values in that gap are all equal. That value
   is the largest row value v with count(z >= v) >= k (top-k) or mass(z >= v) >=
   top_p * mass(kept by top-k) (top-p): the threshold of `truncation_threshold_ref`, ties
   kept. A pass shrinks the interval ~NT-1 times, so a row takes a handful of passes;
   min-p is one float32 add (log(min_p) is computed by torch on the host, as in the ref);
4. the draw: a blocked cumulative walk of the float64 weights (block sums, then a cumsum
   inside the block that crosses u * total), stopping at the token.
The token and its behaviour logprob z_token - lse are written in the same launch.

Deviations from the reference, all allowed by the definition: the float64 sums are
tree-ordered inside a block (a draw differs only if u * total lies within ~1e-16 of a
cumulative boundary), and the top-p mass is float64 where the reference's sorted cumsum is
float32 (the kept set differs only if the cumulative mass lies within float32 rounding of
top_p). Uniforms come from `row_keys`/`uniforms` on the host. Imported lazily.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from brorl.kernels.sampling import uniforms
from brorl.kernels.transfer import upload
from brorl.kernels.triton_common import check_float

BLOCK = 1024  # tokens per block of the sum and walk passes
SEARCH_BLOCK = 128  # tokens per block of a search pass (a [block, NT] tile)
NT = 16  # candidate thresholds per search pass (a power of 2 >= 4; with 2 it never narrows)
MAX_PASSES = 48  # search passes per threshold (a safety bound; ~4-8 are typical)


@triton.jit
def _row_z(x_row, ban_row, offs, V, t, HAS_BANNED: tl.constexpr):
    """(z, zb) of one block: scaled logits (padding at -inf), and zb with banned at -inf."""
    inb = offs < V
    x = tl.load(x_row + offs, mask=inb, other=0.0).to(tl.float32)
    z = tl.where(inb, tl.math.div_rn(x, t), float("-inf"))
    if HAS_BANNED:
        ban = tl.load(ban_row + offs, mask=inb, other=1)
        zb = tl.where(ban != 0, float("-inf"), z)
    else:
        zb = z
    return z, zb


@triton.jit
def _search(x_row, ban_row, V, t, m64, base, lo, hi, lo_mass, k, p_mass,
            BY_COUNT: tl.constexpr, HAS_BANNED: tl.constexpr, SBLOCK: tl.constexpr,
            NT: tl.constexpr, MAX_PASSES: tl.constexpr):
    """Largest row value v (among zb >= base) with count(zb >= v) >= k (BY_COUNT) or
    mass(zb >= v) >= p_mass, and that mass. lo: a feasible row value, hi: the row max."""
    j = tl.arange(0, NT)
    thr = lo
    mass = lo_mass
    done = 0
    it = 0
    while (done == 0) & (it < MAX_PASSES):
        cand = lo + (hi - lo) * (j.to(tl.float32) / (NT - 1))
        cand = tl.where(j == NT - 1, hi, tl.where(j == 0, lo, cand))
        msum = tl.zeros([NT], dtype=tl.float64)
        cnt = tl.zeros([NT], dtype=tl.int32)
        vmin = tl.full([NT], float("inf"), tl.float32)
        vbelow = tl.full([NT], float("-inf"), tl.float32)
        for start in range(0, V, SBLOCK):
            offs = start + tl.arange(0, SBLOCK)
            z, zb = _row_z(x_row, ban_row, offs, V, t, HAS_BANNED)
            zb = tl.where(zb >= base, zb, float("-inf"))
            w = tl.exp(zb.to(tl.float64) - m64)
            ge = zb[:, None] >= cand[None, :]
            msum += tl.sum(tl.where(ge, w[:, None], 0.0), 0)
            cnt += tl.sum(ge.to(tl.int32), 0)
            vmin = tl.minimum(vmin, tl.min(tl.where(ge, zb[:, None], float("inf")), 0))
            vbelow = tl.maximum(vbelow, tl.max(tl.where(ge, float("-inf"), zb[:, None]), 0))
        if BY_COUNT:
            feas = cnt >= k
        else:
            feas = msum >= p_mass
        js = tl.max(tl.where(feas, j, -1), 0)
        thr = tl.max(tl.where(j == js, vmin, float("-inf")), 0)
        mass = tl.sum(tl.where(j == js, msum, 0.0), 0)
        below_next = tl.max(tl.where(j == js + 1, vbelow, float("-inf")), 0)
        # done when every row value in [t_js, t_js+1) equals thr (or t_js was the max)
        done = (thr >= below_next).to(tl.int32)
        lo = thr
        hi = tl.max(tl.where(j == js + 1, cand, float("-inf")), 0)
        it += 1
    return thr, mass


@triton.jit
def _row_stats(x_row, ban_row, V, t, HAS_BANNED: tl.constexpr, BLOCK: tl.constexpr):
    """Max of z and of zb, first argmax of zb, smallest finite zb, count of finite zb."""
    m_full = float("-inf")
    m_b = float("-inf")
    arg = 0
    zmin = float("inf")
    nf = 0
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        z, zb = _row_z(x_row, ban_row, offs, V, t, HAS_BANNED)
        m_full = tl.maximum(m_full, tl.max(z, 0))
        bmax = tl.max(zb, 0)
        barg = tl.argmax(zb, 0, tie_break_left=True)
        arg = tl.where(bmax > m_b, start + barg, arg)
        m_b = tl.maximum(m_b, bmax)
        finite = zb > float("-inf")
        zmin = tl.minimum(zmin, tl.min(tl.where(finite, zb, float("inf")), 0))
        nf += tl.sum(finite.to(tl.int32), 0)
    return m_full, m_b, arg, zmin, nf


@triton.jit
def _row_sums(x_row, ban_row, V, t, m_full, m_b, thr, HAS_BANNED: tl.constexpr,
              BLOCK: tl.constexpr):
    """float64 sums of exp(z - m_full) (all tokens) and of exp(zb - m_b) over zb >= thr."""
    s_full = tl.zeros([BLOCK], dtype=tl.float64)
    s_b = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        z, zb = _row_z(x_row, ban_row, offs, V, t, HAS_BANNED)
        w = tl.where(zb >= thr, tl.exp(zb.to(tl.float64) - m_b.to(tl.float64)), 0.0)
        s_b += tl.where(tl.arange(0, BLOCK) == 0, tl.sum(w, 0), 0.0)
        if HAS_BANNED:
            s_full += tl.exp(z.to(tl.float64) - m_full.to(tl.float64))
    if HAS_BANNED:
        total = tl.sum(s_full, 0)
    else:
        total = tl.sum(s_b, 0)
    return total, tl.sum(s_b, 0)


@triton.jit
def _walk(x_row, ban_row, V, t, m64, thr, target, tok, HAS_BANNED: tl.constexpr,
          BLOCK: tl.constexpr):
    """The first token whose cumulative weight (weights exp(zb - m) over zb >= thr, in
    index order) exceeds target; tok >= 0 on entry skips the walk; -1 if none."""
    c = target * 0.0
    start = 0
    while (tok < 0) & (start < V):
        offs = start + tl.arange(0, BLOCK)
        z, zb = _row_z(x_row, ban_row, offs, V, t, HAS_BANNED)
        w = tl.where(zb >= thr, tl.exp(zb.to(tl.float64) - m64), 0.0)
        hit = ((c + tl.cumsum(w, 0)) > target) & (w > 0.0)
        idx = tl.min(tl.where(hit, offs, 2147483647), 0)
        tok = tl.where(idx < 2147483647, idx, -1)
        c += tl.sum(w, 0)
        start += BLOCK
    return tok


@triton.jit
def _sample_kernel(x, ban, temp, top_k, top_p, log_min_p, u, out_tok, out_lp, V, s_xb,
                   s_bb, HAS_BANNED: tl.constexpr, BLOCK: tl.constexpr,
                   SBLOCK: tl.constexpr, NT: tl.constexpr, MAX_PASSES: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    x_row = x + b * s_xb
    ban_row = ban + b * s_bb
    t_raw = tl.load(temp + b)
    greedy = t_raw == 0
    t = tl.where(t_raw > 0, t_raw, 1.0)
    m_full, m_b, arg, zmin, nf = _row_stats(x_row, ban_row, V, t, HAS_BANNED, BLOCK)
    m64 = m_b.to(tl.float64)
    s_full, s_b = _row_sums(x_row, ban_row, V, t, m_full, m_b, float("-inf"), HAS_BANNED,
                            BLOCK)
    lse = m_full.to(tl.float64) + tl.log(s_full)
    k = tl.minimum(tl.load(top_k + b), V)
    p = tl.load(top_p + b)
    thr = float("-inf")
    mass = s_b
    if (k > 0) & (k <= nf) & (t_raw != 0):
        thr, mass = _search(x_row, ban_row, V, t, m64, float("-inf"), zmin, m_b, s_b, k,
                            0.0, True, HAS_BANNED, SBLOCK, NT, MAX_PASSES)
    if (p < 1.0) & (t_raw != 0):
        thr, mass = _search(x_row, ban_row, V, t, m64, thr, tl.maximum(zmin, thr), m_b,
                            mass, 0, p.to(tl.float64) * mass, False, HAS_BANNED, SBLOCK, NT,
                            MAX_PASSES)
    thr_min_p = m_b + tl.load(log_min_p + b)
    if (thr_min_p > thr) & (t_raw != 0):
        thr = thr_min_p
        _unused, mass = _row_sums(x_row, ban_row, V, t, m_full, m_b, thr, HAS_BANNED, BLOCK)
    tok = tl.where(greedy, arg, -1)
    tok = _walk(x_row, ban_row, V, t, m64, thr, tl.load(u + b) * mass, tok, HAS_BANNED, BLOCK)
    if tok < 0:  # u * total rounded onto the walk's sum: the last allowed token
        last = tl.zeros([BLOCK], dtype=tl.int32) - 1
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            z, zb = _row_z(x_row, ban_row, offs, V, t, HAS_BANNED)
            last = tl.maximum(last, tl.where((zb >= thr) & (zb > float("-inf")), offs, -1))
        tok = tl.maximum(tl.max(last, 0), 0)
    x_tok = tl.load(x_row + tok).to(tl.float32)
    z_tok = tl.math.div_rn(x_tok, t)
    tl.store(out_tok + b, tok.to(tl.int64))
    tl.store(out_lp + b, (z_tok.to(tl.float64) - lse).to(tl.float32))


def _check_row_param(name: str, t: torch.Tensor, rows: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != (rows,):
        raise ValueError(f"{name} must have shape ({rows},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, logits on {device}")


def sample_triton(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, min_p: torch.Tensor, keys: np.ndarray,
                  banned: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_ref`'s contract in one fused launch: logits [B, V] (float16/bfloat16/float32,
    CUDA, or CPU under TRITON_INTERPRET=1); temperature, top_k, top_p, min_p [B] on the
    logits' device; keys uint64 [B]; banned [B, V] bool or None. Returns (tokens int64 [B],
    behaviour logprobs float32 [B])."""
    check_float("logits", logits, 2)
    B, V = logits.shape
    dev = logits.device
    for name, t in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                    ("min_p", min_p)):
        _check_row_param(name, t, B, dev)
    if top_k.dtype.is_floating_point:
        raise ValueError(f"top_k must be an integer tensor, got {top_k.dtype}")
    if len(keys) != B:
        raise ValueError(f"{len(keys)} keys for {B} rows")
    if banned is not None:
        if banned.dtype != torch.bool or banned.shape != (B, V) or banned.device != dev:
            raise ValueError(f"banned must be a bool [{B}, {V}] tensor on {dev}, got "
                             f"{banned.dtype} {tuple(banned.shape)} on {banned.device}")
        banned = banned.contiguous().view(torch.uint8)
    u = upload([uniforms(keys)], dev)[0]  # queued: the host does not wait
    min_p = min_p.float()
    log_min_p = torch.where(min_p > 0, torch.log(min_p), torch.full_like(min_p, -torch.inf))
    tokens = torch.empty(B, dtype=torch.int64, device=dev)
    logprobs = torch.empty(B, dtype=torch.float32, device=dev)
    if B == 0:
        return tokens, logprobs
    ban = banned if banned is not None else tokens  # a dummy pointer when there is no ban
    _sample_kernel[(B,)](
        logits, ban, temperature.float().contiguous(), top_k.to(torch.int64).contiguous(),
        top_p.float().contiguous(), log_min_p.contiguous(), u, tokens, logprobs, V,
        logits.stride(0), banned.stride(0) if banned is not None else 0,
        HAS_BANNED=banned is not None, BLOCK=BLOCK, SBLOCK=SEARCH_BLOCK, NT=NT,
        MAX_PASSES=MAX_PASSES, num_warps=8)
    return tokens, logprobs
