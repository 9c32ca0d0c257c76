"""Pure tensor functions of the BroRL / ProRL GRPO-family objective.

Shapes: G prompt groups of N samples each; B sequences (rows) of T response tokens. Masks are
bool or 0/1 tensors of shape [B, T] marking valid response tokens. Nothing here holds state:
the trainer loop calls these functions and owns the optimiser.

Contents: advantage estimators (a registry), the one loss-aggregation function, the clipped
PPO surrogate (asymmetric "clip-higher" range, optional dual clip), per-token KL estimators,
truncated importance-sampling weights for trainer/rollout-engine mismatch, and the arithmetic
of dynamic sampling and of the batch-size learning-rate rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Estimator = Callable[[Tensor, float], Tensor]

ESTIMATORS: dict[str, Estimator] = {}
DEFAULT_ESTIMATOR = "reinforce_pp_baseline"
AGG_MODES = ("token-mean", "seq-mean-token-mean")
TIS_MODES = ("truncate", "mask")
# exp() of a log-ratio beyond this overflows float32 long before it means anything.
_MAX_LOG_RATIO = 20.0


def register_estimator(name: str) -> Callable[[Estimator], Estimator]:
    """Decorator: add `fn(rewards [G, N] float32, eps) -> advantages [G, N]` under `name`."""

    def decorate(fn: Estimator) -> Estimator:
        if name in ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ESTIMATORS[name] = fn
        return fn

    return decorate


def compute_advantages(name: str, rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-sample advantages [G, N] float32 from rewards [G, N] (row = one prompt's group).

    The trainer broadcasts each sample's advantage over its response tokens.
    """
    if name not in ESTIMATORS:
        raise ValueError(
            f"unknown advantage estimator {name!r}; supported: {', '.join(sorted(ESTIMATORS))}"
        )
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [G, N], got shape {tuple(rewards.shape)}")
    return ESTIMATORS[name](rewards.to(torch.float32), eps)


def _group_centered(rewards: Tensor) -> Tensor:
    """[G, N] -> [G, N]: each reward minus its group's mean; exactly 0 in a group whose
    rewards are all equal (a float mean of N copies of 0.9 is off by an ulp, which GRPO's
    division by the group's as tiny std would blow up to an advantage of ~0.2)."""
    same = rewards.amax(dim=1, keepdim=True) == rewards.amin(dim=1, keepdim=True)
    return torch.where(same, 0.0, rewards - rewards.mean(dim=1, keepdim=True))


@register_estimator("reinforce_pp_baseline")
def _reinforce_pp_baseline(rewards: Tensor, eps: float) -> Tensor:
    """REINFORCE++ with a group baseline (ProRL v2 / BroRL): subtract the group mean, then
    whiten over all G*N samples with the unbiased batch std. Per-sample whitening (verl whitens
    token-weighted). A batch of one sample has no spread and gets advantage 0."""
    centered = _group_centered(rewards)
    if centered.numel() <= 1:
        return torch.zeros_like(centered)
    return (centered - centered.mean()) / (centered.std(unbiased=True) + eps)


@register_estimator("grpo")
def _grpo(rewards: Tensor, eps: float) -> Tensor:
    """GRPO: (r - group mean) / (group std + eps), unbiased std as in verl; N=1 gives 0."""
    if rewards.shape[1] <= 1:
        return torch.zeros_like(rewards)
    return _group_centered(rewards) / (rewards.std(dim=1, unbiased=True, keepdim=True) + eps)


@register_estimator("dr_grpo")
def _dr_grpo(rewards: Tensor, eps: float) -> Tensor:
    """Dr. GRPO: r - group mean, no std normalisation (eps unused)."""
    return _group_centered(rewards)


@register_estimator("rloo")
def _rloo(rewards: Tensor, eps: float) -> Tensor:
    """RLOO: r_i minus the mean of the other N-1 samples = N/(N-1) * (r_i - mean); N=1 gives 0."""
    n = rewards.shape[1]
    if n <= 1:
        return torch.zeros_like(rewards)
    return _group_centered(rewards) * (n / (n - 1))


def aggregate_loss(
    per_token: Tensor,
    mask: Tensor,
    mode: str,
    num_tokens: int | Tensor | None = None,
    num_seqs: int | None = None,
) -> Tensor:
    """The one owner of loss aggregation: per_token [B, T], mask [B, T] -> scalar.

    token-mean: sum of valid token losses / num_tokens (default: valid tokens here).
    seq-mean-token-mean: sum over rows of each row's token-mean / num_seqs (default: B).
    Pass the whole mini-batch's num_tokens / num_seqs when this is a micro-batch, so that the
    sum of micro-batch losses equals the loss of the mini-batch in one piece. Rows without
    valid tokens contribute 0 (and still count in the default num_seqs). Masked positions
    never leak, even if they hold inf or NaN.

    mask is bool, or a float weight per position: a row that stands for k identical
    sequences carries k at each of its valid positions (0 elsewhere) and counts k times,
    in the sums and in the default num_tokens / num_seqs (a row without valid positions
    counts once).
    """
    if per_token.shape != mask.shape or per_token.dim() != 2:
        raise ValueError(
            f"per_token and mask must both be [B, T]; got {tuple(per_token.shape)} "
            f"and {tuple(mask.shape)}"
        )
    valid = mask.bool()
    masked = torch.where(valid, per_token, torch.zeros_like(per_token))
    weight = None if mask.dtype == torch.bool else mask.to(per_token.dtype)
    if mode == "token-mean":
        if weight is not None:
            masked = masked * weight
        if num_tokens is None:
            count = valid.sum() if weight is None else weight.sum()
            return masked.sum() / count.clamp(min=1)
        return masked.sum() / _checked_count(num_tokens, "num_tokens")
    if mode == "seq-mean-token-mean":
        seq_means = masked.sum(dim=1) / valid.sum(dim=1).clamp(min=1)
        rows = float(max(per_token.shape[0], 1))
        if weight is not None:
            row_weight = weight.amax(dim=1)
            seq_means = seq_means * row_weight
            rows = row_weight.clamp(min=1).sum()  # an empty row still counts once
        if num_seqs is None:
            return seq_means.sum() / rows
        return seq_means.sum() / _checked_count(num_seqs, "num_seqs")
    raise ValueError(f"unknown aggregation mode {mode!r}; supported: {', '.join(AGG_MODES)}")


def _checked_count(count: int | Tensor, what: str) -> int | Tensor:
    """A caller-given denominator; python numbers must be > 0 (tensors are not synced to check)."""
    if not isinstance(count, Tensor) and count <= 0:
        raise ValueError(f"{what} must be > 0, got {count}")
    return count


def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    num_tokens: int | Tensor | None = None,
    num_seqs: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped PPO surrogate with an asymmetric range (clip-higher) and optional dual clip.

    logprobs, old_logprobs, mask: [B, T]; advantages: [B] (one per sequence) or [B, T].
    Per token: ratio = exp(logprobs - old_logprobs) (log-ratio clamped to +-20 against
    overflow), loss = -min(ratio*A, clip(ratio, 1-eps_low, 1+eps_high)*A); with dual_clip c > 1,
    tokens with A < 0 have their loss capped at -c*A. Aggregated by `aggregate_loss`.

    Returns (loss scalar, stats); stats are detached 0-dim tensors (no host sync) over the
    valid tokens of this call: clip_fraction (the clipped term was chosen and differs),
    dual_clip_fraction, ratio_mean, approx_kl = mean of 0.5 * (log ratio)^2 (the k2
    estimator: non-negative, low variance).
    """
    _check_clip_args(logprobs, old_logprobs, advantages, mask, eps_low, eps_high, dual_clip)
    adv = advantages.unsqueeze(-1).expand_as(logprobs) if advantages.dim() == 1 else advantages
    log_ratio = (logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = torch.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    dual_active = torch.zeros_like(clip_active)
    if dual_clip is not None:
        cap = -adv * dual_clip
        dual_active = (adv < 0) & (per_token > cap)
        per_token = torch.where(dual_active, cap, per_token)
    loss = aggregate_loss(per_token, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs)

    def mean(x: Tensor) -> Tensor:
        return aggregate_loss(x.detach().to(logprobs.dtype), mask, "token-mean")

    stats = {
        "clip_fraction": mean(clip_active),
        "dual_clip_fraction": mean(dual_active),
        "ratio_mean": mean(ratio),
        "approx_kl": mean(0.5 * log_ratio.square()),
    }
    return loss, stats


def _check_clip_args(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
) -> None:
    """Raise ValueError naming the first bad argument of `ppo_clip_loss`."""
    if not 0.0 <= eps_low < 1.0:
        raise ValueError(f"eps_low must be in [0, 1), got {eps_low}")
    if eps_high < 0.0:
        raise ValueError(f"eps_high must be >= 0, got {eps_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    shape = logprobs.shape
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got {tuple(shape)}")
    for name, t in (("old_logprobs", old_logprobs), ("mask", mask)):
        if t.shape != shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != logprobs shape {tuple(shape)}")
    if advantages.shape not in (shape, shape[:1]):
        raise ValueError(
            f"advantages must be [B] or [B, T] = {tuple(shape)}, got {tuple(advantages.shape)}"
        )


def _kl_k1(log_ratio: Tensor) -> Tensor:
    return log_ratio


def _kl_k2(log_ratio: Tensor) -> Tensor:
    return 0.5 * log_ratio.square()


def _kl_k3(log_ratio: Tensor) -> Tensor:
    return torch.exp(-log_ratio) - 1.0 + log_ratio


_KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {"k1": _kl_k1, "k2": _kl_k2, "k3": _kl_k3}


def kl_penalty(
    logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k2", clamp: float = 10.0
) -> Tensor:
    """Per-token estimators [B, T] of KL(pi || ref) from tokens sampled from pi.

    With log_ratio = clamp(logprobs - ref_logprobs, -clamp, clamp): k1 = log_ratio (unbiased,
    can be negative), k2 = 0.5 * log_ratio^2, k3 = exp(-log_ratio) - 1 + log_ratio (unbiased,
    >= 0). Differentiable in both inputs; aggregate with `aggregate_loss`.
    """
    if kind not in _KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; supported: {', '.join(_KL_ESTIMATORS)}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"ref_logprobs shape {tuple(ref_logprobs.shape)} != logprobs {tuple(logprobs.shape)}"
        )
    if clamp <= 0:
        raise ValueError(f"clamp must be > 0, got {clamp}")
    return _KL_ESTIMATORS[kind]((logprobs - ref_logprobs).clamp(-clamp, clamp))


def tis_weights(
    trainer_logprobs: Tensor,
    behaviour_logprobs: Tensor,
    mask: Tensor,
    low: float = 0.5,
    high: float = 5.0,
    mode: str = "truncate",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Importance weights [B, T] (detached) correcting the rollout engine / trainer mismatch.

    w = exp(trainer_logprobs - behaviour_logprobs). `truncate`: clamp(w, low, high), with
    low=0 Yao et al.'s TIS min(w, high). `mask` (ProRL): w outside [low, high] set to 0, w
    inside kept. Padding positions get weight 0. Stats over valid tokens,
    detached 0-dim tensors: out_of_range_fraction (raw w outside [low, high]) and weight_mean
    (of the returned weights).
    """
    if mode not in TIS_MODES:
        raise ValueError(f"unknown TIS mode {mode!r}; supported: {', '.join(TIS_MODES)}")
    if not 0.0 <= low < high:
        raise ValueError(f"need 0 <= low < high, got low={low}, high={high}")
    if not trainer_logprobs.shape == behaviour_logprobs.shape == mask.shape:
        raise ValueError(
            f"shapes differ: trainer_logprobs {tuple(trainer_logprobs.shape)}, "
            f"behaviour_logprobs {tuple(behaviour_logprobs.shape)}, mask {tuple(mask.shape)}"
        )
    log_w = (trainer_logprobs - behaviour_logprobs).detach()
    w = torch.exp(log_w.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    out_of_range = (w < low) | (w > high)
    if mode == "truncate":
        weights = w.clamp(low, high)
    else:
        weights = torch.where(out_of_range, torch.zeros_like(w), w)
    weights = torch.where(mask.bool(), weights, torch.zeros_like(weights))
    stats = {
        "out_of_range_fraction": aggregate_loss(out_of_range.to(w.dtype), mask, "token-mean"),
        "weight_mean": aggregate_loss(weights, mask, "token-mean"),
    }
    return weights, stats


def group_keep_mask(rewards: Tensor, atol: float = 1e-9) -> Tensor:
    """bool [G] from rewards [G, N]: True where a group's rewards are not all equal (within
    atol), i.e. where it carries a learning signal; dynamic sampling drops the others."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [G, N], got shape {tuple(rewards.shape)}")
    return (rewards.amax(dim=1) - rewards.amin(dim=1)) > atol


def predicted_keep_rate(q: Tensor | float, n: int) -> Tensor | float:
    """Probability 1 - q^n - (1-q)^n that a group of n samples of a prompt with solve rate q
    (binary rewards) is neither all-correct nor all-wrong, so survives dynamic sampling."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if isinstance(q, Tensor):
        if bool(((q < 0) | (q > 1)).any()):
            raise ValueError("q must lie in [0, 1]")
    elif not 0.0 <= q <= 1.0:
        raise ValueError(f"q must lie in [0, 1], got {q}")
    return 1 - q**n - (1 - q) ** n


def predicted_keep_rate_of(rewards: Tensor, n: int, atol: float = 1e-9) -> Tensor:
    """float64 [G] from rewards [G, N]: the probability that n samples drawn (with
    replacement) from each group's own rewards are not all equal (group_keep_mask's test,
    values within atol of their sorted neighbour being one value), 1 - sum_v p_v^n over
    the group's distinct values v with shares p_v. With rewards in {0, 1} this is
    predicted_keep_rate(q, n) of the group's solve rate q; it needs no binary rewards."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [G, N], got shape {tuple(rewards.shape)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ordered = rewards.detach().double().sort(dim=1).values
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered.diff(dim=1) > atol  # a new value begins here
    out = torch.empty(rewards.shape[0], dtype=torch.float64)
    for i, row in enumerate(starts):
        counts = torch.bincount(row.long().cumsum(0) - 1).double()
        out[i] = 1 - (counts / row.numel()).pow(n).sum()
    return out.clamp_(min=0.0)


def lr_scale(samples_per_step: float, reference_samples: float) -> float:
    """Square-root learning-rate scaling sqrt(samples_per_step / reference_samples) for a
    larger rollout batch (e.g. BroRL's N=512 against the N=16 reference)."""
    if samples_per_step <= 0 or reference_samples <= 0:
        raise ValueError(
            f"samples_per_step and reference_samples must be > 0, got "
            f"{samples_per_step} and {reference_samples}"
        )
    return math.sqrt(samples_per_step / reference_samples)


def max_variance_subset(rewards: Tensor, k: int, generator: torch.Generator | None = None
                        ) -> Tensor:
    """Indices [k] of the k of a group's rewards [N] with the largest variance: the i
    lowest and k - i highest rewards for the best i (max-variance down-sampling, as in
    PODS, Xu et al. 2025: the optimum always has this form). Ties are broken at random
    (generator), so equal rewards are drawn uniformly. k >= N returns every index."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [N], got shape {tuple(rewards.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = rewards.shape[0]
    if k >= n:
        return torch.arange(n)
    perm = torch.randperm(n, generator=generator)
    order = perm[torch.sort(rewards[perm].double(), stable=True).indices]
    r = rewards[order].double()
    csum = torch.cat([r.new_zeros(1), r.cumsum(0)])
    csq = torch.cat([r.new_zeros(1), (r * r).cumsum(0)])
    i = torch.arange(k + 1)  # i lowest + (k - i) highest
    s = csum[i] + (csum[n] - csum[n - (k - i)])
    sq = csq[i] + (csq[n] - csq[n - (k - i)])
    var = sq / k - (s / k) ** 2
    best = int(torch.argmax(var))
    return torch.cat([order[:best], order[n - (k - best):]])
