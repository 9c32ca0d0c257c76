"""Differential fuzz of every Triton kernel against its plain-torch reference, under the
interpreter on CPU: seeded random shapes (ragged page tables, page sizes 1..32, lengths off
the block sizes, empty suffixes and prefixes, groups of 1..N samples, GQA ratios, head
dims off powers of two), float32 and float16 (never bf16: the interpreter computes bf16 on
raw bits), strided inputs where a launcher accepts them; then the launchers' refusals of
bad input, and the minimal repros of the bugs this fuzz found. Shapes stay tiny: the
interpreter runs each program in Python."""

import math
import random

import numpy as np
import pytest
import torch

from brorl.kernels.decode_attention import cascade_decode_ref, paged_decode_ref, shared_prefix_ref
from brorl.kernels.extend_attention import extend_attention_ref
from brorl.kernels.norm import add_rms_norm_ref, rms_norm_ref
from brorl.kernels.rope import apply_rope_ref
from brorl.kernels.sampling import row_keys, sample_ref
from brorl.kernels.token_logprob import token_logprob_entropy

pytest.importorskip("triton")
import brorl.kernels.sampling_triton as st  # noqa: E402
from brorl.kernels.decode_attention_triton import (  # noqa: E402
    cascade_decode_triton,
    merge_states_triton,
    paged_decode_triton,
    shared_prefix_triton,
)
from brorl.kernels.extend_attention_triton import extend_attention_triton  # noqa: E402
from brorl.kernels.norm_triton import add_rms_norm_triton, rms_norm_triton  # noqa: E402
from brorl.kernels.rope_triton import apply_rope_triton  # noqa: E402
from brorl.kernels.token_logprob_triton import token_stats_triton  # noqa: E402

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=4e-3, rtol=4e-3)}
DTYPES = (torch.float32, torch.float16)


def rand_cache(rng, num_pages, ps, hkv, d, dtype):
    """K/V caches, half the time strided views (every other KV head of a wider cache)."""
    wide = 2 if rng.random() < 0.5 else 1
    k = torch.randn(num_pages, ps, hkv * wide, d).to(dtype)[:, :, ::wide]
    v = torch.randn(num_pages, ps, hkv * wide, d).to(dtype)[:, :, ::wide]
    return k, v


def rand_q(rng, rows, h, d, dtype):
    """q [rows, h, d], half the time a view into a fused qkv projection (strided heads)."""
    if rng.random() < 0.5:
        return torch.randn(rows, h, d).to(dtype)
    qkv = torch.randn(rows, h + 3, d).to(dtype)
    return qkv[:, 1:h + 1]


def rand_tables(rng, lens, num_pages, ps, extra=0):
    """Ragged tables of distinct random pages (int32 or int64), padded with random ids and
    `extra` more columns."""
    counts = [-(-n // ps) for n in lens]
    width = max(1, max(counts, default=0)) + extra
    rows = [rng.sample(range(num_pages), c) + [rng.randrange(num_pages)] * (width - c)
            for c in counts]
    dtype = torch.int32 if rng.random() < 0.5 else torch.int64
    return torch.tensor(rows, dtype=dtype).reshape(len(lens), width)


def attention_shape(rng):
    hkv = rng.choice([1, 2])
    return dict(ps=rng.choice([1, 2, 3, 5, 8, 16, 32]), hkv=hkv, h=hkv * rng.choice([1, 3, 4]),
                d=rng.choice([8, 12, 16]), dtype=rng.choice(DTYPES))


def up(*ts):
    return [t.float() for t in ts]


@pytest.mark.parametrize("case", range(12))
def test_fuzz_paged_decode(case):
    rng = random.Random(100 + case)
    torch.manual_seed(100 + case)
    s = attention_shape(rng)
    B = rng.choice([1, 2, 4])
    lens = [rng.choice([0, 1, s["ps"], rng.randrange(1, 90)]) for _ in range(B)]
    num_pages = sum(-(-n // s["ps"]) for n in lens) + 3
    kc, vc = rand_cache(rng, num_pages, s["ps"], s["hkv"], s["d"], s["dtype"])
    pt = rand_tables(rng, lens, num_pages, s["ps"], extra=rng.choice([0, 1]))
    sl = torch.tensor(lens, dtype=rng.choice([torch.int32, torch.int64]))
    q = rand_q(rng, B, s["h"], s["d"], s["dtype"])
    splits = rng.choice([None, 1, 2, 3])
    out, lse = paged_decode_triton(q, kc, vc, pt, sl, s["d"] ** -0.5, splits=splits)
    want, want_lse = paged_decode_ref(*up(q, kc, vc), pt.long(), sl, s["d"] ** -0.5)
    torch.testing.assert_close(out, want, **TOL[s["dtype"]])
    torch.testing.assert_close(lse, want_lse, **TOL[s["dtype"]])


def rand_groups(rng, B, sizes, prefix_lens, num_pages, ps):
    """group_rows [G, Nmax] of distinct shuffled rows (-1 padded), prefix tables, lens."""
    rows = list(range(B))
    rng.shuffle(rows)
    nmax = max(sizes)
    gr = torch.tensor([[rows.pop() for _ in range(n)] + [-1] * (nmax - n) for n in sizes])
    return gr, rand_tables(rng, prefix_lens, num_pages, ps), torch.tensor(prefix_lens)


@pytest.mark.parametrize("case", range(12))
def test_fuzz_cascade_decode(case):
    """Groups of different sizes (some rows in none), prefix 0 or off the block sizes,
    empty suffixes; the cascade equals the reference, and equals paged decode over the
    prefix pages followed by the suffix pages when the prefix is whole pages."""
    rng = random.Random(200 + case)
    torch.manual_seed(200 + case)
    s = attention_shape(rng)
    ps = s["ps"]
    G = rng.choice([1, 2, 3])
    sizes = [rng.choice([1, 2, 5]) for _ in range(G)]
    if rng.random() < 0.2:
        sizes[0] = 22  # 22 samples x 3 or 4 query heads: two tiles of the prefix kernel
    B = sum(sizes) + rng.choice([0, 1])
    whole = rng.random() < 0.5  # prefixes of whole pages, as the engine shares them
    prefix_lens = [rng.choice([0, 1, rng.randrange(1, 70)]) for _ in range(G)]
    if whole:
        prefix_lens = [-(-c // ps) * ps for c in prefix_lens]
    suffix_lens = [rng.choice([0, 1, rng.randrange(1, 40)]) for _ in range(B)]
    num_pages = sum(-(-n // ps) for n in prefix_lens + suffix_lens) + 3
    kc, vc = rand_cache(rng, num_pages, ps, s["hkv"], s["d"], s["dtype"])
    gr, pp, pl = rand_groups(rng, B, sizes, prefix_lens, num_pages, ps)
    sp = rand_tables(rng, suffix_lens, num_pages, ps)
    sl = torch.tensor(suffix_lens)
    q = rand_q(rng, B, s["h"], s["d"], s["dtype"])
    scale = s["d"] ** -0.5
    splits = rng.choice([None, 1, 2])
    got = cascade_decode_triton(q, kc, vc, gr, pp, pl, sp, sl, scale, prefix_splits=splits,
                                suffix_splits=rng.choice([None, 1, 3]))
    qf, kf, vf = up(q, kc, vc)
    want = cascade_decode_ref(qf, kf, vf, gr, pp.long(), pl, sp.long(), sl, scale)
    torch.testing.assert_close(got, want, **TOL[s["dtype"]])
    o1, l1 = shared_prefix_triton(q, kc, vc, gr, pp, pl, scale, splits=splits)
    w1, wl1 = shared_prefix_ref(qf, kf, vf, gr, pp.long(), pl, scale)
    torch.testing.assert_close(o1, w1, **TOL[s["dtype"]])
    torch.testing.assert_close(l1, wl1, **TOL[s["dtype"]])
    if whole:  # one attention over prefix + suffix: the split into stages is exact
        group_of = {r: g for g in range(G) for r in gr[g].tolist() if r >= 0}
        rows, lens = [], []
        for r in range(B):
            g = group_of.get(r)
            pre = pp[g, :prefix_lens[g] // ps].tolist() if g is not None else []
            rows.append(pre + sp[r, :-(-suffix_lens[r] // ps)].tolist())
            lens.append(suffix_lens[r] + (prefix_lens[g] if g is not None else 0))
        width = max(1, max(map(len, rows)))
        full = torch.tensor([x + [0] * (width - len(x)) for x in rows])
        one, _ = paged_decode_triton(q, kc, vc, full, torch.tensor(lens), scale)
        torch.testing.assert_close(one, want, **TOL[s["dtype"]])


def test_fuzz_merge_states_is_exact_and_handles_empty_sides():
    g = torch.Generator().manual_seed(7)
    o_a, o_b = torch.randn(5, 3, 12, generator=g), torch.randn(5, 3, 12, generator=g)
    l_a, l_b = torch.randn(5, 3, generator=g) * 5, torch.randn(5, 3, generator=g) * 5
    empty_a, empty_b = torch.rand(5, 3, generator=g) < 0.3, torch.rand(5, 3, generator=g) < 0.3
    empty_a[0, 0] = empty_b[0, 0] = True  # both sides empty
    l_a[empty_a], l_b[empty_b] = -math.inf, -math.inf
    o_a[empty_a], o_b[empty_b] = 0, 0
    got, got_lse = merge_states_triton(o_a, l_a, o_b, l_b)
    m = torch.maximum(l_a, l_b)
    m = torch.where(torch.isinf(m), 0, m)
    wa, wb = torch.exp(l_a - m), torch.exp(l_b - m)
    want = (o_a * wa[..., None] + o_b * wb[..., None]) / (wa + wb).clamp_min(1e-30)[..., None]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_lse, m + torch.log(wa + wb), atol=1e-6, rtol=1e-5)
    both = empty_a & empty_b
    assert both.any() and torch.all(got_lse[both] == -math.inf) and torch.all(got[both] == 0)


@pytest.mark.parametrize("case", range(10))
def test_fuzz_extend_attention(case):
    """Several sequences per launch: prefix 0 or not page aligned, empty extends, extends
    longer than a block of new tokens, page sizes 1..32, GQA, strided q and caches."""
    rng = random.Random(300 + case)
    torch.manual_seed(300 + case)
    s = attention_shape(rng)
    ps = s["ps"]
    S = rng.choice([1, 2, 3])
    prefix_lens = [rng.choice([0, ps, rng.randrange(0, 50)]) for _ in range(S)]
    extend_lens = [rng.choice([0, 1, rng.randrange(1, 45)]) for _ in range(S)]
    if sum(extend_lens) == 0:
        extend_lens[0] = 3
    lens = [c + t for c, t in zip(prefix_lens, extend_lens)]
    num_pages = sum(-(-n // ps) for n in lens) + 2
    kc, vc = rand_cache(rng, num_pages, ps, s["hkv"], s["d"], s["dtype"])
    free = list(range(num_pages))
    rng.shuffle(free)
    # page tables may hold spare pages past the sequence
    tables = [torch.tensor([free.pop() for _ in range(-(-n // ps))]
                           + [0] * rng.choice([0, 1]), dtype=torch.int64) for n in lens]
    q = rand_q(rng, sum(extend_lens), s["h"], s["d"], s["dtype"])
    scale = s["d"] ** -0.5
    got = extend_attention_triton(q, kc, vc, tables, prefix_lens, extend_lens, scale)
    want = extend_attention_ref(*up(q, kc, vc), tables, prefix_lens, extend_lens, scale)
    assert got.dtype == s["dtype"] and got.shape == q.shape
    torch.testing.assert_close(got.float(), want, **TOL[s["dtype"]])


def rand_logits(gen, B, V, kind):
    if kind == "ties":  # runs of equal values at every threshold
        return torch.randint(-2, 3, (B, V), generator=gen).float()
    x = torch.randn(B, V, generator=gen) * (8 if kind == "peaked" else 2)
    if kind == "inf":  # some -inf logits (masked vocabulary)
        x[torch.rand(B, V, generator=gen) < 0.3] = -math.inf
        x[:, 0] = 0.5  # every row keeps a finite logit
    return x


def rand_sampling_params(gen, B):
    pick = lambda vals: torch.tensor(vals)[torch.randint(0, len(vals), (B,), generator=gen)]
    return (pick([0.0, 1.0, 0.6, 1.7, 1e-3]), pick([-1, -1, 1, 2, 7, 100000]),
            pick([1.0, 1.0, 0.9, 0.3, 1e-6]), pick([0.0, 0.0, 0.1, 0.999, 1.0]))


@pytest.mark.parametrize("case", range(20))
def test_fuzz_sampler_draws_the_reference_tokens(monkeypatch, case):
    """Exactly the reference's tokens and logprobs within 1e-6: vocabularies of 1..200,
    blocks smaller than the vocabulary, ties, -inf logits, tiny temperatures, top_k=1,
    top_p 1e-6, min_p 0.999/1, banned tokens, strided logits rows."""
    rng = random.Random(400 + case)
    gen = torch.Generator().manual_seed(400 + case)
    monkeypatch.setattr(st, "BLOCK", rng.choice([16, 64, 1024]))
    monkeypatch.setattr(st, "SEARCH_BLOCK", rng.choice([16, 128]))
    monkeypatch.setattr(st, "NT", rng.choice([4, 8, 16]))
    B = rng.choice([1, 3, 6])
    V = [1, 2, 7, 33, 70, 200, 130, 64][case % 8]
    dtype = rng.choice(DTYPES)
    kind = rng.choice(["ties", "normal", "peaked", "inf"])
    logits = rand_logits(gen, B, V, kind)
    if rng.random() < 0.5:  # rows of a wider buffer (stride(0) > V)
        logits = torch.cat([logits, torch.zeros(B, 3)], 1)[:, :V]
    logits = logits.to(dtype)
    params = rand_sampling_params(gen, B)
    banned = None
    if V > 1 and rng.random() < 0.5:
        banned = torch.rand(B, V, generator=gen) < 0.3
        banned[:, rng.randrange(V)] = False  # one allowed token per row at least
        banned[:, 0] &= kind != "inf"  # and a finite one (logit 0 of an "inf" row)
    keys = row_keys([case] * B, [rng.randrange(5)] * B, list(range(B)), [rng.randrange(9)] * B)
    t_ref, lp_ref = sample_ref(logits, *params, keys, banned)
    t_tr, lp_tr = st.sample_triton(logits, *params, keys, banned)
    assert torch.equal(t_tr, t_ref), (t_tr, t_ref)
    torch.testing.assert_close(lp_tr, lp_ref, rtol=0, atol=1e-6)


def test_sampler_single_survivor_edges_pick_the_reference_token():
    """top_k=1, top_p tiny, min_p 1 and ties at the max: only the max (or its ties) may be
    drawn; with ties the draw still follows the reference's index order."""
    B, V = 8, 9
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, -1.0, 3.0, 2.0, 0.5, 3.0]]).expand(B, V)
    ones, off = torch.ones(B), torch.full((B,), -1)
    keys = row_keys([3] * B, [0] * B, list(range(B)), [0] * B)
    for params in [(ones, torch.ones(B, dtype=torch.long), ones, torch.zeros(B)),
                   (ones, off, torch.full((B,), 1e-7), torch.zeros(B)),
                   (ones, off, ones, ones)]:
        t_ref, lp_ref = sample_ref(logits.contiguous(), *params, keys)
        t_tr, lp_tr = st.sample_triton(logits.contiguous(), *params, keys)
        assert torch.equal(t_tr, t_ref)
        assert set(t_tr.tolist()) <= {1, 3, 5, 8} and len(set(t_tr.tolist())) > 1
        torch.testing.assert_close(lp_tr, lp_ref, rtol=0, atol=1e-6)


def test_sampler_uniforms_on_a_cumulative_boundary_draw_the_next_token():
    """u * total equal to a cumulative weight (equal logits, u = 0, 1/4, 1/2, 3/4 exactly)
    draws the token after the boundary, as the reference's `c_i > u * total` does."""
    B, V = 4, 4
    keys = np.array([0, 1 << 62, 1 << 63, 3 << 62], dtype=np.uint64)
    params = (torch.ones(B), torch.full((B,), -1), torch.ones(B), torch.zeros(B))
    logits = torch.zeros(B, V)
    t_ref, _ = sample_ref(logits, *params, keys)
    t_tr, _ = st.sample_triton(logits, *params, keys)
    assert t_ref.tolist() == [0, 1, 2, 3] and torch.equal(t_tr, t_ref)


def test_sampler_top_p_just_below_and_above_a_cumulative_mass():
    """top_p 1e-5 below / above the top token's probability (and the top two's) keeps one
    / two (two / three) tokens, far from float32 rounding of the mass."""
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    probs = torch.softmax(logits.double(), -1)
    cut = [probs[0], probs[0], probs[:2].sum(), probs[:2].sum()]
    top_p = torch.tensor([float(c) + d for c, d in zip(cut, [-1e-5, 1e-5, -1e-5, 1e-5])])
    rows = 48  # 12 draws per setting: the excluded tokens would show up
    top_p = top_p.repeat_interleave(rows // 4)
    params = (torch.ones(rows), torch.full((rows,), -1), top_p, torch.zeros(rows))
    keys = row_keys([9] * rows, [0] * rows, list(range(rows)), [0] * rows)
    x = logits.expand(rows, -1).contiguous()
    t_ref, lp_ref = sample_ref(x, *params, keys)
    t_tr, lp_tr = st.sample_triton(x, *params, keys)
    assert torch.equal(t_tr, t_ref)
    kept = [len(set(t.tolist())) for t in t_tr.view(4, rows // 4)]
    assert kept == [1, 2, 2, 3], kept
    torch.testing.assert_close(lp_tr, lp_ref, rtol=0, atol=1e-6)


def dense_stats(hidden, weight, bias, targets, temperature):
    """The plain definition: the full [T, V] log-softmax, differentiable by autograd."""
    z = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
    logp = torch.log_softmax(z, -1)
    return logp.gather(1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("case", range(10))
def test_fuzz_token_logprob_forward_and_gradients(case):
    """The fused forward (and the chunked backward it shares with the reference) against
    torch autograd of the dense formula: T, V, H off the blocks (T=1, V=1 included),
    bias or not (strided bias), temperatures, float16."""
    rng = random.Random(500 + case)
    g = torch.Generator().manual_seed(500 + case)
    T, H, V = [(1, 5, 1), (17, 33, 70), (3, 1, 40), (20, 40, 65), (9, 16, 33)][case % 5]
    dtype = rng.choice(DTYPES) if case else torch.float32
    temperature = rng.choice([1.0, 0.6, 1.9])
    hidden = torch.randn(T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 2 * H ** -0.5).to(dtype)
    bias = None
    if rng.random() < 0.7:
        bias = torch.randn(2 * V, generator=g)[::2].to(dtype)  # strided half the time
        bias = bias if rng.random() < 0.5 else bias.contiguous()
    targets = torch.randint(0, V, (T,), generator=g)
    a, b = torch.randn(T, generator=g), torch.randn(T, generator=g)

    def run(fn, cast):
        leaves = [cast(t).detach().requires_grad_() for t in (hidden, weight, bias)
                  if t is not None]
        lp, ent = fn(*leaves, *([None] if bias is None else []))
        ((a * lp).sum() + (b * ent).sum()).backward()
        return [lp.detach(), ent.detach()] + [t.grad.float() for t in leaves]

    want = run(lambda h, w, bb: dense_stats(h, w, bb, targets, temperature),
               lambda t: t.double())
    got = run(lambda h, w, bb: token_logprob_entropy(h, w, targets, bb, temperature,
                                                     impl="triton", chunk=rng.choice([7, 64])),
              lambda t: t)
    tol = 3e-5 if dtype == torch.float32 else 4e-3
    for i, (x, y) in enumerate(zip(got, want)):
        if i >= 2 and dtype == torch.float16:
            # the backward recomputes the logits in fp16 (as a bf16/fp16 LM head does), so
            # p carries their rounding: errors reach 0.4% of the largest gradient here
            assert (x - y.float()).abs().max() <= 1e-2 * y.abs().max(), i
        else:
            torch.testing.assert_close(x, y.float(), rtol=tol, atol=tol)
    lse_ref = torch.logsumexp(torch.nn.functional.linear(
        hidden.double(), weight.double(), None if bias is None else bias.double())
        / temperature, -1)
    torch.testing.assert_close(token_stats_triton(hidden, weight, bias, targets,
                                                  temperature)[2], lse_ref.float(),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("case", range(6))
def test_fuzz_rms_norm_and_rope(case):
    rng = random.Random(600 + case)
    torch.manual_seed(600 + case)
    dtype = DTYPES[case % 2]
    hidden = rng.choice([1, 3, 40, 130])
    lead = rng.choice([(1,), (5,), (2, 3)])
    x = torch.randn(*lead, hidden + 2).to(dtype)[..., 1:hidden + 1]  # strided rows
    r = torch.randn(*lead, hidden).to(dtype)
    w = (1 + 0.3 * torch.randn(hidden)).to(dtype)
    eps = rng.choice([1e-6, 1e-2])
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=8e-3, rtol=4e-3)
    torch.testing.assert_close(rms_norm_triton(x, w, eps), rms_norm_ref(x, w, eps), **tol)
    got, got_sum = add_rms_norm_triton(x, r, w, eps)
    want, want_sum = add_rms_norm_ref(x, r, w, eps)
    assert torch.equal(got_sum, want_sum)
    torch.testing.assert_close(got, want, **tol)
    T, heads, d = rng.choice([1, 6]), rng.choice([1, 3, 17]), rng.choice([2, 6, 16, 24])
    if case % 3:  # a strided view, as q/k out of a fused projection
        xr = torch.randn(T, heads + 2, d).to(dtype)[:, 1:heads + 1]
    else:  # heads outermost: a head stride of T * d
        T, heads = 5, max(heads, 3)
        xr = torch.randn(heads, T, d).to(dtype).transpose(0, 1)
    ang = torch.rand(T, d // 2) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    torch.testing.assert_close(apply_rope_triton(xr, cos, sin), apply_rope_ref(xr, cos, sin),
                               **tol)


# ---------------------------------------------------------------- bad input, bug repros


def small_decode_case():
    kc, vc = torch.randn(6, 4, 1, 16), torch.randn(6, 4, 1, 16)
    q = torch.randn(3, 2, 16)
    gr, pp, pl = torch.tensor([[0, 1, 2]]), torch.tensor([[1, 2]]), torch.tensor([6])
    sp, sl = torch.tensor([[3], [4], [5]]), torch.tensor([2, 3, 1])
    return q, kc, vc, gr, pp, pl, sp, sl


def test_cascade_rejects_group_rows_outside_q():
    """Bug: a group row >= B made stage 1 write past the partials buffer (no error)."""
    q, kc, vc, gr, pp, pl, sp, sl = small_decode_case()
    for bad in (torch.tensor([[0, 1, 3]]), torch.tensor([[0, -2, 1]])):  # B = 3
        with pytest.raises(ValueError, match="group_rows must be -1"):
            shared_prefix_triton(q, kc, vc, bad, pp, pl, 0.25)
        with pytest.raises(ValueError, match="group_rows must be -1"):
            cascade_decode_triton(q, kc, vc, bad, pp, pl, sp, sl, 0.25)


def test_cascade_rejects_lengths_past_their_page_tables():
    """Bug: a prefix or suffix longer than its pages hold read other rows' page ids."""
    q, kc, vc, gr, pp, pl, sp, sl = small_decode_case()
    with pytest.raises(ValueError, match="prefix of 9 tokens"):
        cascade_decode_triton(q, kc, vc, gr, pp, torch.tensor([9]), sp, sl, 0.25)
    with pytest.raises(ValueError, match="suffix of 5 tokens"):
        cascade_decode_triton(q, kc, vc, gr, pp, pl, sp, torch.tensor([2, 5, 1]), 0.25)
    torch.testing.assert_close(  # the same inputs within bounds are accepted
        cascade_decode_triton(q, kc, vc, gr, pp, pl, sp, sl, 0.25),
        cascade_decode_ref(q, kc, vc, gr, pp, pl, sp, sl, 0.25), atol=1e-5, rtol=1e-5)


def test_extend_rejects_page_tables_shorter_than_the_sequence():
    """Bug: a page table with fewer pages than prefix + extend tokens need made the kernel
    read past its row (a segfault under the interpreter); the reference raises too."""
    kc, vc, q = torch.randn(10, 4, 2, 8), torch.randn(10, 4, 2, 8), torch.randn(6, 2, 8)
    with pytest.raises(ValueError, match="page table is too short"):
        extend_attention_triton(q, kc, vc, [torch.tensor([1])], [2], [6], 0.3)
    with pytest.raises(ValueError, match="page table is too short"):
        extend_attention_triton(q, kc, vc, [torch.tensor([1, 2]), torch.zeros(0, dtype=int)],
                                [2, 0], [5, 1], 0.3)
    got = extend_attention_triton(q, kc, vc, [torch.tensor([1, 2])], [2], [6], 0.3)
    want = extend_attention_ref(q, kc, vc, [torch.tensor([1, 2])], [2], [6], 0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_token_stats_triton_reads_a_strided_bias():
    """Bug: the kernel indexed bias with unit stride, so a strided bias (a view) gave
    logprobs off by ~1.6."""
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(5, 16, generator=g), torch.randn(40, 16, generator=g)
    bias = torch.randn(80, generator=g)[::2]
    targets = torch.randint(0, 40, (5,), generator=g)
    got = token_stats_triton(hidden, weight, bias, targets)
    want = dense_stats(hidden, weight, bias, targets, 1.0)
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got[1], want[1], atol=2e-5, rtol=2e-5)


def test_token_stats_triton_rejects_targets_outside_the_vocabulary():
    """Bug: an out-of-range target silently gave logp = -lse (or -inf when it fell on a
    masked column of the last block); the reference raises."""
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(5, 16, generator=g), torch.randn(40, 16, generator=g)
    for targets in (torch.tensor([0, 1, 40, 2, 3]), torch.tensor([0, -1, 2, 2, 3])):
        with pytest.raises(ValueError, match="targets outside"):
            token_stats_triton(hidden, weight, None, targets)
        with pytest.raises(ValueError, match="targets outside"):
            token_logprob_entropy(hidden, weight, targets, impl="triton")


def test_launchers_reject_bad_splits_devices_and_dtypes(monkeypatch):
    """Wrong split counts, float64 or integer tensors, wrong ranks: ValueError naming the
    problem; on CPU without the interpreter, a ValueError instead of a driver assert."""
    q, kc, vc, gr, pp, pl, sp, sl = small_decode_case()
    with pytest.raises(ValueError, match="splits must be a positive int"):
        paged_decode_triton(q, kc, vc, sp, sl, 0.25, splits=0)
    with pytest.raises(ValueError, match="splits must be a positive int"):
        cascade_decode_triton(q, kc, vc, gr, pp, pl, sp, sl, 0.25, prefix_splits=0)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        paged_decode_triton(q.double(), kc.double(), vc.double(), sp, sl, 0.25)
    with pytest.raises(ValueError, match="seq_lens must be int32 or int64"):
        paged_decode_triton(q, kc, vc, sp, sl.float(), 0.25)
    with pytest.raises(ValueError, match="group_rows must have 2 dims"):
        cascade_decode_triton(q, kc, vc, gr[0], pp, pl, sp, sl, 0.25)
    o, lse = torch.zeros(2, 4), torch.zeros(2)
    with pytest.raises(ValueError, match="must be float32"):
        merge_states_triton(o.half(), lse, o, lse)
    B, V = 2, 5
    logits = torch.randn(B, V)
    params = (torch.ones(B), torch.full((B,), -1), torch.ones(B), torch.zeros(B))
    keys = row_keys([0] * B, [0] * B, [0, 1], [0] * B)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        st.sample_triton(logits.double(), *params, keys)
    with pytest.raises(ValueError, match="contiguous"):
        st.sample_triton(torch.randn(V, B).t(), *params, keys)
    with pytest.raises(ValueError, match="must have 3 dims"):
        apply_rope_triton(torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="head_dim must be even"):
        apply_rope_triton(torch.randn(4, 2, 7), torch.randn(4, 7), torch.randn(4, 7))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for call in (lambda: merge_states_triton(o, lse, o, lse),
                 lambda: st.sample_triton(logits, *params, keys),
                 lambda: rms_norm_triton(logits, torch.ones(V), 1e-6),
                 lambda: token_stats_triton(torch.randn(2, 4), torch.randn(3, 4), None,
                                            torch.tensor([0, 1])),
                 lambda: extend_attention_triton(torch.randn(2, 2, 16), kc, vc,
                                                 [torch.tensor([1])], [0], [2], 0.25)):
        with pytest.raises(ValueError, match="CUDA"):
            call()
