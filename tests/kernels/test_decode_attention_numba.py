"""The numba CPU paged-decode kernel against the plain-torch reference."""

import random

import pytest
import torch

from brorl.kernels.decode_attention import cascade_decode_ref, paged_decode_ref
from tests.kernels.test_attention_ref import SCALE, D, Pool, pad

pytest.importorskip("numba")
from brorl.kernels.decode_attention_numba import paged_decode_numba  # noqa: E402


@pytest.mark.parametrize("seed", [0, 1])
def test_numba_paged_decode_equals_reference_on_ragged_pages(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pool = Pool(300, torch.float32, rng)
    lens = [0, 1, 3, 4, 5, 17, 32, 0, 9]  # empty rows, page edges, several pages
    tables = [pool.store(torch.randn(n, *pool.k.shape[2:]), torch.randn(n, *pool.k.shape[2:]))
              if n else [] for n in lens]
    q = torch.randn(len(lens), 6, D)
    table, seq_lens = pad(tables), torch.tensor(lens)
    want, want_lse = paged_decode_ref(q, pool.k, pool.v, table, seq_lens, SCALE)
    got, got_lse = paged_decode_numba(q, pool.k, pool.v, table, seq_lens, SCALE)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_lse, want_lse, atol=1e-5, rtol=1e-5)
    assert torch.all(got[torch.tensor(lens) == 0] == 0)


def test_cascade_with_numba_suffix_stage_equals_reference():
    rng = random.Random(4)
    torch.manual_seed(4)
    pool = Pool(200, torch.float32, rng)
    shape = pool.k.shape[2:]
    plen = 7
    pp = pool.store(torch.randn(plen, *shape), torch.randn(plen, *shape))
    slens = [0, 2, 5, 11]
    sps = [pool.store(torch.randn(n, *shape), torch.randn(n, *shape)) if n else []
           for n in slens]
    q = torch.randn(4, 6, D)
    args = (q, pool.k, pool.v, torch.tensor([[0, 1, 2, 3]]), pad([pp]), torch.tensor([plen]),
            pad(sps), torch.tensor(slens), SCALE)
    want = cascade_decode_ref(*args)
    got = cascade_decode_ref(*args, paged_fn=paged_decode_numba)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_numba_paged_decode_rejects_half_precision():
    q = torch.randn(1, 6, D, dtype=torch.float16)
    k = torch.randn(2, 4, 2, D, dtype=torch.float16)
    with pytest.raises(ValueError, match="float32"):
        paged_decode_numba(q, k, k, torch.zeros(1, 1, dtype=torch.long), torch.tensor([1]), 1.0)


@pytest.mark.parametrize("seed", range(8))
def test_numba_paged_decode_fuzz_matches_reference(seed):
    """Random ragged tables (padding entries any valid page), page sizes 1..16, GQA ratios
    1/2/4/7, head dims 8..128, N = 1, empty rows, int32 tables and a non-contiguous q."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    ps, hkv, ratio = rng.choice([1, 3, 16]), rng.choice([1, 2]), rng.choice([1, 2, 4, 7])
    d, batch = rng.choice([8, 24, 64, 128]), rng.choice([1, 2, 9])
    num_pages = rng.randrange(4, 40)
    k = torch.randn(num_pages, ps, hkv, d, generator=g)
    v = torch.randn(num_pages, ps, hkv, d, generator=g)
    lens = torch.tensor([rng.choice([0, 1, ps, rng.randrange(60)]) for _ in range(batch)])
    width = max(1, -(-int(lens.max()) // ps)) + rng.randrange(2)
    table = torch.randint(0, num_pages, (batch, width), generator=g)
    q = torch.randn(hkv * ratio, batch, d, generator=g).transpose(0, 1)
    want, want_lse = paged_decode_ref(q, k, v, table, lens, 0.3)
    got, got_lse = paged_decode_numba(q, k, v, table.int(), lens.int(), 0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert torch.equal(torch.isinf(got_lse), torch.isinf(want_lse))
    fin = torch.isfinite(want_lse)
    torch.testing.assert_close(got_lse[fin], want_lse[fin], atol=1e-5, rtol=1e-4)


def test_numba_paged_decode_rejects_out_of_range_pages_and_lengths():
    """These used to read outside the arrays (segfaults or garbage): the kernel checks the
    page ids and length of each row before it reads them, and the launcher raises
    (subprocess variants: tests/csrc/test_fuzz_ext)."""
    q, k = torch.randn(2, 4, 8), torch.randn(10, 4, 2, 8)
    table, lens = torch.tensor([[0, 1], [2, 3]]), torch.tensor([5, 8])
    with pytest.raises(IndexError, match=r"page_table row 0 holds ids in \[0, 10\]"):
        paged_decode_numba(q, k, k, torch.tensor([[0, 10], [2, 3]]), lens, 1.0)
    # a padding entry past the row's length is never read, so it is not refused
    got, _ = paged_decode_numba(q, k, k, torch.tensor([[0, 99], [2, 3]]), torch.tensor([4, 8]),
                                1.0)
    want, _ = paged_decode_numba(q, k, k, table, torch.tensor([4, 8]), 1.0)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"seq_lens\[1\] = 9"):
        paged_decode_numba(q, k, k, table, torch.tensor([5, 9]), 1.0)
    with pytest.raises(ValueError, match="page_table"):
        paged_decode_numba(q, k, k, table[:1], lens, 1.0)
    with pytest.raises(ValueError, match="does not fit"):
        paged_decode_numba(torch.randn(2, 4, 16), k, k, table, lens, 1.0)
