"""What a group's samples leave untried: the probability mass no sample drew at the prefixes
they visit. A first-order proxy for BroRL's argument for large N: the update's only term
that can shrink the correct tokens' mass comes from tokens no sample drew (Theorem 1 sums
their squared probabilities, which the behaviour logprobs of sampled tokens cannot give),
and it falls as N grows. The cost grows with the tokens, and with the samples times the
longest prefix two of them share: `rollout.coverage_groups` bounds the groups per step.

The N samples of a prompt form a tree over their tokens: a node is a prefix that at least
one sample drew a token after, its children are the distinct tokens drawn there, and each
child's behaviour logprob is log p(token | prefix) under the temperature-scaled policy over
the full vocabulary (the same for every sample through that node). The node's unsampled
mass is u = 1 - sum of p over its children: the share of the policy's next-token
distribution at that prefix that none of the N samples tried. Reported per step:

- `first_token`: u at the root (the prompt), where all N samples draw, averaged over
  groups;
- `mean`: u averaged over draws (each sample's each token: the u of the node it drew at),
  over all groups.

Beside them, what ProRL's N=16 would leave untried on the same policy: the same figures
for a tree of the group's first 16 samples alone (`unsampled_mass` of the cut groups),
and the draw mean over those 16 samples' draws with every sample's children counted
(`states=16`): at the same states, a tree of N samples leaves at most what 16 leave.

`unsampled_mass` sorts each group's samples lexicographically and finds every node's
children from the common prefixes of neighbours, in numpy; `unsampled_mass_reference`
walks a dict trie (the plain reference it is tested against)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def unsampled_mass(groups: Sequence[tuple[Sequence[Sequence[int]], Sequence[Sequence[float]]]],
                   states: int | None = None) -> dict[str, float]:
    """groups: (token ids per sample, behaviour logprobs per sample) per prompt. Returns
    {"first_token": mean root u over groups, "mean": draw-weighted mean u}, and with
    `states` also "states_mean": the mean over the draws of each group's first `states`
    samples only (same tree); NaN without draws. Samples with no tokens draw nothing."""
    roots, sums = [], np.zeros(4)  # weighted and counted draws: all, then the first states
    for tokens, logprobs in groups:
        root, group_sums = _group(tokens, logprobs, len(tokens) if states is None else states)
        if not math.isnan(root):
            roots.append(root)
        sums += group_sums
    out = {"first_token": float(np.mean(roots)) if roots else math.nan,
           "mean": sums[0] / sums[1] if sums[1] else math.nan}
    if states is not None:
        out["states_mean"] = sums[2] / sums[3] if sums[3] else math.nan
    return out


def _group(tokens: Sequence[Sequence[int]], logprobs: Sequence[Sequence[float]], states: int
           ) -> tuple[float, np.ndarray]:
    """(root u, [sum of u over all draws, their number, the same over the draws of
    samples[:states]]) of one group; NaN for the root when no sample drew."""
    for i, (t, lp) in enumerate(zip(tokens, logprobs, strict=True)):
        if len(lp) != len(t):
            raise ValueError(f"sample {i} has {len(t)} tokens but {len(lp)} logprobs")
    # lexicographic order (a prefix first); list comparison stops at the first difference
    order = sorted(range(len(tokens)), key=lambda i: list(tokens[i]))
    toks = [np.asarray(tokens[i], dtype=np.int64) for i in order]
    probs_of = [np.exp(np.asarray(logprobs[i], dtype=np.float64)) for i in order]
    lens = np.array([len(x) for x in toks], dtype=np.int64)
    n, longest = len(toks), int(lens.max(initial=0))
    if longest == 0:
        return math.nan, np.zeros(4)
    # lcp[i]: the common prefix length of sorted samples i - 1 and i (lcp[0] = -1), taking
    # a sample's end as a token of its own (identical samples: longest)
    lcp = np.full(n, -1, dtype=np.int64)
    for i in range(1, n):
        a, b = toks[i - 1], toks[i]
        k = min(len(a), len(b))
        d = np.flatnonzero(a[:k] != b[:k])
        lcp[i] = d[0] if d.size else (k if len(a) != len(b) else longest)
    # past depth `width` every node holds one sample: its u is 1 - p of its own token, so
    # only the shared part is laid out densely, depth-major (row t holds every sample's
    # token t, and a node at depth t is a contiguous run of its row)
    shared = np.maximum(lcp, np.append(lcp[1:], -1))  # with either neighbour
    width = max(1, int(np.minimum(lens, shared + 1).max()))
    ids = np.full((width, n), -1, dtype=np.int64)  # -1 pads: after a sample ends
    probs = np.zeros((width, n))
    tails = np.zeros(n)  # each sample's sum of u past the shared part
    for i, (x, p) in enumerate(zip(toks, probs_of)):
        m = min(len(x), width)
        ids[:m, i] = x[:m]
        probs[:m, i] = p[:m]
        tails[i] = np.clip(1.0 - p[m:], 0.0, 1.0).sum()
    t = np.arange(width)[:, None]
    drew = t < lens[None, :]  # sample i drew a token at depth t
    # at depth t, sample i opens a new node (prefix of length t) when it shares fewer than
    # t tokens with the sample before it, and a new child when it shares no more than t
    opens = lcp[None, :] < t
    opens[:, 0] = True
    mass = np.cumsum(np.where(drew & (lcp[None, :] <= t), probs, 0.0), axis=1)
    # each entry's node: the run from its row's last opening at or before it to the
    # entry before the next opening; the node's children mass is the run's sum
    index = np.broadcast_to(np.arange(n), (width, n))
    first = np.maximum.accumulate(np.where(opens, index, 0), axis=1)
    ends = np.where(np.concatenate([opens[:, 1:], np.ones((width, 1), bool)], axis=1),
                    index, n)
    last = np.minimum.accumulate(ends[:, ::-1], axis=1)[:, ::-1]
    before = np.take_along_axis(mass, first - 1, axis=1) * (first > 0)
    node_mass = np.take_along_axis(mass, last, axis=1) - before
    u = np.where(drew, np.clip(1.0 - node_mass, 0.0, 1.0), 0.0).sum(0) + tails
    sub = np.asarray(order) < states
    return float(np.clip(1.0 - mass[0, -1], 0.0, 1.0)), np.array(
        [u.sum(), lens.sum(), u[sub].sum(), lens[sub].sum()], dtype=np.float64)


def unsampled_mass_reference(groups, states: int | None = None) -> dict[str, float]:
    """The same from a dict trie: node -> {token: p}, visits counted per draw."""
    roots, sums = [], [0.0, 0, 0.0, 0]
    for tokens, logprobs in groups:
        children: dict[tuple[int, ...], dict[int, float]] = {}
        for t, lp in zip(tokens, logprobs, strict=True):
            for k, (tok, lp_k) in enumerate(zip(t, lp, strict=True)):
                children.setdefault(tuple(t[:k]), {}).setdefault(tok, math.exp(lp_k))
        u = {v: min(1.0, max(0.0, 1.0 - sum(c.values()))) for v, c in children.items()}
        if () in u:
            roots.append(u[()])
        for i, t in enumerate(tokens):
            for k in range(len(t)):
                for at in (0, 2) if states is None or i < states else (0,):
                    sums[at] += u[tuple(t[:k])]
                    sums[at + 1] += 1
    out = {"first_token": sum(roots) / len(roots) if roots else math.nan,
           "mean": sums[0] / sums[1] if sums[1] else math.nan}
    if states is not None:
        out["states_mean"] = sums[2] / sums[3] if sums[3] else math.nan
    return out
