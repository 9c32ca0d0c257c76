"""The GRPO-family math in trainer/algorithms.py against values computed by hand."""

import math

import pytest
import torch

from brorl.trainer.algorithms import (
    DEFAULT_ESTIMATOR,
    ESTIMATORS,
    aggregate_loss,
    compute_advantages,
    group_keep_mask,
    kl_penalty,
    lr_scale,
    max_variance_subset,
    ppo_clip_loss,
    predicted_keep_rate,
    predicted_keep_rate_of,
    register_estimator,
    tis_weights,
)

# Two groups of three: means 1/3 and 2/3.
REWARDS = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert torch.allclose(torch.as_tensor(actual).double(), expected, atol=atol, rtol=0), actual


# ---- advantage estimators ------------------------------------------------------------------


def test_dr_grpo_subtracts_group_mean():
    adv = compute_advantages("dr_grpo", REWARDS)
    close(adv, [[2 / 3, -1 / 3, -1 / 3], [1 / 3, 1 / 3, -2 / 3]])


def test_grpo_divides_by_unbiased_group_std():
    # both groups: squared deviations sum to 2/3, /(N-1) = 1/3, std = 1/sqrt(3) = 0.577350
    adv = compute_advantages("grpo", REWARDS)
    assert adv.dtype == torch.float32 and adv.shape == (2, 3)
    close(adv, [[1.154701, -0.577350, -0.577350], [0.577350, 0.577350, -1.154701]], atol=1e-5)


def test_rloo_is_reward_minus_mean_of_the_others():
    # row 0: 1 - mean(0, 0) = 1, 0 - mean(1, 0) = -0.5; row 1: 1 - mean(1, 0) = 0.5, 0 - 1 = -1
    adv = compute_advantages("rloo", REWARDS)
    close(adv, [[1.0, -0.5, -0.5], [0.5, 0.5, -1.0]])


def test_rloo_equals_n_over_n_minus_one_times_centered_reward():
    rewards = torch.tensor([[0.2, 0.9, 0.4, 0.7]])  # mean 0.55
    close(compute_advantages("rloo", rewards), [[-0.46667, 0.46667, -0.2, 0.2]], atol=1e-5)


def test_reinforce_pp_baseline_hand_values():
    # centred: +-1/3, +-2/3; batch sum of squares 4/3, /5 = 4/15, std = 2/sqrt(15)
    # so 2/3 -> sqrt(15)/3 = 1.290994 and 1/3 -> sqrt(15)/6 = 0.645497
    adv = compute_advantages("reinforce_pp_baseline", REWARDS)
    close(adv, [[1.290994, -0.645497, -0.645497], [0.645497, 0.645497, -1.290994]], atol=1e-5)


def test_reinforce_pp_baseline_is_whitened_over_the_batch():
    rewards = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0], [0.3, 0.1, 0.9, 0.5]])
    adv = compute_advantages(DEFAULT_ESTIMATOR, rewards)
    close(adv.mean(), 0.0, atol=1e-6)
    close(adv.std(), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", ["grpo", "reinforce_pp_baseline", "dr_grpo", "rloo"])
def test_a_group_of_equal_rewards_gets_exactly_zero_advantage(name):
    """512 copies of 0.9 have a float32 mean an ulp off 0.9: GRPO divided that by the
    group's as tiny std and gave every sample +0.19. With dynamic sampling off such groups
    reach the update; they carry no signal, in a batch of their own or beside others."""
    flat = torch.tensor([[0.9] * 512, [0.7] * 512, [0.3] * 512])
    assert (compute_advantages(name, flat) == 0).all()
    mixed = torch.cat([flat[:, :8], torch.tensor([[0.0, 1.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.2]])])
    adv = compute_advantages(name, mixed)
    if name == "reinforce_pp_baseline":  # whitened over the batch: equal within a group
        assert (adv[:3] == adv[:3, :1]).all() and adv[:3].abs().max() < 1e-6
    else:
        assert (adv[:3] == 0).all()
    assert adv[3].abs().min() > 0.03  # the signal left as it was: 0.5 - mean 0.4625


def test_reinforce_pp_baseline_single_sample_is_zero_not_nan():
    close(compute_advantages("reinforce_pp_baseline", torch.tensor([[1.0]])), [[0.0]])
    close(compute_advantages("reinforce_pp_baseline", torch.ones(2, 2)), torch.zeros(2, 2))


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_all_equal_group_gets_zero_advantage(name):
    rewards = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = compute_advantages(name, rewards)
    close(adv[0], [0.0, 0.0, 0.0])
    assert torch.isfinite(adv).all() and adv[1].abs().sum() > 0


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_single_sample_groups_get_zero_advantage(name):
    close(compute_advantages(name, torch.tensor([[1.0], [0.0]])), [[0.0], [0.0]])


def test_unknown_estimator_lists_supported_names():
    with pytest.raises(ValueError, match="grpo.*reinforce_pp_baseline"):
        compute_advantages("ppo", REWARDS)


def test_register_estimator_adds_and_refuses_duplicates():
    @register_estimator("test_constant")
    def constant(rewards, eps):
        return torch.full_like(rewards, 7.0)

    try:
        close(compute_advantages("test_constant", REWARDS), torch.full((2, 3), 7.0))
        with pytest.raises(ValueError, match="already registered"):
            register_estimator("test_constant")(constant)
    finally:
        del ESTIMATORS["test_constant"]


# ---- loss aggregation ----------------------------------------------------------------------

NAN = float("nan")
# row 0: 4 tokens summing to 10; row 1: 2 tokens summing to 14; row 2: no valid token
LOSS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [6.0, 8.0, NAN, 99.0], [5.0, 5.0, 5.0, 5.0]])
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)


def test_token_mean_divides_by_valid_tokens():
    close(aggregate_loss(LOSS, MASK, "token-mean"), 24 / 6)


def test_seq_mean_token_mean_averages_row_means_and_differs_on_ragged_rows():
    # (10/4 + 14/2 + 0) / 3 rows: the empty row contributes 0 and no NaN
    close(aggregate_loss(LOSS, MASK, "seq-mean-token-mean"), (2.5 + 7.0 + 0.0) / 3)
    close(aggregate_loss(LOSS[:2], MASK[:2], "seq-mean-token-mean"), 4.75)


def test_overrides_replace_the_denominators():
    close(aggregate_loss(LOSS, MASK, "token-mean", num_tokens=12), 2.0)
    close(aggregate_loss(LOSS, MASK, "seq-mean-token-mean", num_seqs=5), 9.5 / 5)
    with pytest.raises(ValueError, match="num_tokens"):
        aggregate_loss(LOSS, MASK, "token-mean", num_tokens=0)


def test_all_masked_batch_gives_zero():
    empty = torch.zeros_like(MASK)
    close(aggregate_loss(LOSS, empty, "token-mean"), 0.0)
    close(aggregate_loss(LOSS, empty, "seq-mean-token-mean"), 0.0)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_micro_batches_with_overrides_sum_to_the_full_batch_loss(mode):
    gen = torch.Generator().manual_seed(0)
    per_token = torch.randn(6, 7, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([7, 1, 4, 0, 3, 6])
    mask = torch.arange(7)[None, :] < lengths[:, None]
    full = aggregate_loss(per_token, mask, mode)
    kw = dict(num_tokens=int(mask.sum()), num_seqs=6)
    parts = [aggregate_loss(per_token[s], mask[s], mode, **kw) for s in (slice(0, 2), slice(2, 6))]
    close(sum(parts), full.item(), atol=1e-12)
    # without the override the micro-batch means do not add up
    naive = sum(aggregate_loss(per_token[s], mask[s], mode) for s in (slice(0, 2), slice(2, 6)))
    assert abs(naive - full) > 1e-3


def test_unknown_aggregation_mode_lists_supported():
    with pytest.raises(ValueError, match="token-mean.*seq-mean-token-mean"):
        aggregate_loss(LOSS, MASK, "sum")


# ---- PPO clip loss -------------------------------------------------------------------------


def clip_loss(ratios, advantages, mask=None, **kw):
    """ppo_clip_loss on one row whose token ratios and advantages are given."""
    logprobs = torch.log(torch.tensor([ratios], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([advantages], dtype=torch.float64)
    mask = torch.ones_like(adv, dtype=torch.bool) if mask is None else torch.tensor([mask])
    loss, stats = ppo_clip_loss(logprobs, torch.zeros_like(logprobs), adv, mask, **kw)
    return loss, stats, logprobs


@pytest.mark.parametrize(
    "ratio, adv, expected",
    [
        (1.1, 2.0, -2.2),  # inside [0.8, 1.28]: -ratio * A
        (0.9, -1.0, 0.9),
        (1.5, 1.0, -1.28),  # A > 0 clipped at 1 + eps_high
        (0.5, -1.0, 0.8),  # A < 0 clipped at 1 - eps_low
        (0.5, 1.0, -0.5),  # pessimistic min keeps the unclipped term
        (5.0, -1.0, 5.0),  # no dual clip: unbounded for A < 0
    ],
)
def test_clip_loss_single_token(ratio, adv, expected):
    loss, _, _ = clip_loss([ratio], [adv])
    close(loss, expected, atol=1e-9)


def test_dual_clip_caps_loss_at_c_times_negative_advantage():
    loss, stats, _ = clip_loss([5.0], [-1.0], dual_clip=3.0)
    close(loss, 3.0, atol=1e-9)
    close(stats["dual_clip_fraction"], 1.0)
    loss, stats, _ = clip_loss([2.0], [-1.0], dual_clip=3.0)  # 2 < 3: not capped
    close(loss, 2.0, atol=1e-9)
    close(stats["dual_clip_fraction"], 0.0)


def test_gradient_is_zero_where_clipped():
    # tokens: clipped above (A>0), inside, clipped below (A<0), dual-clipped (A<0)
    loss, _, logprobs = clip_loss([1.5, 1.1, 0.5, 5.0], [1.0, 1.0, -1.0, -1.0], dual_clip=3.0)
    loss.backward()
    # d/dlogp of -A * exp(logp) / 4 tokens at the inside token: -1.1 / 4
    close(logprobs.grad, [[0.0, -0.275, 0.0, 0.0]], atol=1e-9)


def test_clip_stats_on_hand_example():
    # last token is padding; of the 4 valid, tokens 0 and 2 are clipped
    loss, stats, _ = clip_loss(
        [1.5, 1.1, 0.5, 0.5, 1.5], [1.0, 1.0, -1.0, 1.0, 1.0], mask=[1, 1, 1, 1, 0]
    )
    close(loss, (-1.28 - 1.1 + 0.8 - 0.5) / 4, atol=1e-9)
    close(stats["clip_fraction"], 0.5)
    close(stats["dual_clip_fraction"], 0.0)
    close(stats["ratio_mean"], 0.9, atol=1e-9)
    # 0.5 * mean(log^2): log 1.5 = 0.405465, log 1.1 = 0.095310, log 0.5 = -0.693147
    close(stats["approx_kl"], 0.5 * (0.164402 + 0.009084 + 2 * 0.480453) / 4, atol=1e-6)
    assert not any(v.requires_grad for v in stats.values())


def test_per_sequence_advantages_broadcast_over_tokens():
    logprobs = torch.log(torch.tensor([[1.1, 1.5], [0.9, 0.5]]))
    mask = torch.ones(2, 2, dtype=torch.bool)
    seq_adv, _ = ppo_clip_loss(logprobs, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), mask)
    # (-1.1 - 1.28 + 0.9 + 0.8) / 4
    close(seq_adv, -0.17, atol=1e-6)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(eps_low=1.0), "eps_low"),
        (dict(eps_low=-0.1), "eps_low"),
        (dict(eps_high=-0.1), "eps_high"),
        (dict(dual_clip=1.0), "dual_clip"),
        (dict(advantages=torch.zeros(3)), "advantages"),
        (dict(old_logprobs=torch.zeros(2, 3)), "old_logprobs"),
        (dict(agg="mean"), "token-mean"),
    ],
)
def test_clip_loss_rejects_bad_arguments(kw, match):
    args = dict(
        logprobs=torch.zeros(2, 4),
        old_logprobs=torch.zeros(2, 4),
        advantages=torch.zeros(2),
        mask=torch.ones(2, 4),
    )
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        ppo_clip_loss(**args)


# ---- KL estimators -------------------------------------------------------------------------

KL_LOGPROBS = torch.tensor([[0.0, 1.0, -1.0, 20.0]], dtype=torch.float64)


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("k1", [[0.0, 1.0, -1.0, 10.0]]),  # last log-ratio 20 clamped to 10
        ("k2", [[0.0, 0.5, 0.5, 50.0]]),
        # e^-1 - 1 + 1 = 0.367879, e^1 - 1 - 1 = 0.718282, e^-10 - 1 + 10 = 9.0000454
        ("k3", [[0.0, 0.367879, 0.718282, 9.0000454]]),
    ],
)
def test_kl_estimators_hand_values(kind, expected):
    close(kl_penalty(KL_LOGPROBS, torch.zeros_like(KL_LOGPROBS), kind), expected, atol=1e-6)


def test_k3_is_non_negative():
    gen = torch.Generator().manual_seed(1)
    logprobs, ref = torch.randn(2, 8, 32, generator=gen) * 3
    assert (kl_penalty(logprobs, ref, "k3") >= 0).all()


def test_unknown_kl_kind_lists_supported():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(KL_LOGPROBS, KL_LOGPROBS, "k4")


# ---- truncated importance sampling ---------------------------------------------------------

# raw weights 0.25, 1, 2, 8 and a padding token
TIS_LOG_W = torch.log(torch.tensor([[0.25, 1.0, 2.0, 8.0, 100.0]], dtype=torch.float64))
TIS_MASK = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)


def test_tis_truncate_clamps_both_ends():
    trainer = TIS_LOG_W.clone().requires_grad_()
    weights, stats = tis_weights(trainer, torch.zeros_like(TIS_LOG_W), TIS_MASK)
    close(weights, [[0.5, 1.0, 2.0, 5.0, 0.0]], atol=1e-9)
    assert not weights.requires_grad
    close(stats["out_of_range_fraction"], 0.5)
    close(stats["weight_mean"], 8.5 / 4, atol=1e-9)


def test_tis_mask_zeroes_out_of_range_weights():
    weights, stats = tis_weights(TIS_LOG_W, torch.zeros_like(TIS_LOG_W), TIS_MASK, mode="mask")
    close(weights, [[0.0, 1.0, 2.0, 0.0, 0.0]], atol=1e-9)
    close(stats["out_of_range_fraction"], 0.5)
    close(stats["weight_mean"], 3.0 / 4, atol=1e-9)


def test_tis_rejects_bad_arguments():
    zeros = torch.zeros_like(TIS_LOG_W)
    with pytest.raises(ValueError, match="low < high"):
        tis_weights(zeros, zeros, TIS_MASK, low=5.0, high=5.0)
    with pytest.raises(ValueError, match="truncate, mask"):
        tis_weights(zeros, zeros, TIS_MASK, mode="clip")


# ---- dynamic sampling and learning-rate scaling --------------------------------------------


def test_group_keep_mask_drops_constant_groups():
    rewards = torch.tensor(
        [[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.5 + 1e-12]],
        dtype=torch.float64,
    )
    assert group_keep_mask(rewards).tolist() == [False, True, False, False]


def test_predicted_keep_rate_hand_values():
    # 0.99^16 = exp(16 ln 0.99) = 0.851458; 0.99^512 = 0.005824; 0.01^N is negligible
    assert predicted_keep_rate(0.01, 16) == pytest.approx(0.148542, abs=1e-6)
    assert predicted_keep_rate(0.01, 512) == pytest.approx(0.994176, abs=1e-6)
    assert predicted_keep_rate(0.5, 2) == pytest.approx(0.5)
    close(predicted_keep_rate(torch.tensor([0.0, 1.0, 0.5]), 4), [0.0, 0.0, 0.875])
    with pytest.raises(ValueError, match="q"):
        predicted_keep_rate(1.5, 4)


def test_predicted_keep_rate_of_rewards_generalises_the_binary_formula():
    gen = torch.Generator().manual_seed(0)
    binary = (torch.rand(32, 16, generator=gen) < torch.rand(32, 1, generator=gen)).double()
    for n in (1, 2, 16, 512):
        close(predicted_keep_rate_of(binary, n), predicted_keep_rate(binary.mean(1), n),
              atol=1e-12)
    graded = torch.tensor([[0.0, 0.5, 1.0, 1.0],     # 1 - (1/4^2 + 1/4^2 + 1/2^2)
                           [0.2, 0.3, 0.2, 0.3],     # all below 0.5, yet kept half the time
                           [0.4, 0.4, 0.4, 0.4 + 1e-12]])  # equal within atol: never kept
    close(predicted_keep_rate_of(graded, 2), [0.625, 0.5, 0.0])
    # a prediction of the keep rate: its mean over many draws of n matches group_keep_mask
    rows = graded[torch.zeros(20000, dtype=torch.long) + 1]
    picks = rows.gather(1, torch.randint(0, 4, (20000, 3), generator=gen))
    assert abs(float(group_keep_mask(picks).double().mean()) - 0.75) < 0.02
    close(predicted_keep_rate_of(graded[1:2], 3), [0.75])
    with pytest.raises(ValueError, match="shape"):
        predicted_keep_rate_of(torch.zeros(4), 2)


def test_lr_scale_is_square_root_of_sample_ratio():
    # 512 * 128 / (16 * 512) = 8
    assert lr_scale(512 * 128, 16 * 512) == pytest.approx(math.sqrt(8.0))
    assert lr_scale(4, 4) == 1.0
    with pytest.raises(ValueError):
        lr_scale(0, 16)


# ---- max-variance down-sampling ------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_max_variance_subset_matches_brute_force(seed):
    import itertools

    g = torch.Generator().manual_seed(seed)
    n = 7
    rewards = torch.randint(0, 4, (n,), generator=g).double() / 3  # ties and several levels
    for k in range(1, n):
        got = max_variance_subset(rewards, k, g)
        assert len(set(got.tolist())) == k
        best = max(rewards[list(c)].var(unbiased=False).item()
                   for c in itertools.combinations(range(n), k))
        assert rewards[got].var(unbiased=False).item() == pytest.approx(best, abs=1e-12)


def test_max_variance_subset_balances_binary_rewards_and_draws_ties_at_random():
    rewards = torch.tensor([0.0] * 90 + [1.0] * 10)
    picks = [max_variance_subset(rewards, 8, torch.Generator().manual_seed(s)) for s in range(50)]
    assert all(int(rewards[p].sum()) == 4 for p in picks)  # 4 correct, 4 wrong
    wrong_seen = {i for p in picks for i in p.tolist() if i < 90}
    assert len(wrong_seen) > 40  # not always the same wrong samples
    only_two = torch.tensor([0.0] * 20 + [1.0] * 2)
    assert int(only_two[max_variance_subset(only_two, 8)].sum()) == 2  # every correct one
    assert max_variance_subset(rewards, 100).tolist() == list(range(100))
    with pytest.raises(ValueError, match="k must be"):
        max_variance_subset(rewards, 0)
    with pytest.raises(ValueError, match=r"\[N\]"):
        max_variance_subset(rewards[None], 2)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_a_weighted_mask_counts_a_row_as_often_as_its_weight(mode):
    """A row with weight k at its valid positions equals k copies of the row."""
    g = torch.Generator().manual_seed(0)
    per_token = torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    per_token[~mask] = float("nan")  # padding never leaks, weighted or not
    counts = torch.tensor([3.0, 2.0, 1.0])  # a row with no valid position counts once
    repeated = torch.repeat_interleave(torch.arange(3), counts.long())
    expect = aggregate_loss(per_token[repeated], mask[repeated], mode)
    got = aggregate_loss(per_token, mask * counts[:, None], mode)
    torch.testing.assert_close(got, expect)
    n_tok, n_seq = 17, 9  # given denominators are used as they are
    torch.testing.assert_close(
        aggregate_loss(per_token, mask * counts[:, None], mode, n_tok, n_seq),
        aggregate_loss(per_token[repeated], mask[repeated], mode, n_tok, n_seq))
