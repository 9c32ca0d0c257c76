"""The numba CPU paged-decode kernel against the plain-torch reference."""

import random

import pytest
import torch

from kernels.decode_attention import cascade_decode_ref, paged_decode_ref
from tests.kernels.test_attention_ref import SCALE, D, Pool, pad

pytest.importorskip("numba")
from kernels.decode_attention_numba import paged_decode_numba  # noqa: E402


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
