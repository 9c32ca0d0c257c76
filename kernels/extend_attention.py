"""Extend (prefill) attention: new tokens of several sequences, each with a cached prefix
in KV pages, attend causally to their prefix and to themselves.

Layout: q [T_total, num_heads, head_dim], the new tokens of all sequences back to back
(sequence s owns rows cu_seqlens[s]:cu_seqlens[s+1]); the new tokens' K/V are already
written to the pages, so sequence s's keys are the first prefix_lens[s] + extend_lens[s]
tokens of page_tables[s].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def extend_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         page_tables: list[torch.Tensor], prefix_lens: list[int],
                         extend_lens: list[int], scale: float) -> torch.Tensor:
    """Returns out [T_total, num_heads, head_dim] in q's dtype."""
    H, D = q.shape[1], q.shape[2]
    hkv = k_cache.shape[2]
    out = torch.empty_like(q)
    start = 0
    for pages, c, t in zip(page_tables, prefix_lens, extend_lens):
        n = c + t
        k = k_cache[pages].reshape(-1, hkv, D)[:n]
        v = v_cache[pages].reshape(-1, hkv, D)[:n]
        qs = q[start:start + t]
        # query i (absolute position c + i) sees keys 0 .. c + i
        q_pos = c + torch.arange(t, device=q.device)
        mask = torch.arange(n, device=q.device)[None, :] <= q_pos[:, None]
        k = k.repeat_interleave(H // hkv, dim=1) if H != hkv else k
        v = v.repeat_interleave(H // hkv, dim=1) if H != hkv else v
        o = F.scaled_dot_product_attention(qs.transpose(0, 1), k.transpose(0, 1),
                                           v.transpose(0, 1), attn_mask=mask, scale=scale)
        out[start:start + t] = o.transpose(0, 1)
        start += t
    return out
