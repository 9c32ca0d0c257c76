"""BroRL's Theorem 1 (trainer/theory.py) against real SGD steps on random small policies."""

import pytest
import torch

from brorl.trainer.theory import (
    SimConfig,
    reinforce_loss,
    simulate,
    theorem_terms,
    token_rewards,
)

SEEDS = range(8)


def instance(seed: int, vocab: int = 50, n: int = 8):
    """A random policy, correct mask, N samples (with repeats) and rewards R_c >= 0 >= R_w."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, generator=gen, dtype=torch.float64) * 2
    correct = torch.rand(vocab, generator=gen) < 0.3
    correct[0], correct[1] = True, False  # both classes present
    p = torch.softmax(logits, -1)
    ids = torch.multinomial(p, n, replacement=True, generator=gen)
    r_c, r_w = float(torch.rand(1, generator=gen)) * 2, -float(torch.rand(1, generator=gen)) * 2
    return logits, correct, ids, r_c, r_w


def sgd_delta_q(logits, correct, ids, r_c, r_w, eta: float) -> float:
    """Actual change of Q_pos after one torch SGD step (lr eta) on the reinforce loss."""
    z = logits.clone().unsqueeze(0).requires_grad_(True)
    sampled = torch.zeros_like(correct).index_fill_(0, ids, True)
    opt = torch.optim.SGD([z], lr=eta)
    reinforce_loss(z, sampled, token_rewards(correct, r_c, r_w)).backward()
    opt.step()
    q = lambda x: float(torch.softmax(x.detach().reshape(-1), -1)[correct].sum())
    return q(z) - q(logits)


@pytest.mark.parametrize("seed", SEEDS)
def test_prediction_matches_sgd_step_to_first_order(seed):
    logits, correct, ids, r_c, r_w = instance(seed)
    pred = float(theorem_terms(torch.softmax(logits, -1), correct, ids, r_c, r_w).predicted)
    errors = []
    for eta in (1e-2, 1e-3, 1e-4):
        err = abs(sgd_delta_q(logits, correct, ids, r_c, r_w, eta) / eta - pred)
        assert err <= eta, (eta, err, pred)
        errors.append(err)
    # first order: the residual is O(eta), so shrinking eta 10x shrinks it about 10x
    for big, small in zip(errors, errors[1:]):
        assert 5 < big / small < 20, errors


@pytest.mark.parametrize("seed", SEEDS)
def test_sampled_terms_are_never_negative(seed):
    logits, correct, ids, r_c, r_w = instance(seed, n=3 + seed)
    t = theorem_terms(torch.softmax(logits, -1), correct, ids, r_c, r_w)
    assert float(t.sampled_pos) >= 0 and float(t.sampled_neg) >= 0
    assert float(t.p_pos + t.p_neg) <= 1 + 1e-12


def test_unsampled_term_vanishes_when_every_token_is_sampled():
    logits, correct, _, r_c, r_w = instance(0)
    ids = torch.cat([torch.arange(50), torch.tensor([3, 3, 7])])
    t = theorem_terms(torch.softmax(logits, -1), correct, ids, r_c, r_w)
    assert float(t.u_pos2) == 0 and float(t.u_neg2) == 0 and float(t.unsampled) == 0
    assert float(t.predicted) == pytest.approx(float(t.sampled_pos + t.sampled_neg))


def test_terms_of_a_hand_computed_instance():
    # p = (0.5, 0.3, 0.2); token 0 and 2 correct; sampled {1, 2}; R_c = 1, R_w = -1
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    t = theorem_terms(p, torch.tensor([True, False, True]), torch.tensor([2, 1, 2]), 1.0, -1.0)
    s_r = 0.2 - 0.3
    assert float(t.s_r) == pytest.approx(s_r)
    assert float(t.sampled_pos) == pytest.approx((1 - s_r) * 0.3 * 0.04)
    assert float(t.sampled_neg) == pytest.approx((s_r + 1) * 0.7 * 0.09)
    assert float(t.unsampled) == pytest.approx(s_r * (0.7 * 0.0 - 0.3 * 0.25))


def test_small_n_loses_correct_mass_more_often_than_large_n():
    cfg = SimConfig(vocab_size=256, num_correct=32, ns=(4, 512), trials=400, logit_std=2.0,
                    sgd_lr=0.1, seed=1)
    rows = {(r["n"], r["optimizer"]): r for r in simulate(cfg) if r["loss"] == "reinforce"}
    small, large = rows[4, "sgd"], rows[512, "sgd"]
    assert small["dq_neg_frac"] > large["dq_neg_frac"] + 0.05, (small, large)
    # the theorem's sign agrees with the actual step's sign (small lr: first order holds)
    assert abs(small["dq_neg_frac"] - small["predicted_neg_frac"]) < 0.02
    assert large["sampled_pos"] + large["sampled_neg"] > 10 * abs(large["unsampled"])
