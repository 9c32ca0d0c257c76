"""build_samples: advantages over all N samples of a group, and with
algorithm.train_samples_per_group = k only the k max-variance samples enter the loss.
policy_update: merging identical samples (optim.merge_identical_samples) takes the same
step as computing each one."""

import copy

import pytest
import torch

from brorl.trainer.algorithms import compute_advantages
from brorl.trainer.config import TrainConfig
from brorl.trainer.config_load import load_config
from brorl.trainer.data import Problem
from brorl.trainer.rollout import Group
from brorl.trainer.update import build_samples, merge_identical


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


def _groups_with_repeats(seed: int = 0) -> list[Group]:
    """Two groups of 6 samples in which responses repeat (with equal behaviour logprobs,
    as the engine gives them), as a peaked policy's do at large N."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for gi, pattern in enumerate([[0, 0, 1, 0, 2, 1], [0, 1, 1, 1, 1, 2]]):
        prompt = torch.randint(3, 100, (4 + gi,), generator=g).tolist()
        distinct = [torch.randint(3, 100, (2 + j,), generator=g).tolist() for j in range(3)]
        logprobs = [(-3.0 + 0.3 * torch.randn(len(r), generator=g)).tolist() for r in distinct]
        rewards = torch.tensor([float(j == 1) for j in pattern])
        out.append(Group(Problem(f"p{gi}", "1", "math"), prompt,
                         [list(distinct[j]) for j in pattern],
                         [list(logprobs[j]) for j in pattern], ["stop"] * 6, rewards))
    return out


@pytest.mark.parametrize("extra", [
    [],
    ["algorithm.loss_agg=seq-mean-token-mean"],
    ["algorithm.old_logprobs=recompute", "algorithm.tis=truncate", "algorithm.tis_low=0.9",
     "algorithm.tis_high=1.05"],
])
def test_merging_identical_samples_gives_the_same_step(tmp_path, extra):
    from brorl.trainer.policy import load_policy
    from brorl.trainer.update import policy_update
    from tests.helpers import make_checkpoint

    path = str(tmp_path / "policy")
    make_checkpoint(path, "qwen2", seed=2, tie_word_embeddings=True)
    base = ["algorithm.num_mini_batches=2", "optim.micro_batch_size=2",
            "algorithm.kl_coef=0.1", "algorithm.entropy_coef=0.01", *extra]
    results = {}
    for merge in (True, False):
        cfg = load_config(None, [*base, f"optim.merge_identical_samples={merge}"])
        model = load_policy(path)
        ref = load_policy(path).eval()
        opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.5)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        metrics = policy_update(model, opt, sched, _groups_with_repeats(), cfg, 0, ref,
                                torch.Generator().manual_seed(5))
        results[merge] = metrics, {n: p.detach().clone() for n, p in model.named_parameters()}
    (merged, p_merged), (plain, p_plain) = results[True], results[False]
    assert plain["train/distinct_samples"] == plain["train/samples"] == 12
    assert merged["train/distinct_samples"] < 12
    for name, p in p_plain.items():
        torch.testing.assert_close(p_merged[name], p, atol=1e-6, rtol=1e-5, msg=name)
    for k, v in plain.items():
        if k != "train/distinct_samples":
            assert merged[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    start = load_policy(path)
    moved = max((p_plain[n] - p).abs().max().item() for n, p in start.named_parameters())
    assert moved > 1e-4  # the step did something to compare


def test_fewer_samples_than_mini_batches_take_one_step_each(tmp_path):
    """12 samples, 16 mini-batches: 12 AdamW steps, exactly as 12 mini-batches take (the
    4 empty ones used to step AdamW on its momentum alone, and count as zero losses)."""
    from brorl.trainer.policy import load_policy
    from brorl.trainer.update import policy_update
    from tests.helpers import make_checkpoint

    path = str(tmp_path / "policy")
    make_checkpoint(path, "qwen2", seed=4)
    results = {}
    for k in (12, 16):
        cfg = load_config(None, [f"algorithm.num_mini_batches={k}"])
        model = load_policy(path)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        metrics = policy_update(model, opt, sched, _groups_with_repeats(), cfg, 0, None,
                                torch.Generator().manual_seed(5))
        assert sched.last_epoch == 12
        results[k] = metrics, [p.detach().clone() for p in model.parameters()]
    (m12, p12), (m16, p16) = results[12], results[16]
    assert all(torch.equal(a, b) for a, b in zip(p12, p16))
    assert m16 == m12


def test_merge_identical_keeps_apart_what_differs():
    from brorl.trainer.update import Sample

    a = Sample([1, 2, 3], 2, 0.5, [-1.0])
    rows = merge_identical([a, Sample([1, 2, 3], 2, 0.5, [-1.0]),
                                       Sample([1, 2, 3], 2, 0.25, [-1.0]),
                                       Sample([1, 2, 3], 2, 0.5, [-1.5]),
                                       Sample([1, 2, 4], 2, 0.5, [-1.0]),
                                       Sample([1, 2, 3], 1, 0.5, [-1.0])])
    assert [c for _, c in rows] == [2, 1, 1, 1, 1]
    assert rows[0][0] is a


def test_logprob_mismatch_weights_each_distinct_sample_by_its_count():
    import math

    from brorl.trainer.update import Sample, logprob_mismatch

    a = Sample([1, 2, 3, 4], 2, 0.5, [-1.0, -2.0])
    a.old_logprobs = [-1.5, -2.0]
    b = Sample([1, 2, 5], 2, 0.5, [-0.1])
    b.old_logprobs = [-0.1]
    got = logprob_mismatch([a, b], [3, 1])  # a stands for three samples
    assert got["mismatch/logprob_abs_mean"] == pytest.approx(3 * 0.5 / 7)
    assert got["mismatch/logprob_abs_max"] == pytest.approx(0.5)
    assert got["mismatch/prob_abs_mean"] == pytest.approx(
        3 * abs(math.exp(-1.5) - math.exp(-1.0)) / 7)
    assert logprob_mismatch([], []) == {}


def test_recompute_counts_the_mismatch_of_each_behaviour_even_for_equal_tokens(tmp_path):
    """Two samples with the same tokens but behaviour logprobs apart (two groups of one
    prompt, or a batch-dependent kernel) share their recomputed old logprobs, yet each
    one's mismatch counts: merged or not, the statistics are the same."""
    from brorl.trainer.policy import load_policy
    from brorl.trainer.update import Sample, recompute_old_logprobs
    from tests.helpers import make_checkpoint

    path = str(tmp_path / "policy")
    make_checkpoint(path, "qwen2", seed=2)
    model = load_policy(path).eval()
    got = {}
    for merge in (True, False):
        cfg = load_config(None, ["algorithm.old_logprobs=recompute",
                                 f"optim.merge_identical_samples={merge}"])
        a = Sample([3, 4, 5, 6], 2, 1.0, [-1.0, -2.0])
        b = Sample([3, 4, 5, 6], 2, -1.0, [-1.5, -2.5])
        got[merge] = recompute_old_logprobs(model, [a, b], cfg, 0)
        assert a.old_logprobs == b.old_logprobs
    assert got[True] == pytest.approx(got[False], rel=1e-5)  # batch of 1 vs 2: rounding
    old = torch.tensor(a.old_logprobs)
    want = ((old - torch.tensor([-1.0, -2.0])).abs().sum()
            + (old - torch.tensor([-1.5, -2.5])).abs().sum()) / 4
    assert got[True]["mismatch/logprob_abs_mean"] == pytest.approx(float(want), rel=1e-6)


def test_micro_batches_hold_sequences_of_similar_length_and_train_the_same(tmp_path,
                                                                          monkeypatch):
    """Responses of 1 to 40 tokens: micro-batches of the longest first pad far less than
    micro-batches in rollout order, for the same step (to float rounding)."""
    import brorl.trainer.update as upd
    from brorl.trainer.policy import load_policy, pad_batch
    from tests.helpers import make_checkpoint

    g = torch.Generator().manual_seed(3)
    groups = []
    for gi in range(2):
        lengths = [1 + int(x) for x in torch.randint(0, 40, (8,), generator=g)]
        responses = [torch.randint(3, 100, (n,), generator=g).tolist() for n in lengths]
        groups.append(Group(Problem(f"p{gi}", "1", "math"), [5, 6, 7 + gi], responses,
                            [(-3.0 + 0.1 * torch.randn(n, generator=g)).tolist()
                             for n in lengths], ["stop"] * 8,
                            torch.tensor([float(n % 2) for n in lengths])))
    path = str(tmp_path / "policy")
    make_checkpoint(path, "qwen2", seed=2)
    cfg = load_config(None, ["algorithm.num_mini_batches=1", "optim.micro_batch_size=4",
                             "algorithm.old_logprobs=recompute"])
    padded = []

    def recording_pad_batch(seqs, starts, pad_id, device=None):
        padded.append(sum(max(map(len, seqs)) - len(s) for s in seqs))
        return pad_batch(seqs, starts, pad_id, device)

    monkeypatch.setattr(upd, "pad_batch", recording_pad_batch)
    results = {}
    for order in ("longest first", "as drawn"):
        if order == "as drawn":
            monkeypatch.setattr(upd, "longest_first", lambda items, ids=None: list(items))
        padded.clear()
        model = load_policy(path)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        metrics = upd.policy_update(model, opt, sched, [copy.deepcopy(x) for x in groups],
                                    cfg, 0, None, torch.Generator().manual_seed(5))
        results[order] = sum(padded), metrics, [p.detach().clone() for p in model.parameters()]
    (pad_sorted, m_sorted, p_sorted), (pad_drawn, m_drawn, p_drawn) = results.values()
    assert pad_sorted < pad_drawn / 2
    for a, b in zip(p_sorted, p_drawn):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for k, v in m_drawn.items():
        assert m_sorted[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
