"""The sampler: exact agreement of the numba path and of the shared-row sampler with the
torch reference, the sampled distribution (chi-square), truncation sets, greedy rows,
logprobs and noise keys."""

import math

import numpy as np
import pytest
import torch

from brorl.kernels.sampling import (
    row_keys,
    sample,
    sample_ref,
    sample_rows_ref,
    scaled_logits,
    truncation_threshold_ref,
)

# chi-square critical values at p = 0.001 (from tables), by degrees of freedom
CHI2_999 = {7: 24.32, 15: 37.70}


def params(B, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0):
    def full(v, dtype):
        return torch.full((B,), v, dtype=dtype)

    return (full(temperature, torch.float32), full(top_k, torch.int64),
            full(top_p, torch.float32), full(min_p, torch.float32))


def keys_for(B, seed=0, position=0):
    return row_keys([seed] * B, [0] * B, list(range(B)), [position] * B)


def test_row_keys_are_deterministic_and_distinct():
    k1 = row_keys([1, 1, 1, 2], [0, 0, 1, 0], [0, 1, 0, 0], [5, 5, 5, 5])
    k2 = row_keys([1, 1, 1, 2], [0, 0, 1, 0], [0, 1, 0, 0], [5, 5, 5, 5])
    assert np.array_equal(k1, k2) and len(set(k1.tolist())) == 4
    assert row_keys(1, 0, 0, 6)[0] != row_keys(1, 0, 0, 5)[0]


@pytest.mark.parametrize("case", [
    dict(), dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8), dict(min_p=0.05),
    dict(temperature=1.3, top_k=20, top_p=0.9, min_p=0.01), dict(temperature=0.0),
])
def test_numba_sampler_equals_reference(case):
    torch.manual_seed(0)
    B, V = 64, 300
    logits = torch.randn(B, V) * 3
    keys = keys_for(B, seed=11)
    p = params(B, **case)
    banned = torch.zeros(B, V, dtype=torch.bool)
    banned[::3, :7] = True
    for ban in (None, banned):
        t_ref, lp_ref = sample_ref(logits, *p, keys, ban)
        t_nb, lp_nb = sample(logits, *p, keys, ban, impl="numba")
        assert torch.equal(t_ref, t_nb)
        torch.testing.assert_close(lp_ref, lp_nb)


def test_sampled_frequencies_match_softmax_of_scaled_logits():
    V, B, T = 8, 40000, 0.8
    logits = torch.randn(V, generator=torch.Generator().manual_seed(1)) * 1.5
    tokens, logprobs = sample(logits.expand(B, V).contiguous(), *params(B, temperature=T),
                              keys_for(B, seed=3))
    probs = torch.softmax(logits / T, -1)
    counts = torch.bincount(tokens, minlength=V).double()
    chi2 = ((counts - B * probs) ** 2 / (B * probs)).sum().item()
    assert chi2 < CHI2_999[V - 1], chi2
    torch.testing.assert_close(logprobs, torch.log(probs)[tokens].float())


def naive_allowed(z, top_k, top_p, min_p):
    """Allowed token set of one row, from a sort (top-k, then top-p on renormalised
    probabilities, then min-p)."""
    order = sorted(range(len(z)), key=lambda i: -z[i])
    keep = order[:top_k] if top_k > 0 else order
    kept_z = torch.tensor([z[i] for i in keep])
    p = torch.softmax(kept_z, -1)
    if top_p < 1:
        cum, n = 0.0, 0
        while n < len(keep) and cum < top_p:
            cum += p[n].item()
            n += 1
        keep = keep[:n]
    zmax = max(z)
    return {i for i in keep if min_p == 0 or z[i] >= zmax + math.log(min_p)}


@pytest.mark.parametrize("top_k,top_p,min_p", [(3, 1.0, 0.0), (-1, 0.6, 0.0),
                                               (-1, 1.0, 0.2), (10, 0.9, 0.05)])
def test_truncation_never_emits_a_truncated_token(top_k, top_p, min_p):
    torch.manual_seed(4)
    B, V = 4000, 24
    base = torch.randn(4, V) * 2
    logits = base.repeat(B // 4, 1)
    tokens, _ = sample(logits, *params(B, top_k=top_k, top_p=top_p, min_p=min_p),
                       keys_for(B))
    z = scaled_logits(logits[:4], torch.ones(4))
    for r in range(4):
        allowed = naive_allowed(z[r].tolist(), top_k, top_p, min_p)
        drawn = set(tokens[r::4].tolist())
        assert drawn <= allowed
        assert len(drawn) == len(allowed)  # and every allowed token does occur
        thr = truncation_threshold_ref(z[r:r + 1], *params(1, top_k=top_k, top_p=top_p,
                                                           min_p=min_p)[1:])
        assert {i for i in range(V) if z[r, i] >= thr[0]} == allowed


def test_greedy_rows_take_the_argmax_and_report_unscaled_logprobs():
    torch.manual_seed(5)
    logits = torch.randn(6, 50)
    temperature = torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0, 0.5])
    p = (temperature, *params(6)[1:])
    tokens, lp = sample(logits, *p, keys_for(6))
    greedy = temperature == 0
    assert torch.equal(tokens[greedy], logits[greedy].argmax(-1))
    torch.testing.assert_close(lp[greedy], torch.log_softmax(logits[greedy], -1).gather(
        1, tokens[greedy, None])[:, 0])


def test_a_rows_draw_does_not_depend_on_the_other_rows():
    torch.manual_seed(6)
    logits = torch.randn(10, 40)
    keys = keys_for(10, seed=9)
    full, _ = sample(logits, *params(10), keys)
    for i in range(10):
        alone, _ = sample(logits[i:i + 1], *params(1), keys[i:i + 1])
        assert alone.item() == full[i].item()


def test_banned_tokens_are_never_drawn_but_logprobs_use_the_full_vocabulary():
    logits = torch.zeros(2000, 5)
    logits[:, 0] = 3.0
    banned = torch.zeros(2000, 5, dtype=torch.bool)
    banned[:, 0] = True
    tokens, lp = sample(logits, *params(2000), keys_for(2000), banned)
    assert not (tokens == 0).any()
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0])


@pytest.mark.parametrize("truncate", [False, True])
def test_numba_sampler_equals_reference_with_mixed_rows(truncate):
    """Rows with different temperatures (greedy ones among them) in one batch: the fused
    path (no truncation, scaling inside the kernel) and the truncating path."""
    torch.manual_seed(1)
    B, V = 48, 1000
    logits = torch.randn(B, V) * 4
    temperature = torch.tensor([0.0, 0.3, 1.0, 1.7] * (B // 4))
    top_k = torch.tensor([0, 0, 50, 0] * (B // 4)) if truncate else torch.zeros(B, dtype=int)
    top_p = torch.full((B,), 0.9 if truncate else 1.0)
    min_p = torch.zeros(B)
    keys = keys_for(B, seed=3, position=7)
    t_ref, lp_ref = sample_ref(logits, temperature, top_k, top_p, min_p, keys)
    t_nb, lp_nb = sample(logits, temperature, top_k, top_p, min_p, keys, impl="numba")
    assert torch.equal(t_ref, t_nb)
    torch.testing.assert_close(lp_ref, lp_nb)
    assert torch.equal(t_nb[::4], logits[::4].argmax(-1))


def test_vectorised_exp_is_within_an_ulp_of_libm():
    from brorl.kernels.sampling_numba import _exp_nonpositive

    xs = np.concatenate([-np.random.default_rng(0).random(20000) * 50,
                         -np.random.default_rng(1).random(2000) * 700, [0.0, -1e-300, -707.9]])
    got = np.array([_exp_nonpositive(x) for x in xs])
    want = np.exp(xs)
    assert np.all(np.abs(got - want) <= 2.3e-16 * want), np.max(np.abs(got - want) / want)
    assert _exp_nonpositive(-np.inf) == 0.0 and _exp_nonpositive(-800.0) == 0.0


@pytest.mark.parametrize("ban", [False, True])
def test_shared_rows_draw_what_the_reference_draws_on_repeated_rows(ban):
    """sample_rows_ref on R distinct rows shared by B samples equals sample_ref on the
    rows repeated, token for token and logprob for logprob."""
    torch.manual_seed(2)
    R, V = 8, 500
    logits = torch.randn(R, V) * 3
    temperature = torch.tensor([1.0, 0.0, 0.6, 1.4, 1.0, 1.0, 0.8, 1.0])
    top_k = torch.tensor([-1, -1, 40, -1, 5, -1, -1, -1])
    top_p = torch.tensor([1.0, 1.0, 0.9, 1.0, 1.0, 0.7, 1.0, 1.0])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.0])
    banned = None
    if ban:
        banned = torch.zeros(R, V, dtype=torch.bool)
        banned[::2, logits[0].argmax()] = True
        banned[1, :250] = True
    rows = torch.tensor([0, 3, 0, 1, 2, 2, 2, 7, 5, 5, 4, 6, 0, 3, 6, 5] * 4)
    B = rows.shape[0]
    keys = keys_for(B, seed=5, position=3)
    tokens, logprobs = sample_rows_ref(logits, rows, temperature, top_k, top_p, min_p, keys,
                                       banned)
    expect_t, expect_lp = sample_ref(logits[rows], temperature[rows], top_k[rows], top_p[rows],
                                     min_p[rows], keys, None if banned is None else banned[rows])
    assert torch.equal(tokens, expect_t)
    assert torch.equal(logprobs, expect_lp)
    assert len(set(tokens[rows == 0].tolist())) > 1  # samples of one row draw apart
    assert len(set(tokens[rows == 1].tolist())) == 1  # a greedy row does not


def test_shared_rows_reject_mismatched_shapes():
    logits = torch.randn(2, 10)
    with pytest.raises(ValueError, match="rows"):
        sample_rows_ref(logits, torch.tensor([0, 1, 1]), *params(2), keys_for(2))
