"""build_samples: advantages over all N samples of a group, and with
algorithm.train_samples_per_group = k only the k max-variance samples enter the loss."""

import pytest
import torch

from trainer.algorithms import compute_advantages
from trainer.config import TrainConfig, load_config
from trainer.data import Problem
from trainer.rollout import Group
from trainer.update import build_samples


def make_groups(rewards: list[list[float]]) -> list[Group]:
    out = []
    for gi, row in enumerate(rewards):
        n = len(row)
        out.append(Group(Problem(f"p{gi}", "1", "math"), [1, 2, 3],
                         [[10 + j, 11] for j in range(n)], [[-0.1 * j, -0.2] for j in range(n)],
                         ["stop"] * n, torch.tensor(row)))
    return out


@pytest.mark.parametrize("k", [0, 4, 6])
def test_down_sampling_keeps_k_per_group_with_full_group_advantages(k):
    rewards = [[0, 0, 1, 0, 0, 1, 0, 0], [1, 1, 1, 0, 1, 1, 0, 1]]
    cfg = load_config(None, [f"algorithm.train_samples_per_group={k}"])
    assert isinstance(cfg, TrainConfig)
    groups = make_groups(rewards)
    samples, _ = build_samples(groups, cfg, torch.Generator().manual_seed(0))
    adv = compute_advantages(cfg.algorithm.advantage, torch.tensor(rewards))
    per_group = len(rewards[0]) if k == 0 else k
    assert len(samples) == 2 * per_group
    for gi, g in enumerate(groups):
        mine = samples[gi * per_group:(gi + 1) * per_group]
        idx = [s.ids[3] - 10 for s in mine]  # the response's first token names its sample
        assert idx == sorted(idx) and len(set(idx)) == per_group
        for s, j in zip(mine, idx):
            assert s.advantage == pytest.approx(float(adv[gi, j]))
            assert s.behaviour_logprobs == g.behaviour_logprobs[j]
        if k:  # the picks are as balanced as the group allows
            picked = torch.tensor(rewards[gi])[idx]
            assert 0 < picked.sum() < k


def test_negative_train_samples_per_group_is_a_config_error():
    with pytest.raises(ValueError, match="train_samples_per_group"):
        load_config(None, ["algorithm.train_samples_per_group=-1"])
