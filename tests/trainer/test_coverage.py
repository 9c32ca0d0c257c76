"""The unsampled mass at the branch points of a group's samples: the numpy version against
the dict-trie reference on random sample trees, and hand-worked cases."""

import math
import random

import pytest
import torch

from brorl.trainer.coverage import unsampled_mass, unsampled_mass_reference
from brorl.trainer.data import Problem
from brorl.trainer.rollout import Group, coverage_metrics


def _policy(seed: int, vocab: int):
    """A fixed next-token distribution per prefix (as the engine's behaviour logprobs are:
    the same for every sample through a prefix)."""
    cache: dict[tuple[int, ...], list[float]] = {}

    def probs(prefix: tuple[int, ...]) -> list[float]:
        if prefix not in cache:
            rng = random.Random(hash((seed, prefix)))
            w = [rng.random() ** 4 for _ in range(vocab)]
            cache[prefix] = [x / sum(w) for x in w]
        return cache[prefix]

    return probs


def random_group(rng: random.Random, n: int, vocab: int, max_len: int):
    probs = _policy(rng.randrange(10**9), vocab)
    tokens, logprobs = [], []
    for _ in range(n):
        length = rng.choice([0, 1, max_len // 2, max_len, rng.randrange(max_len + 1)])
        t, lp = [], []
        while len(t) < length:
            p = probs(tuple(t))
            tok = rng.choices(range(vocab), weights=p)[0]
            t.append(tok)
            lp.append(math.log(p[tok]))
        tokens.append(t)
        logprobs.append(lp)
    return tokens, logprobs


@pytest.mark.parametrize("seed", range(6))
def test_matches_the_trie_reference_on_random_sample_trees(seed):
    rng = random.Random(seed)
    groups = [random_group(rng, rng.choice([1, 2, 7, 40]), rng.choice([2, 3, 9]),
                           rng.choice([1, 4, 12])) for _ in range(5)]
    for states in (None, 1, 3):
        got, want = unsampled_mass(groups, states), unsampled_mass_reference(groups, states)
        assert got.keys() == want.keys()
        for k in got:
            assert got[k] == pytest.approx(want[k], abs=1e-12, nan_ok=True), (k, states)
    assert 0.0 < unsampled_mass(groups)["mean"] < 1.0


def test_hand_worked_tree():
    """Root: children a (p=.5) and b (.25): u = .25, drawn 3 times. After a: children c
    (.6) drawn by two samples: u = .4, 2 draws. After b: nothing drawn (b ended). After
    a c: one sample draws d (.9): u = .1. Mean over the 6 draws: (3*.25 + 2*.4 + .1) / 6."""
    a, b, c, d = 0, 1, 2, 3
    tokens = [[a, c], [b], [a, c, d]]
    logprobs = [[math.log(.5), math.log(.6)], [math.log(.25)],
                [math.log(.5), math.log(.6), math.log(.9)]]
    for fn in (unsampled_mass, unsampled_mass_reference):
        got = fn([(tokens, logprobs)])
        assert got["first_token"] == pytest.approx(.25)
        assert got["mean"] == pytest.approx((3 * .25 + 2 * .4 + .1) / 6)


def test_more_samples_leave_less_untried():
    """The first 16 of 512 samples of the same policy leave more mass untried than all."""
    rng = random.Random(3)
    groups = [random_group(rng, 512, 30, 6) for _ in range(3)]
    wide = unsampled_mass(groups)
    narrow = unsampled_mass([(t[:16], lp[:16]) for t, lp in groups])
    assert wide["first_token"] < 0.5 * narrow["first_token"]
    assert wide["mean"] < narrow["mean"]


def test_empty_and_mismatched_inputs():
    assert math.isnan(unsampled_mass([([[], []], [[], []])])["mean"])
    with pytest.raises(ValueError, match="sample 0 has 2 tokens but 1 logprobs"):
        unsampled_mass([([[1, 2]], [[-0.1]])])


def test_rollout_metrics_compare_all_samples_with_the_first_16():
    rng = random.Random(5)
    groups = [Group(Problem("p", "1", "math"), [1], t, lp, ["stop"] * len(t), torch.zeros(len(t)))
              for t, lp in (random_group(rng, 64, 30, 5) for _ in range(2))]
    m = coverage_metrics(groups)
    pairs = [(g.response_ids, g.behaviour_logprobs) for g in groups]
    want = unsampled_mass_reference([(t[:16], lp[:16]) for t, lp in pairs])
    assert m["rollout/unsampled_mass_n16"] == pytest.approx(want["mean"])
    assert m["rollout/unsampled_mass_first_token_n16"] == pytest.approx(want["first_token"])
    same = unsampled_mass_reference(pairs, states=16)["states_mean"]
    assert m["rollout/unsampled_mass_n16_states"] == pytest.approx(same)
    # the same states with 64 samples' children: strictly less untried here
    assert m["rollout/unsampled_mass_n16_states"] < m["rollout/unsampled_mass_n16"]
    assert m["rollout/unsampled_mass"] < m["rollout/unsampled_mass_n16"]
    assert coverage_metrics([]) == {}  # rollout.coverage_groups=0
    groups[0].behaviour_logprobs[3] = None  # an engine that returned no logprobs
    assert coverage_metrics(groups) == {}


def test_copies_of_a_long_sample_weight_its_draws_without_deepening_the_tree():
    """A peaked policy repeats its response: 40 copies of one 300-token sample and a few
    others branching from its first 10 tokens. The result equals the trie's, for states
    that cut through the copies, and the dense part stays as deep as what distinct
    samples share, not as the copies."""
    from brorl.trainer.coverage import _tree

    rng = random.Random(11)
    probs = _policy(7, 5)

    def draw(prefix: list[int], length: int) -> tuple[list[int], list[float]]:
        t, lp = list(prefix), [math.log(probs(tuple(prefix[:k]))[x]) for k, x in enumerate(prefix)]
        while len(t) < length:
            p = probs(tuple(t)) if len(t) < 40 else [0.9, 0.025, 0.025, 0.025, 0.025]
            tok = rng.choices(range(5), weights=p)[0]
            t.append(tok)
            lp.append(math.log(p[tok]))
        return t, lp

    long, long_lp = draw([], 300)
    others = [draw(long[:10] + [(long[10] + 1) % 5], rng.randrange(11, 60)) for _ in range(4)]
    tokens = [long] * 20 + [t for t, _ in others] + [long] * 20 + [[]]
    logprobs = [long_lp] * 20 + [lp for _, lp in others] + [long_lp] * 20 + [[]]
    for states in (None, 1, 10, 22, 30):
        got = unsampled_mass([(tokens, logprobs)], states)
        want = unsampled_mass_reference([(tokens, logprobs)], states)
        for k in want:
            assert got[k] == pytest.approx(want[k], abs=1e-12), (k, states)
    tree = _tree(tokens, logprobs, 22)
    assert len(tree.ids) == 6  # the long one, 4 others, the empty one
    assert tree.copies[:, [len(t) for t in tree.ids].index(300)].tolist() == [40, 20]
    assert tree.width <= 60  # the others' lengths bound what is shared, not 300
