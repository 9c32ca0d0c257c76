"""BroRL's Theorem 1 (correct-mass expansion) for one categorical policy, and its simulation.

Setting: a policy p = softmax(z) over V tokens, some of them correct. N samples are drawn
from p; a correct token earns R_c >= 0, a wrong one R_w <= 0. Q_pos / Q_neg are the total
probability of correct / wrong tokens. Over the DISTINCT sampled tokens, P_pos / P_neg are
their probability mass and A_2 / B_2 the sums of their squared probabilities (correct /
wrong); over the unsampled tokens, U_pos2 / U_neg2 are the sums of squared probabilities of
the correct / wrong ones. S_R = R_c P_pos + R_w P_neg is the batch "mood".

Theorem: for the logit update dz = eta * sum_{distinct sampled i} R_i grad_z p_i, with
grad_z p_i = p_i (e_i - p) (gradient ascent on J = sum_{distinct sampled i} R_i p_i, the
"reinforce" loss below), the first-order change of the correct mass is

    dQ_pos = eta [ (R_c - S_R) Q_neg A_2 + (S_R - R_w) Q_pos B_2
                   + S_R (Q_pos U_neg2 - Q_neg U_pos2) ].

It follows from dQ_pos = sum_{j correct} p_j dz_j - Q_pos sum_k p_k dz_k. The first two
(sampled) terms are never negative; only the third (unsampled) one can be, and it shrinks
as N grows since a token's expected unsampled contribution is p^2 (1 - p)^N.

`simulate` repeats the paper's token-level experiment: one optimizer step (SGD or AdamW)
on the logits for the "reinforce" loss -sum_{distinct i} R_i p_i and the plain sample-mean
loss -(1/N) sum_n R_n log p_{y_n}, recording the actual dQ_pos and the share of correct
tokens whose probability rose. Trials are rows of a (trials, V) logit tensor: both losses
are sums over rows and both optimizers are elementwise, so rows stay independent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

LOSSES = ("reinforce", "sample_mean")
OPTIMIZERS = ("sgd", "adamw")
REWARDS = ("fixed", "baseline")


@dataclass(frozen=True)
class MassTerms:
    """Theorem 1's quantities; each a tensor over the leading (trial) dims."""

    q_pos: torch.Tensor
    p_pos: torch.Tensor
    p_neg: torch.Tensor
    a2: torch.Tensor
    b2: torch.Tensor
    u_pos2: torch.Tensor
    u_neg2: torch.Tensor
    s_r: torch.Tensor
    sampled_pos: torch.Tensor  # (R_c - S_R) Q_neg A_2 >= 0
    sampled_neg: torch.Tensor  # (S_R - R_w) Q_pos B_2 >= 0
    unsampled: torch.Tensor    # S_R (Q_pos U_neg2 - Q_neg U_pos2), either sign

    @property
    def predicted(self) -> torch.Tensor:
        """First-order dQ_pos / eta: the sum of the three terms."""
        return self.sampled_pos + self.sampled_neg + self.unsampled


def mass_terms(p: torch.Tensor, correct: torch.Tensor, sampled: torch.Tensor,
               r_c, r_w) -> MassTerms:
    """Theorem 1's terms. p (..., V) probabilities; correct (V,) or (..., V) bool; sampled
    (..., V) bool, True for a token drawn at least once; r_c, r_w floats or (...) tensors."""
    pos, neg = correct.expand_as(p), ~correct.expand_as(p)
    sq = p * p
    s = lambda x, m: (x * m).sum(-1)
    q_pos, q_neg = s(p, pos), s(p, neg)
    p_pos, p_neg = s(p, pos & sampled), s(p, neg & sampled)
    a2, b2 = s(sq, pos & sampled), s(sq, neg & sampled)
    u_pos2, u_neg2 = s(sq, pos & ~sampled), s(sq, neg & ~sampled)
    s_r = r_c * p_pos + r_w * p_neg
    return MassTerms(q_pos, p_pos, p_neg, a2, b2, u_pos2, u_neg2, s_r,
                     sampled_pos=(r_c - s_r) * q_neg * a2,
                     sampled_neg=(s_r - r_w) * q_pos * b2,
                     unsampled=s_r * (q_pos * u_neg2 - q_neg * u_pos2))


def theorem_terms(p: torch.Tensor, correct: torch.Tensor, sample_ids: torch.Tensor,
                  r_c: float, r_w: float) -> MassTerms:
    """Theorem 1 for one policy: p (V,), correct (V,) bool, sample_ids (N,) with repeats."""
    assert p.dim() == 1 and correct.shape == p.shape and sample_ids.dim() == 1
    assert r_c >= 0 >= r_w, (r_c, r_w)
    sampled = torch.zeros_like(correct).index_fill_(0, sample_ids, True)
    return mass_terms(p, correct, sampled, r_c, r_w)


def token_rewards(correct: torch.Tensor, r_c, r_w) -> torch.Tensor:
    """R_k for every token: r_c where correct else r_w; r_c, r_w floats or (T, 1)."""
    return torch.where(correct, torch.as_tensor(r_c), torch.as_tensor(r_w))


def reinforce_loss(logits: torch.Tensor, sampled: torch.Tensor,
                   rewards: torch.Tensor) -> torch.Tensor:
    """-sum over rows and distinct sampled tokens of R_k p_k; its descent is Theorem 1's."""
    return -(torch.softmax(logits, -1) * rewards * sampled).sum()


def sample_mean_loss(logits: torch.Tensor, counts: torch.Tensor,
                     rewards: torch.Tensor) -> torch.Tensor:
    """-(1/N) sum over rows and the N samples of R log p; counts (T, V) sum to N per row."""
    n = counts.sum(-1, keepdim=True)
    return -(torch.log_softmax(logits, -1) * rewards * counts / n).sum()


@dataclass(frozen=True)
class SimConfig:
    """The token-level simulation: one policy, `trials` independent batches per N."""

    vocab_size: int = 131072
    num_correct: int = 10000
    ns: tuple[int, ...] = (1, 4, 16, 64, 256, 512, 2048)
    trials: int = 64
    logit_std: float = 3.0  # initial logits ~ N(0, logit_std^2)
    reward: str = "fixed"   # "fixed": R_c, R_w; "baseline": 1{correct} - group mean
    r_c: float = 1.0
    r_w: float = -1.0
    sgd_lr: float = 1.0
    adamw_lr: float = 1e-3
    weight_decay: float = 0.0  # > 0 also cools every logit
    adam_eps: float = 1e-8
    seed: int = 0

    def __post_init__(self):
        assert 0 < self.num_correct < self.vocab_size, (self.num_correct, self.vocab_size)
        assert self.ns and min(self.ns) >= 1 and self.trials >= 1
        assert self.reward in REWARDS, f"reward {self.reward!r}: one of {REWARDS}"
        assert self.r_c >= 0 >= self.r_w and self.sgd_lr > 0 and self.adamw_lr > 0


def _step(logits0: torch.Tensor, loss_fn, optimizer: str, cfg: SimConfig) -> torch.Tensor:
    """Logits after one optimizer step on loss_fn(logits) from logits0 (T, V)."""
    z = logits0.clone().requires_grad_(True)  # (T, V): one trial per row
    opt = torch.optim.SGD([z], lr=cfg.sgd_lr) if optimizer == "sgd" else \
        torch.optim.AdamW([z], lr=cfg.adamw_lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    loss_fn(z).backward()
    opt.step()
    return z.detach()


def _rewards(cfg: SimConfig, correct: torch.Tensor, counts: torch.Tensor, n: int):
    """(R_c, R_w) per trial, shape (T, 1): fixed, or 1{correct} minus the group's accuracy."""
    if cfg.reward == "fixed":
        return torch.tensor([[cfg.r_c]]), torch.tensor([[cfg.r_w]])
    acc = (counts * correct).sum(-1, keepdim=True) / n
    return 1.0 - acc, -acc


def _policies(cfg: SimConfig, gen: torch.Generator):
    """A fresh policy per trial: logits (T, V) ~ N(0, logit_std^2), a random correct set."""
    shape = (cfg.trials, cfg.vocab_size)
    logits = torch.randn(shape, generator=gen, dtype=torch.float64) * cfg.logit_std
    order = torch.rand(shape, generator=gen).argsort(-1)
    correct = torch.zeros(shape, dtype=torch.bool).scatter_(1, order[:, :cfg.num_correct], True)
    return logits, correct


def simulate(cfg: SimConfig) -> list[dict]:
    """One row per (N, loss, optimizer): actual dQ_pos and its sign, the share of correct
    tokens that gained, and the mean Theorem 1 terms of the same samples (float64). Every
    N reuses the same T policies; all four (loss, optimizer) pairs see the same samples."""
    gen = torch.Generator().manual_seed(cfg.seed)
    logits, correct = _policies(cfg, gen)
    p, logp0 = torch.softmax(logits, -1), torch.log_softmax(logits, -1)
    q0 = (p * correct).sum(-1)
    tol = 64 * torch.finfo(torch.float64).eps  # |dQ_pos| below this is rounding, not a sign
    rows = []
    for n in cfg.ns:
        ids = torch.multinomial(p.float(), n, replacement=True, generator=gen)
        counts = torch.zeros_like(p).scatter_add_(1, ids, torch.ones(ids.shape, dtype=p.dtype))
        sampled = counts > 0
        r_c, r_w = _rewards(cfg, correct, counts, n)
        terms = mass_terms(p, correct, sampled, r_c.squeeze(-1), r_w.squeeze(-1))
        rewards = token_rewards(correct, r_c, r_w)
        losses = {"reinforce": partial(reinforce_loss, sampled=sampled, rewards=rewards),
                  "sample_mean": partial(sample_mean_loss, counts=counts, rewards=rewards)}
        for loss in LOSSES:
            for opt in OPTIMIZERS:
                logp1 = torch.log_softmax(_step(logits, losses[loss], opt, cfg), -1)
                dq = (logp1.exp() * correct).sum(-1) - q0
                gained = ((logp1 > logp0) & correct).sum(-1) / cfg.num_correct
                rows.append(_row(n, loss, opt, cfg, dq, dq < -tol, gained, terms))
    return rows


def _row(n: int, loss: str, opt: str, cfg: SimConfig, dq: torch.Tensor, fell: torch.Tensor,
         gained: torch.Tensor, t: MassTerms) -> dict:
    """Means over trials; the theorem's terms are per unit learning rate."""
    mean = lambda x: float(x.double().mean())
    row = dict(n=n, loss=loss, optimizer=opt, q_pos=mean(t.q_pos), dq_mean=mean(dq),
               dq_neg_frac=mean(fell), gained_frac=mean(gained),
               all_gained_frac=mean(gained == 1.0), sampled_pos=mean(t.sampled_pos),
               sampled_neg=mean(t.sampled_neg), unsampled=mean(t.unsampled),
               predicted_neg_frac=mean(t.predicted < 0))
    if loss == "reinforce" and opt == "sgd":  # the theorem's own update: check first order
        pred = t.predicted * cfg.sgd_lr
        row["first_order_rel_err"] = mean((dq - pred).abs()) / max(mean(pred.abs()),
                                                                  math.ulp(1.0))
    return row
