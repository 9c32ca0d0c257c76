"""Held-out evaluation, as the BroRL blog reports it: accuracy averaged over k samples per
problem (mean@k), pass@k, and mean response tokens; and the score of the greedy answer,
which tells sharpening (mean@k at temperature 1 rises, greedy does not) from learning."""

from __future__ import annotations

import math

from brorl.trainer.config import TrainConfig
from brorl.trainer.data import Problem
from brorl.trainer.rollout import generate_groups, sample_seed

_EVAL_STEP = 10**9  # keeps evaluation seeds apart from rollout seeds


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(engine, problems: list[Problem], cfg: TrainConfig, pool,
             seed: int | None = None) -> dict:
    """mean@k (mean score over the k samples of each problem, averaged over problems),
    pass@k (a sample scoring 1), and mean response tokens. The same seed draws the same
    noise, so two policies are compared on equal terms."""
    e = cfg.eval
    seed = cfg.seed if seed is None else seed
    seeds = [sample_seed(seed, _EVAL_STEP, 0, i) for i in range(len(problems))]
    groups = generate_groups(engine, problems, cfg, seeds, pool, e.sampling)
    mean_at_k = sum(float(g.rewards.mean()) for g in groups) / len(groups)
    passed = sum(pass_at_k(g.n, int((g.rewards >= 1.0 - 1e-9).sum()), g.n) for g in groups)
    tokens = [len(ids) for g in groups for ids in g.response_ids]
    out = {"eval/mean_at_k": mean_at_k, "eval/pass_at_k": passed / len(groups),
           "eval/mean_response_tokens": sum(tokens) / len(tokens), "eval/k": e.k,
           "eval/problems": len(groups)}
    if e.greedy:
        greedy = generate_groups(engine, problems, cfg, seeds, pool, e.greedy_sampling)
        out["eval/greedy"] = sum(float(g.rewards[0]) for g in greedy) / len(greedy)
    return out
