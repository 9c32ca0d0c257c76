"""What a group's samples leave untried: the probability mass no sample drew at the prefixes
they visit. A first-order proxy for BroRL's argument for large N: the update's only term
that can shrink the correct tokens' mass comes from tokens no sample drew (Theorem 1 sums
their squared probabilities, which the behaviour logprobs of sampled tokens cannot give),
and it falls as N grows. The cost grows with the tokens, and with the distinct samples
times the longest prefix two distinct ones share (copies of a sample cost only their
tokens' conversion): `rollout.coverage_groups` bounds the groups per step.

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

`unsampled_mass` collapses each group's identical samples into one with a count, sorts
them lexicographically and finds every node's children from the common prefixes of
neighbours, in numpy; `unsampled_mass_reference`
walks a dict trie (the plain reference it is tested against)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

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


class _Tree(NamedTuple):
    """A group's distinct samples in lexicographic order, n of them (see `_tree`)."""
    ids: list[np.ndarray]  # token ids per distinct sample
    probs: list[np.ndarray]  # p of each of its tokens, from its first copy's logprobs
    copies: np.ndarray  # [2, n]: its copies among all samples, among samples[:states]
    lcp: np.ndarray  # [n]: common prefix length with the sample before (-1 for the first)
    width: int  # depth of the dense layout: past it every node holds one sample


def _tree(tokens: Sequence[Sequence[int]], logprobs: Sequence[Sequence[float]], states: int
          ) -> _Tree:
    """The group's samples with identical ones collapsed into one with a count, sorted.
    Copies visit the same nodes and add no child, so they only weight its draws; their
    logprobs are the policy's at the same prefixes, so the first copy's stand for all.
    Collapsing them keeps a peaked policy's repeats of a long response from making the
    shared part (and the dense layout) as deep as the response."""
    for i, (t, lp) in enumerate(zip(tokens, logprobs, strict=True)):
        if len(lp) != len(t):
            raise ValueError(f"sample {i} has {len(t)} tokens but {len(lp)} logprobs")
    # big-endian bytes compare (memcmp, a prefix first) as the ids do lexicographically,
    # read unsigned: an order in which the samples through a node are contiguous, which is
    # all the walk needs, and far cheaper to sort and hash than lists
    index: dict[bytes, int] = {}  # key -> distinct sample, in order of first appearance
    keys, first, copies = [], [], []
    for i, t in enumerate(tokens):
        key = np.asarray(t, dtype=">i8").tobytes()
        j = index.setdefault(key, len(keys))
        if j == len(keys):
            keys.append(key)
            first.append(i)
            copies.append([0, 0])
        copies[j][0] += 1
        copies[j][1] += i < states  # counted in the original order
    order = sorted(range(len(keys)), key=keys.__getitem__)
    ids = [np.frombuffer(keys[j], dtype=">i8").astype(np.int64) for j in order]
    probs = [np.exp(np.asarray(logprobs[first[j]], dtype=np.float64)) for j in order]
    lens = np.array([len(x) for x in ids], dtype=np.int64)
    # lcp[i]: the common prefix length of sorted samples i - 1 and i; no two are equal, so
    # when no token differs the shorter is a prefix of the other (its end differs)
    lcp = np.full(len(ids), -1, dtype=np.int64)
    for i in range(1, len(ids)):
        a, b = ids[i - 1], ids[i]
        k = min(len(a), len(b))
        d = np.flatnonzero(a[:k] != b[:k])
        lcp[i] = d[0] if d.size else k
    # past the longest prefix a sample shares with either neighbour, its nodes are its own
    shared = np.maximum(lcp, np.append(lcp[1:], -1))
    width = max(1, int(np.minimum(lens, shared + 1).max(initial=0)))
    copies = np.array(copies, dtype=np.float64).reshape(-1, 2)[order].T
    return _Tree(ids, probs, copies, lcp, width)


def _group(tokens: Sequence[Sequence[int]], logprobs: Sequence[Sequence[float]], states: int
           ) -> tuple[float, np.ndarray]:
    """(root u, [sum of u over all draws, their number, the same over the draws of
    samples[:states]]) of one group; NaN for the root when no sample drew."""
    tree = _tree(tokens, logprobs, states)
    lcp, width, n = tree.lcp, tree.width, len(tree.ids)
    lens = np.array([len(x) for x in tree.ids], dtype=np.int64)
    if lens.max(initial=0) == 0:
        return math.nan, np.zeros(4)
    # only the shared part is laid out densely, depth-major (row t holds every sample's
    # token t, and a node at depth t is a contiguous run of its row); past it a node's u
    # is 1 - p of its one sample's token
    probs = np.zeros((width, n))
    tails = np.zeros(n)  # each sample's sum of u past the shared part
    for i, p in enumerate(tree.probs):
        m = min(len(p), width)
        probs[:m, i] = p[:m]
        tails[i] = np.clip(1.0 - p[width:], 0.0, 1.0).sum()
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
    # a sample's copies draw what it draws: weight its draws by them
    sums = np.stack([tree.copies @ u, tree.copies @ lens], axis=1).ravel()
    return float(np.clip(1.0 - mass[0, -1], 0.0, 1.0)), sums


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
