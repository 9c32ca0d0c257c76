"""C++/OpenMP decode attention (kernels/decode_attention_cpp.py) against the torch
references on random inputs: ragged page tables, prefixes that are and are not page
multiples, empty suffixes and prefixes, groups of one and of different sizes, GQA ratios
1/2/4, float32 and bfloat16 KV; and bad input raises instead of crashing.
Tolerances: float32 atol 1e-5 (both sides accumulate in float32, in different orders);
bfloat16 KV atol 1e-4 (the reference upcasts the same bf16 values, so only the order of
float32 sums differs, on outputs of size ~1)."""

import math

import numpy as np
import pytest
import torch

from brorl.kernels.decode_attention import cascade_decode_ref, paged_decode_ref
from brorl.kernels.decode_attention_cpp import (
    attention_ext_built,
    cascade_decode_cpp,
    paged_decode_cpp,
)

pytestmark = pytest.mark.skipif(not attention_ext_built(),
                                reason="brorl.kernels._attention_ext is not built")

ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4}


def kv_cache(num_pages, page_size, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_pages, page_size, hkv, d, generator=g)
    v = torch.randn(num_pages, page_size, hkv, d, generator=g)
    return k.to(dtype), v.to(dtype)


def page_table(lens, page_size, num_pages, g, width=None):
    """Random distinct pages per row, padded with random valid ids to a common width."""
    need = [max(1, math.ceil(n / page_size)) for n in lens]
    width = width or max(need)
    perm = torch.randperm(num_pages, generator=g)[: width * len(lens)]
    return perm.view(len(lens), width)


def check(a, b, atol):
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,hkv", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("d", [64, 80])
def test_paged_decode_matches_ref_on_ragged_tables(dtype, h, hkv, d):
    ps, num_pages = 4, 200
    kc, vc = kv_cache(num_pages, ps, hkv, d, dtype, seed=h + d)
    g = torch.Generator().manual_seed(1)
    lens = torch.tensor([0, 1, 3, 4, 5, 17, 40, 63])
    pt = page_table(lens.tolist(), ps, num_pages, g)
    q = torch.randn(len(lens), h, d, generator=g).to(dtype)
    out, lse = paged_decode_cpp(q, kc, vc, pt, lens, 0.3)
    ref_out, ref_lse = paged_decode_ref(q, kc, vc, pt, lens, 0.3)
    check(out, ref_out, ATOL[dtype])
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert torch.isinf(lse[0]).all() and (out[0] == 0).all()  # empty key set
    fin = torch.isfinite(ref_lse)
    check(lse[fin], ref_lse[fin], ATOL[dtype])


def cascade_case(group_sizes, prefix_lens, suffix_lens, h, hkv, d, ps, dtype, seed,
                 ungrouped=0):
    """Rows shuffled over groups (padded with -1) plus `ungrouped` rows in no group."""
    g = torch.Generator().manual_seed(seed)
    batch = sum(group_sizes) + ungrouped
    num_pages = 400
    kc, vc = kv_cache(num_pages, ps, hkv, d, dtype, seed)
    order = torch.randperm(batch, generator=g).tolist()
    nmax = max(group_sizes, default=1)
    rows, start = [], 0
    for n in group_sizes:
        rows.append(order[start:start + n] + [-1] * (nmax - n))
        start += n
    group_rows = torch.tensor(rows, dtype=torch.int64).view(len(group_sizes), nmax)
    pages = torch.randperm(num_pages, generator=g)
    pw = max([math.ceil(n / ps) for n in prefix_lens] + [1])
    sw = max([math.ceil(n / ps) for n in suffix_lens] + [1])
    prefix_pages = pages[: len(group_sizes) * pw].view(len(group_sizes), pw)
    suffix_pages = pages[len(group_sizes) * pw:][: batch * sw].view(batch, sw)
    q = torch.randn(batch, h, d, generator=g).to(dtype)
    return (q, kc, vc, group_rows, prefix_pages, torch.tensor(prefix_lens, dtype=torch.int64),
            suffix_pages, torch.tensor(suffix_lens, dtype=torch.int64))


CASES = [
    # group sizes, prefix lens (page 4: multiples and not, and an empty prefix), suffixes
    ([3, 1, 5], [8, 13, 0], [0, 1, 4, 7, 2, 9, 3, 0, 5], 0),
    ([1], [130], [6], 0),
    ([40, 2], [150, 64], [i % 11 for i in range(42)], 0),
    ([2, 3], [5, 9], [1, 0, 2, 3, 4, 6, 8], 2),  # two rows in no group
    ([], [], [3, 0, 5], 3),  # no groups: plain paged decode of the suffixes
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,hkv", [(2, 2), (4, 2), (8, 2)])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_cascade_decode_matches_ref(dtype, h, hkv, case):
    sizes, plens, slens, ungrouped = CASES[case]
    args = cascade_case(sizes, plens, slens, h, hkv, 64, 4, dtype, seed=case, ungrouped=ungrouped)
    if not sizes:
        args = (args[0], args[1], args[2], torch.empty(0, 1, dtype=torch.int64),
                torch.zeros(0, 1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                *args[6:])
    out = cascade_decode_cpp(*args, 0.125)
    check(out, cascade_decode_ref(*args, 0.125), ATOL[dtype])


def test_cascade_decode_head_dim_128_and_page_16():
    args = cascade_case([7, 33], [100, 48], [j % 20 for j in range(40)], 4, 1, 128, 16,
                        torch.float32, seed=9)
    check(cascade_decode_cpp(*args, 0.09), cascade_decode_ref(*args, 0.09), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [40, 80, 128])
def test_cascade_long_prefix_chunks_and_ragged_tiles(dtype, d):
    """Prefixes longer than one 256-key chunk (online softmax across chunks, a partial last
    chunk), groups whose query rows are not a multiple of the 6-row register tile, and head
    dims that use the 64-column, 16-column and scalar tails of the P V tile."""
    args = cascade_case([13, 70, 1], [600, 257, 256], [j % 9 for j in range(84)], 4, 2, d, 16,
                        dtype, seed=d)
    check(cascade_decode_cpp(*args, d ** -0.5), cascade_decode_ref(*args, d ** -0.5),
          ATOL[dtype])


def test_cascade_rows_with_nothing_give_zero():
    args = cascade_case([2], [0], [0, 0], 4, 2, 64, 4, torch.float32, seed=3)
    assert (cascade_decode_cpp(*args, 0.1) == 0).all()


@pytest.fixture
def paged_args():
    kc, vc = kv_cache(10, 4, 2, 8, torch.float32, 0)
    q = torch.randn(2, 4, 8)
    return q, kc, vc, torch.tensor([[0, 1], [2, 3]]), torch.tensor([5, 8])


@pytest.mark.parametrize("mutate,err,match", [
    (lambda a: {1: a[1].double()}, ValueError, "float32 or bfloat16"),
    (lambda a: {2: a[2].half()}, ValueError, "float32 or bfloat16"),
    (lambda a: {0: a[0][:, :, :4]}, ValueError, "head_dim"),
    (lambda a: {0: a[0][:, :3]}, ValueError, "do not group"),
    (lambda a: {3: torch.tensor([[0, 10], [2, 3]])}, IndexError, "page_table"),
    (lambda a: {3: torch.tensor([[0, -1], [2, 3]])}, IndexError, "page_table"),
    (lambda a: {3: torch.tensor([[0, 1]])}, ValueError, "rows"),
    (lambda a: {4: torch.tensor([5, 9])}, ValueError, "seq_lens"),
    (lambda a: {4: torch.tensor([-1, 2])}, ValueError, "seq_lens"),
    (lambda a: {4: torch.tensor([1.0, 2.0])}, ValueError, "integer"),
    (lambda a: {2: a[2][:9]}, ValueError, "differ in shape"),
])
def test_paged_bad_inputs_raise(paged_args, mutate, err, match):
    args = list(paged_args)
    for i, t in mutate(args).items():
        args[i] = t
    with pytest.raises(err, match=match):
        paged_decode_cpp(*args, 0.5)


def test_cascade_bad_group_rows_raise():
    args = list(cascade_case([2, 1], [5, 4], [1, 2, 3], 4, 2, 8, 4, torch.float32, seed=0))
    bad = {"twice": torch.tensor([[0, 1], [1, -1]]), "outside": torch.tensor([[0, 3], [2, -1]])}
    args[3] = bad["twice"]
    with pytest.raises(ValueError, match="twice"):
        cascade_decode_cpp(*args, 0.5)
    args[3] = bad["outside"]
    with pytest.raises(IndexError, match="group_rows"):
        cascade_decode_cpp(*args, 0.5)
    args[3] = torch.tensor([[0, 1], [2, -1]])
    args[5] = torch.tensor([5, 9])  # the second group has one page of 4
    with pytest.raises(ValueError, match="prefix_lens"):
        cascade_decode_cpp(*args, 0.5)


def test_extension_rejects_non_contiguous_and_wrong_ndim(paged_args):
    from brorl.kernels import _attention_ext as ext

    q, kc, vc, pt, lens = (t.numpy() for t in paged_args)
    with pytest.raises(ValueError, match="C-contiguous"):
        ext.paged_decode(np.asfortranarray(q), kc, vc, pt, lens, 0.5)
    with pytest.raises(ValueError, match="dims"):
        ext.paged_decode(q, kc[0], vc, pt, lens, 0.5)
    with pytest.raises(ValueError, match="int64"):
        ext.paged_decode(q, kc, vc, pt.astype(np.int32), lens, 0.5)


def _survives(code: str) -> None:
    """Runs code in a fresh interpreter: a crash there (a signal) fails this test instead
    of killing the test run."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip().endswith("ok"), done.stdout


def test_cascade_with_no_query_heads_returns_an_empty_output():
    # 0 heads per KV head was a division by zero (SIGFPE); the reference returns [2, 0, 8]
    _survives("""
import torch
from brorl.kernels.decode_attention import cascade_decode_ref
from brorl.kernels.decode_attention_cpp import cascade_decode_cpp
q, k = torch.zeros(2, 0, 8), torch.zeros(4, 2, 1, 8)
args = (q, k, k, torch.tensor([[0, 1]]), torch.zeros(1, 1, dtype=torch.long),
        torch.tensor([2]), torch.zeros(2, 1, dtype=torch.long), torch.tensor([1, 1]))
got = cascade_decode_cpp(*args, 1.0)
assert got.shape == cascade_decode_ref(*args, 1.0).shape == (2, 0, 8)
print("ok")
""")


def test_a_page_table_changed_by_another_thread_is_never_read_out_of_bounds():
    """The GIL is released while the kernel runs: it reads a copy of the tables, checked
    while the GIL was held, so a thread writing a page id outside the pool mid-call gives
    an IndexError or a result, never a read outside the pool (SIGSEGV before)."""
    _survives("""
import threading
import numpy as np
from brorl.kernels import _attention_ext as E
B, H, D, ps, P = 64, 8, 64, 16, 64
k = np.random.randn(B * P + 1, ps, 1, D).astype(np.float32)
q = np.random.randn(B, H, D).astype(np.float32)
pt = np.arange(B * P, dtype=np.int64).reshape(B, P)
lens = np.full(B, P * ps, np.int64)
stop = False
def flip():
    while not stop:
        pt[B - 1, P - 1] = 1 << 40
        pt[B - 1, P - 1] = B * P - 1
t = threading.Thread(target=flip)
t.start()
try:
    for _ in range(200):
        try:
            E.paged_decode(q, k, k, pt, lens, 0.1)
        except IndexError:
            pass
finally:
    stop = True
    t.join()
print("ok")
""")
