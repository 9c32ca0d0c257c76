"""Decode (paged and cascade) and extend attention references against dense attention
computed per sequence from contiguous K/V."""

import math
import random

import pytest
import torch

from brorl.kernels.decode_attention import cascade_decode_ref, merge_states_ref, paged_decode_ref
from brorl.kernels.extend_attention import extend_attention_ref

PS, HKV, H, D = 4, 2, 6, 8
SCALE = D ** -0.5


def dense_attention(q, k, v):
    """q [H, D]; k, v [T, HKV, D] -> [H, D] (GQA by head // ratio)."""
    k = k.repeat_interleave(H // HKV, dim=1).float()
    v = v.repeat_interleave(H // HKV, dim=1).float()
    s = torch.einsum("hd,thd->ht", q.float(), k) * SCALE
    return torch.einsum("ht,thd->hd", torch.softmax(s, -1), v)


class Pool:
    """A KV cache whose pages are handed out in random order (ragged page tables)."""

    def __init__(self, num_pages, dtype, rng):
        self.k = torch.randn(num_pages, PS, HKV, D).to(dtype)
        self.v = torch.randn(num_pages, PS, HKV, D).to(dtype)
        self.free = list(range(num_pages))
        rng.shuffle(self.free)

    def store(self, k, v):
        """Writes [T, HKV, D] into fresh pages; returns the page list."""
        pages = [self.free.pop() for _ in range(-(-len(k) // PS))]
        for i, p in enumerate(pages):
            n = min(PS, len(k) - i * PS)
            self.k[p, :n] = k[i * PS:i * PS + n]
            self.v[p, :n] = v[i * PS:i * PS + n]
        return pages


def pad(rows, value=0):
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cascade_and_paged_decode_equal_dense_attention(dtype, seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pool = Pool(400, dtype, rng)
    group_sizes = [1, 3, 5, 2]
    rows, prefix_pages, prefix_lens, suffix_pages, suffix_lens = [], [], [], [], []
    full_tables, full_lens, dense = [], [], []
    q = torch.randn(sum(group_sizes), H, D).to(dtype)
    r = 0
    for n in group_sizes:
        plen = PS * rng.randrange(0, 6)  # page-aligned: paged decode can see it too
        pk, pv = torch.randn(plen, HKV, D).to(dtype), torch.randn(plen, HKV, D).to(dtype)
        pp = pool.store(pk, pv)
        prefix_pages.append(pp)
        prefix_lens.append(plen)
        rows.append(list(range(r, r + n)))
        for _ in range(n):
            slen = rng.randrange(1, 11)
            sk, sv = torch.randn(slen, HKV, D).to(dtype), torch.randn(slen, HKV, D).to(dtype)
            sp = pool.store(sk, sv)
            suffix_pages.append(sp)
            suffix_lens.append(slen)
            full_tables.append(pp + sp)
            full_lens.append(plen + slen)
            dense.append(dense_attention(q[r], torch.cat([pk, sk]), torch.cat([pv, sv])))
            r += 1
    want = torch.stack(dense)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    paged, _ = paged_decode_ref(q, pool.k, pool.v, pad(full_tables), torch.tensor(full_lens),
                                SCALE)
    torch.testing.assert_close(paged, want, atol=tol, rtol=tol)
    cascade = cascade_decode_ref(q, pool.k, pool.v, pad(rows, -1), pad(prefix_pages),
                                 torch.tensor(prefix_lens), pad(suffix_pages),
                                 torch.tensor(suffix_lens), SCALE)
    torch.testing.assert_close(cascade, want, atol=tol, rtol=tol)


def test_cascade_with_unaligned_prefix_and_empty_suffix():
    rng = random.Random(5)
    torch.manual_seed(5)
    pool = Pool(64, torch.float32, rng)
    plen = 7  # not a page multiple
    pk, pv = torch.randn(plen, HKV, D), torch.randn(plen, HKV, D)
    pp = pool.store(pk, pv)
    q = torch.randn(3, H, D)
    slens = [0, 1, 6]  # the first sample has no private tokens
    sks = [torch.randn(n, HKV, D) for n in slens]
    svs = [torch.randn(n, HKV, D) for n in slens]
    sps = [pool.store(k, v) if len(k) else [] for k, v in zip(sks, svs)]
    out = cascade_decode_ref(q, pool.k, pool.v, torch.tensor([[0, 1, 2]]), pad([pp]),
                             torch.tensor([plen]), pad(sps), torch.tensor(slens), SCALE)
    for i in range(3):
        want = dense_attention(q[i], torch.cat([pk, sks[i]]), torch.cat([pv, svs[i]]))
        torch.testing.assert_close(out[i], want, atol=1e-5, rtol=1e-5)


def test_merge_of_two_empty_sides_is_zero_and_merge_is_associative():
    o = torch.randn(3, 4)
    lse = torch.randn(3)
    empty_o, empty_l = torch.zeros(3, 4), torch.full((3,), -math.inf)
    out, l_out = merge_states_ref(o, lse, empty_o, empty_l)
    torch.testing.assert_close(out, o)
    torch.testing.assert_close(l_out, lse)
    out, l_out = merge_states_ref(empty_o, empty_l, empty_o, empty_l)
    assert torch.all(out == 0) and torch.all(torch.isinf(l_out))
    parts = [(torch.randn(3, 4), torch.randn(3)) for _ in range(3)]
    left = merge_states_ref(*merge_states_ref(*parts[0], *parts[1]), *parts[2])
    right = merge_states_ref(*parts[0], *merge_states_ref(*parts[1], *parts[2]))
    torch.testing.assert_close(left[0], right[0])
    torch.testing.assert_close(left[1], right[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extend_attention_equals_dense_causal_attention(dtype):
    rng = random.Random(3)
    torch.manual_seed(3)
    pool = Pool(200, dtype, rng)
    prefix_lens, extend_lens = [0, 4, 9, 12], [5, 1, 7, 4]
    tables, qs, wants = [], [], []
    for c, t in zip(prefix_lens, extend_lens):
        k, v = torch.randn(c + t, HKV, D).to(dtype), torch.randn(c + t, HKV, D).to(dtype)
        tables.append(torch.tensor(pool.store(k, v)))
        q = torch.randn(t, H, D).to(dtype)
        qs.append(q)
        wants += [dense_attention(q[i], k[:c + i + 1], v[:c + i + 1]) for i in range(t)]
    out = extend_attention_ref(torch.cat(qs), pool.k, pool.v, tables, prefix_lens,
                               extend_lens, SCALE)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), torch.stack(wants), atol=tol, rtol=tol)
