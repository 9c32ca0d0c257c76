"""Decode attention over a paged KV cache: plain paged decode, and cascade (shared-prefix)
decode in three stages: the queries of a group's samples against the group's shared prefix
pages together (one read of the prefix: a matrix product), each sample against its private
suffix pages, then an exact log-sum-exp merge of the two partial results.

Layout (one layer): k_cache, v_cache [num_pages, page_size, num_kv_heads, head_dim];
q [B, num_heads, head_dim] (one decode query per sequence); query head h reads KV head
h // (num_heads // num_kv_heads), as Hugging Face's repeat_kv does. Partial results are
(out float32 [B, num_heads, head_dim], lse float32 [B, num_heads]) with natural-log LSE;
an empty key set gives out 0 and lse -inf.
"""

from __future__ import annotations

import math

import torch


def _gather_pages(cache: torch.Tensor, page_table: torch.Tensor) -> torch.Tensor:
    """[R, P] page ids -> [R, P * page_size, num_kv_heads, head_dim]."""
    r, p = page_table.shape
    g = cache[page_table.reshape(-1)]
    return g.view(r, p * cache.shape[1], cache.shape[2], cache.shape[3])


def _partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       lens: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [R, hkv, M, d] against k, v [R, T, hkv, d] where only the first lens[R] keys are
    valid. Returns out [R, hkv, M, d] and lse [R, hkv, M] (float32)."""
    q, k, v = q.float(), k.float(), v.float()
    scores = torch.matmul(q * scale, k.permute(0, 2, 3, 1))  # [R, hkv, M, T]
    T = k.shape[1]
    if bool((lens < T).any()):
        valid = torch.arange(T, device=k.device)[None, :] < lens[:, None]  # [R, T]
        scores.masked_fill_(~valid[:, None, None, :], -math.inf)
    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # rows with no key
    probs = scores.sub_(m).exp_()
    total = probs.sum(dim=-1)
    out = torch.matmul(probs, v.permute(0, 2, 1, 3))  # [R, hkv, M, d]
    out = out / total.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    return out, m[..., 0] + torch.log(total)


def paged_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     page_table: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query against the first seq_lens[b] tokens of its pages page_table[b].
    page_table [B, P] int64 (padding entries are any valid page id); seq_lens [B]."""
    B, H, D = q.shape
    hkv = k_cache.shape[2]
    qg = q.view(B, hkv, H // hkv, D)
    out, lse = _partial_attention(qg, _gather_pages(k_cache, page_table),
                                  _gather_pages(v_cache, page_table), seq_lens, scale)
    return out.reshape(B, H, D), lse.reshape(B, H)


def shared_prefix_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      group_rows: torch.Tensor, prefix_pages: torch.Tensor,
                      prefix_lens: torch.Tensor, scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1 of cascade decode. group_rows [G, Nmax] row indices of q (-1 = padding);
    prefix_pages [G, P]; prefix_lens [G]. The queries of a group and all its query heads
    that share a KV head form one [Nmax * ratio, d] tile against the group's prefix."""
    B, H, D = q.shape
    G, nmax = group_rows.shape
    hkv = k_cache.shape[2]
    r = H // hkv
    rows = group_rows.clamp(min=0)
    qg = q[rows.reshape(-1)].view(G, nmax, hkv, r, D).permute(0, 2, 1, 3, 4)
    qg = qg.reshape(G, hkv, nmax * r, D)
    out, lse = _partial_attention(qg, _gather_pages(k_cache, prefix_pages),
                                  _gather_pages(v_cache, prefix_pages), prefix_lens, scale)
    out = out.view(G, hkv, nmax, r, D).permute(0, 2, 1, 3, 4).reshape(G * nmax, H, D)
    lse = lse.view(G, hkv, nmax, r).permute(0, 2, 1, 3).reshape(G * nmax, H)
    flat = group_rows.reshape(-1)
    if G * nmax == B and torch.equal(flat, torch.arange(B, device=q.device)):
        return out, lse  # every row in order, no padding
    o = torch.zeros(B, H, D, dtype=torch.float32, device=q.device)
    l_out = torch.full((B, H), -math.inf, dtype=torch.float32, device=q.device)
    keep = flat >= 0
    o[flat[keep]] = out[keep]
    l_out[flat[keep]] = lse[keep]
    return o, l_out


def merge_states_ref(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor,
                     lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of attention over two disjoint key sets. o [..., d], lse [...]; either
    side may be empty (lse -inf). Both empty gives out 0 and lse -inf."""
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    wa = torch.exp(lse_a - m)
    wb = torch.exp(lse_b - m)
    total = wa + wb
    denom = torch.where(total > 0, total, torch.ones_like(total))
    out = (o_a * wa[..., None] + o_b * wb[..., None]) / denom[..., None]
    return out, m + torch.log(total)


def cascade_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       group_rows: torch.Tensor, prefix_pages: torch.Tensor,
                       prefix_lens: torch.Tensor, suffix_pages: torch.Tensor,
                       suffix_lens: torch.Tensor, scale: float,
                       paged_fn=paged_decode_ref) -> torch.Tensor:
    """Cascade decode: shared prefix per group + private suffix per row, merged.
    suffix_pages [B, Ps] and suffix_lens [B] describe each row's private pages, whose
    tokens follow its group's prefix. `paged_fn` computes the suffix stage (a fast path
    with paged_decode_ref's contract may be passed). Returns out [B, num_heads, head_dim]
    float32."""
    if group_rows.shape[0] == 0:
        return paged_fn(q, k_cache, v_cache, suffix_pages, suffix_lens, scale)[0]
    o_p, l_p = shared_prefix_ref(q, k_cache, v_cache, group_rows, prefix_pages, prefix_lens,
                                 scale)
    o_s, l_s = paged_fn(q, k_cache, v_cache, suffix_pages, suffix_lens, scale)
    return merge_states_ref(o_p, l_p, o_s, l_s)[0]
