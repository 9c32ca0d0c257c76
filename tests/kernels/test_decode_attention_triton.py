"""Triton paged decode, cascade stages and LSE merge against the torch references
(under the interpreter on CPU; bf16 at real shapes on a GPU)."""

import math
import random

import pytest
import torch

from brorl.kernels.decode_attention import (
    cascade_decode_ref,
    merge_states_ref,
    paged_decode_ref,
    shared_prefix_ref,
)

pytest.importorskip("triton")
from brorl.kernels.decode_attention_triton import (  # noqa: E402
    cascade_decode_triton,
    merge_states_triton,
    paged_decode_triton,
    shared_prefix_triton,
)

PS, HKV, H, D = 4, 2, 6, 16
SCALE = D ** -0.5
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def cache(num_pages, dtype, device="cpu", ps=PS, hkv=HKV, d=D):
    return (torch.randn(num_pages, ps, hkv, d, device=device).to(dtype),
            torch.randn(num_pages, ps, hkv, d, device=device).to(dtype))


def tables(rng, lens, num_pages, ps=PS, device="cpu"):
    """Ragged page tables of distinct random pages, padded with random valid ids."""
    counts = [-(-n // ps) for n in lens]
    width = max(1, max(counts))
    rows = [rng.sample(range(num_pages), c) + [rng.randrange(num_pages)] * (width - c)
            for c in counts]
    return torch.tensor(rows, dtype=torch.int64, device=device)


def ref_inputs(*ts):
    return [t.float() for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [None, 3])
def test_paged_decode_matches_reference_on_ragged_lengths(dtype, splits):
    rng = random.Random(1)
    torch.manual_seed(1)
    kc, vc = cache(60, dtype)
    lens = [0, 1, 3, 4, 5, 17, 33]  # empty row, page edges, several blocks of keys
    pt, seq_lens = tables(rng, lens, 60), torch.tensor(lens)
    q = torch.randn(len(lens), H, D).to(dtype)
    out, lse = paged_decode_triton(q, kc, vc, pt, seq_lens, SCALE, splits=splits)
    want, want_lse = paged_decode_ref(*ref_inputs(q, kc, vc), pt, seq_lens, SCALE)
    torch.testing.assert_close(out, want, **TOL[dtype])
    torch.testing.assert_close(lse, want_lse, **TOL[dtype])
    assert out.dtype == lse.dtype == torch.float32
    assert torch.all(out[0] == 0) and torch.all(lse[0] == -math.inf)


def group_case(rng, nmaxes_and_sizes, prefix_lens, num_rows, num_pages):
    """group_rows [G, Nmax] over a shuffled set of rows (some rows in no group)."""
    rows = list(range(num_rows))
    rng.shuffle(rows)
    nmax = max(nmaxes_and_sizes)
    gr = []
    for n in nmaxes_and_sizes:
        gr.append([rows.pop() for _ in range(n)] + [-1] * (nmax - n))
    return (torch.tensor(gr), tables(rng, prefix_lens, num_pages), torch.tensor(prefix_lens))


def test_shared_prefix_packs_groups_of_different_sizes_and_multiple_tiles():
    rng = random.Random(2)
    torch.manual_seed(2)
    kc, vc = cache(80, torch.float32)
    # H=12 over 2 KV heads: 12 samples x 6 heads = 72 tile rows, two 64-row tiles
    q = torch.randn(17, 12, D)
    gr, pp, pl = group_case(rng, [12, 1, 3], [8, 13, 1], 17, 80)  # N=1 group, page multiple
    for splits in (None, 2):
        out, lse = shared_prefix_triton(q, kc, vc, gr, pp, pl, SCALE, splits=splits)
        want, want_lse = shared_prefix_ref(q, kc, vc, gr, pp, pl, SCALE)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    loose = torch.ones(17, dtype=torch.bool)
    loose[gr[gr >= 0]] = False
    assert loose.any() and torch.all(lse[loose] == -math.inf) and torch.all(out[loose] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cascade_decode_matches_reference_with_empty_suffixes(dtype):
    rng = random.Random(3)
    torch.manual_seed(3)
    kc, vc = cache(90, dtype)
    B = 9
    gr, pp, pl = group_case(rng, [4, 2, 1], [9, 4, 21], B, 90)
    grouped = set(gr[gr >= 0].tolist())
    # empty suffixes on grouped rows; rows in no group (2 of them) keep a non-empty one
    slens = [(0 if r % 3 == 0 else r) if r in grouped else 2 for r in range(B)]
    sp, sl = tables(rng, slens, 90), torch.tensor(slens)
    q = torch.randn(B, H, D).to(dtype)
    want = cascade_decode_ref(*ref_inputs(q, kc, vc), gr, pp, pl, sp, sl, SCALE)
    for splits in (None, 2):
        got = cascade_decode_triton(q, kc, vc, gr, pp, pl, sp, sl, SCALE,
                                    prefix_splits=splits, suffix_splits=splits)
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_cascade_without_groups_is_paged_decode():
    rng = random.Random(4)
    torch.manual_seed(4)
    kc, vc = cache(30, torch.float32)
    slens = [3, 9, 1]
    sp, sl = tables(rng, slens, 30), torch.tensor(slens)
    q = torch.randn(3, H, D)
    empty = torch.empty(0, 1, dtype=torch.int64)
    got = cascade_decode_triton(q, kc, vc, empty, torch.zeros(0, 1, dtype=torch.int64),
                                torch.zeros(0, dtype=torch.int64), sp, sl, SCALE)
    torch.testing.assert_close(got, paged_decode_ref(q, kc, vc, sp, sl, SCALE)[0],
                               atol=1e-5, rtol=1e-5)


def test_merge_states_matches_reference_including_empty_sides():
    torch.manual_seed(5)
    o_a, o_b = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    l_a, l_b = torch.randn(3, 4) * 3, torch.randn(3, 4) * 3
    l_a[0, :2] = -math.inf
    l_b[0, 1:3] = -math.inf  # [0, 1]: both sides empty
    o_a[0, :2] = 0
    o_b[0, 1:3] = 0
    got, got_lse = merge_states_triton(o_a, l_a, o_b, l_b)
    want, want_lse = merge_states_ref(o_a, l_a, o_b, l_b)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_lse, want_lse, atol=1e-6, rtol=1e-5)
    assert got_lse[0, 1] == -math.inf and torch.all(got[0, 1] == 0)


def test_launchers_reject_bad_inputs(monkeypatch):
    kc, vc = cache(8, torch.float32)
    q, pt, sl = torch.randn(2, H, D), torch.zeros(2, 2, dtype=torch.int64), torch.tensor([1, 2])
    cases = [
        ((q.half(), kc, vc, pt, sl), "dtypes differ"),
        ((torch.randn(2, 5, D), kc, vc, pt, sl), "do not group"),
        ((torch.randn(2, H, 8), kc, vc, pt, sl), "head_dim"),
        ((q, kc, vc, pt.float(), sl), "page_table must be int32 or int64"),
        ((q, kc, vc, pt[:1], sl), "page_table has 1 rows"),
        ((q, kc, vc[:4], pt, sl), "differ"),
        ((torch.randn(2, D, H).transpose(1, 2), kc, vc, pt, sl), "contiguous"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            paged_decode_triton(*args, SCALE)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        paged_decode_triton(q, kc, vc, pt, sl, SCALE)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 16, 100])
def test_gpu_bf16_cascade_and_paged_at_qwen2_shapes(n):
    rng = random.Random(6)
    torch.manual_seed(6)
    ps, hkv, h, d, pages = 16, 2, 12, 128, 2048
    kc, vc = cache(pages, torch.bfloat16, "cuda", ps, hkv, d)
    plen, slens = 1024, [rng.randrange(0, 300) for _ in range(n)]
    gr = torch.arange(n, device="cuda")[None]
    pp = tables(rng, [plen], pages, ps, "cuda")
    pl = torch.tensor([plen], device="cuda")
    sp, sl = tables(rng, slens, pages, ps, "cuda"), torch.tensor(slens, device="cuda")
    q = torch.randn(n, h, d, device="cuda").to(torch.bfloat16)
    scale = d ** -0.5
    want = cascade_decode_ref(*ref_inputs(q, kc, vc), gr, pp, pl, sp, sl, scale)
    got = cascade_decode_triton(q, kc, vc, gr, pp, pl, sp, sl, scale)
    torch.testing.assert_close(got, want, **TOL[torch.bfloat16])
    full = torch.cat([pp.expand(n, -1), sp], dim=1)  # prefix pages then suffix pages
    out, _ = paged_decode_triton(q, kc, vc, full, sl + plen, scale)
    torch.testing.assert_close(out, want, **TOL[torch.bfloat16])
