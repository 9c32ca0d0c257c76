"""The policy update of one step: advantages over each kept group, then clipped policy-
gradient steps on mini-batches, each accumulated over micro-batches so that N=512 samples
per prompt fit in memory. Micro-batch losses are normalised by their mini-batch's token
(or sequence) count, so accumulation equals one large batch. With a data-parallel group
(trainer/parallel.py) each rank takes its share of every mini-batch in the same number of
micro-batches, and FSDP2 sums the gradients, so the step equals the one-process step.

At large N a peaked policy repeats itself: many samples of a group are the same sequence
with the same advantage and behaviour logprobs. With optim.merge_identical_samples each
distinct sample of a mini-batch is computed once, weighted by how many it stands for, which
gives the same loss and gradient."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from brorl.trainer.algorithms import (
    aggregate_loss,
    compute_advantages,
    kl_penalty,
    max_variance_subset,
    ppo_clip_loss,
    tis_weights,
)
from brorl.trainer.config import TrainConfig
from brorl.trainer.parallel import SINGLE, DataParallel, all_gather_objects, sum_metrics, total_norm
from brorl.trainer.policy import pad_batch, token_logprobs
from brorl.trainer.rollout import Group


@dataclass
class Sample:
    """One training sequence: prompt + response, its advantage and behaviour logprobs."""

    ids: list[int]
    start: int  # index of the first response token in ids
    advantage: float
    behaviour_logprobs: list[float]
    old_logprobs: list[float] | None = None  # the trainer's, before this step's update

    @property
    def num_response(self) -> int:
        return len(self.ids) - self.start


def build_samples(groups: list[Group], cfg: TrainConfig,
                  generator: torch.Generator | None = None) -> tuple[list[Sample], dict]:
    """Training samples of the kept groups. Advantages are computed over all N samples of
    each group; with algorithm.train_samples_per_group = k only the k samples of each group
    with the largest reward variance enter the loss."""
    rewards = torch.stack([g.rewards for g in groups])  # [G, N]
    adv = compute_advantages(cfg.algorithm.advantage, rewards)
    k = cfg.algorithm.train_samples_per_group
    samples = []
    for gi, (g, row) in enumerate(zip(groups, adv)):
        keep = (max_variance_subset(g.rewards, k, generator).tolist() if k
                else range(g.n))
        for j in sorted(keep):
            lps = g.behaviour_logprobs[j] or ()
            if len(lps) != len(g.response_ids[j]):
                raise ValueError(f"group {gi} sample {j}: {len(lps)} behaviour logprobs for "
                                 f"{len(g.response_ids[j])} response tokens; the engine "
                                 "must return one logprob per sampled token")
            if g.response_ids[j]:
                samples.append(Sample(g.prompt_ids + g.response_ids[j], len(g.prompt_ids),
                                      float(row[j]), g.behaviour_logprobs[j]))
    return samples, {"advantage/abs_mean": float(adv.abs().mean()),
                     "advantage/max": float(adv.max()), "advantage/min": float(adv.min())}


def policy_update(model, optimizer, scheduler, groups: list[Group], cfg: TrainConfig,
                  pad_id: int, ref_model=None, generator: torch.Generator | None = None,
                  dp: DataParallel = SINGLE) -> dict:
    """Runs algorithm.num_mini_batches optimizer steps over the kept groups' samples (one
    per sample when there are fewer).
    Returns averaged loss statistics. Every rank of `dp` calls it with the same groups
    and an identically seeded generator."""
    samples, metrics = build_samples(groups, cfg, generator)
    if cfg.algorithm.old_logprobs == "recompute":
        metrics.update(recompute_old_logprobs(model, samples, cfg, pad_id, dp))
    order = torch.randperm(len(samples), generator=generator).tolist()
    # fewer samples than mini-batches: no empty ones (AdamW would still step on its
    # momentum, and the averaged statistics would count them as zeros)
    chunks = [order[i::cfg.algorithm.num_mini_batches]
              for i in range(min(cfg.algorithm.num_mini_batches, len(samples)))]
    totals: dict[str, float] = {}
    norms = []
    distinct = 0
    for idx in chunks:
        mini = [samples[i] for i in sorted(idx)]
        rows = (merge_identical(mini) if cfg.optim.merge_identical_samples
                else [(s, 1) for s in mini])
        distinct += len(rows)
        stats = _mini_batch_step(model, optimizer, mini, rows, cfg, pad_id, ref_model, dp)
        norms.append(stats.pop("train/grad_norm"))  # already global: not summed over ranks
        scheduler.step()
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v / len(chunks)
    totals = sum_metrics(totals, dp)
    return {**metrics, **totals, "train/grad_norm": sum(norms) / len(norms),
            "train/lr": scheduler.get_last_lr()[0], "train/samples": len(samples),
            "train/distinct_samples": distinct,
            "train/tokens": sum(s.num_response for s in samples)}


def micro_batches(items: list, size: int, dp: DataParallel = SINGLE) -> list[list]:
    """This rank's share of `items` cut into micro-batches of at most `size`; every rank
    gets the same number of them (FSDP2 runs collectives in each forward and backward), so
    a rank with fewer items gets empty ones at the end. No items: no micro-batches."""
    per_rank = -(-len(items) // dp.world_size)  # rank 0's share, the largest
    count = -(-per_rank // size)
    mine = dp.share(items)
    return [mine[i * size:(i + 1) * size] for i in range(count)]


def longest_first(items: list, ids=lambda item: item.ids) -> list:
    """`items` by sequence length, longest first (stable), so that each micro-batch holds
    sequences of similar length and pads little: responses range from a few tokens to the
    full max_tokens. Every loss and statistic is a sum over rows, so the order changes
    nothing but float rounding; striding the sorted list also gives each rank about the
    same number of tokens."""
    return sorted(items, key=lambda item: -len(ids(item)))


def merge_identical(samples: list[Sample]) -> list[tuple[Sample, int]]:
    """(sample, count) for each distinct sample in order of first appearance: equal
    tokens, response start, advantage, behaviour and old logprobs."""
    index: dict[tuple, int] = {}
    rows: list[tuple[Sample, int]] = []
    for s in samples:
        key = (tuple(s.ids), s.start, s.advantage, tuple(s.behaviour_logprobs),
               None if s.old_logprobs is None else tuple(s.old_logprobs))
        i = index.setdefault(key, len(rows))
        if i == len(rows):
            rows.append((s, 1))
        else:
            rows[i] = (rows[i][0], rows[i][1] + 1)
    return rows


def _mini_batch_step(model, optimizer, mini: list[Sample], rows: list[tuple[Sample, int]],
                     cfg: TrainConfig, pad_id: int, ref_model,
                     dp: DataParallel = SINGLE) -> dict:
    """One optimizer step on `mini`, computed over `rows` (its distinct samples with their
    counts; each count weights that row's tokens in every loss and statistic)."""
    a, o = cfg.algorithm, cfg.optim
    device = next(model.parameters()).device
    num_tokens = sum(s.num_response for s in mini)
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    rows = longest_first(rows, lambda row: row[0].ids)
    for micro_rows in micro_batches(rows, o.micro_batch_size, dp):
        # A rank with no samples left runs one at weight 0 (FSDP2's collectives must run
        # on every rank) and keeps its statistics out of the sums.
        dummy = not micro_rows
        micro_rows = micro_rows or rows[:1]
        micro = [s for s, _ in micro_rows]
        acc: dict[str, float] = {} if dummy else sums
        ids, targets, mask = pad_batch([s.ids for s in micro], [s.start for s in micro],
                                       pad_id, device)
        counts = torch.tensor([c for _, c in micro_rows], dtype=torch.float32, device=device)
        weight = mask * counts[:, None]  # each row's tokens count once per sample it is
        behaviour = _per_token(micro, "behaviour_logprobs", mask)
        logprobs, entropy = token_logprobs(model, ids, targets, mask,
                                           cfg.rollout.temperature, o.logprob_chunk,
                                           with_entropy=True)
        adv = torch.tensor([s.advantage for s in micro], device=device)[:, None] * mask
        old = behaviour
        if a.old_logprobs == "recompute":
            old = _per_token(micro, "old_logprobs", mask)
            if a.tis != "none":  # correct for the engine/trainer mismatch, per token
                weights, tis = tis_weights(old, behaviour, weight, *a.tis_bounds, a.tis)
                adv = adv * weights
                for k, v in tis.items():
                    _add(acc, f"tis/{k}", float(v) * weight.sum().item() / num_tokens)
        agg = dict(mode=a.loss_agg, num_tokens=num_tokens, num_seqs=len(mini))
        pg, stats = ppo_clip_loss(logprobs, old, adv, weight, a.eps_low, a.eps_high,
                                  a.dual_clip, a.loss_agg, num_tokens, len(mini))
        loss = pg
        if a.entropy_coef:
            loss = loss - a.entropy_coef * aggregate_loss(entropy, weight, **agg)
        if a.kl_coef and ref_model is not None:
            with torch.no_grad():
                ref, _ = token_logprobs(ref_model, ids, targets, mask,
                                        cfg.rollout.temperature, o.logprob_chunk, False)
            kl = aggregate_loss(kl_penalty(logprobs, ref, a.kl_estimator, a.kl_clamp),
                                weight, **agg)
            loss = loss + a.kl_coef * kl
            _add(acc, "train/kl", kl.item())
        (loss * 0.0 if dummy else loss).backward()
        share = weight.sum().item() / num_tokens
        _add(acc, "train/loss", loss.item())
        _add(acc, "train/pg_loss", pg.item())
        _add(acc, "train/entropy", aggregate_loss(entropy.detach(), weight,
                                                   "token-mean").item() * share)
        for k, v in stats.items():
            _add(acc, f"train/{k}", float(v) * share)
    params = [p for p in model.parameters() if p.grad is not None]
    clip = o.grad_clip if o.grad_clip > 0 else float("inf")
    sums["train/grad_norm"] = total_norm(torch.nn.utils.clip_grad_norm_(params, clip))
    optimizer.step()
    return sums


@torch.no_grad()
def recompute_old_logprobs(model, samples: list[Sample], cfg: TrainConfig,
                           pad_id: int, dp: DataParallel = SINGLE) -> dict:
    """The trainer's logprobs of every response token before this step's update (each
    rank computes its share; every rank ends up with all of them). With
    optim.merge_identical_samples a sequence that appears more than once is computed once
    and its samples share the result. Returns how far the engine's behaviour logprobs are
    from them (`logprob_mismatch`)."""
    device = next(model.parameters()).device
    everyone = samples
    if cfg.optim.merge_identical_samples:
        first: dict[tuple, Sample] = {}
        for s in everyone:
            first.setdefault((tuple(s.ids), s.start), s)
        samples = list(first.values())
    samples = longest_first(samples)
    mine: list[list[float]] = []
    for micro in micro_batches(samples, cfg.optim.micro_batch_size, dp):
        batch = micro or samples[:1]  # an empty share still joins the collectives
        ids, targets, mask = pad_batch([s.ids for s in batch], [s.start for s in batch],
                                       pad_id, device)
        lp, _ = token_logprobs(model, ids, targets, mask, cfg.rollout.temperature,
                               cfg.optim.logprob_chunk, with_entropy=False)
        mine += [lp[row, s.start - 1:len(s.ids) - 1].tolist() for row, s in enumerate(micro)]
    for rank, values in enumerate(all_gather_objects(mine, dp)):
        for s, v in zip(samples[rank::dp.world_size], values):
            s.old_logprobs = v
    if cfg.optim.merge_identical_samples:
        for s in everyone:
            s.old_logprobs = first[(tuple(s.ids), s.start)].old_logprobs
    # samples with the same tokens may hold different behaviour logprobs (another
    # prompt's group, a batch-dependent kernel): merge_identical keeps them apart
    rows = merge_identical(everyone)
    return logprob_mismatch([s for s, _ in rows], [c for _, c in rows])


def logprob_mismatch(samples: list[Sample], counts: list[int]) -> dict:
    """The engine/trainer mismatch over response tokens (each sample counted `counts`
    times): mean and max |old - behaviour| of the logprobs, and mean |p_old - p_behaviour|
    of the probabilities. In float32 it is float rounding; in 16-bit, or with a kernel
    that computes another function, it is what algorithm.tis corrects."""
    old = torch.tensor([v for s in samples for v in s.old_logprobs], dtype=torch.float64)
    if not old.numel():
        return {}
    beh = torch.tensor([v for s in samples for v in s.behaviour_logprobs], dtype=torch.float64)
    w = torch.tensor([c for s, c in zip(samples, counts) for _ in s.old_logprobs],
                     dtype=torch.float64)
    diff = (old - beh).abs()
    return {"mismatch/logprob_abs_mean": float((diff * w).sum() / w.sum()),
            "mismatch/logprob_abs_max": float(diff.max()),
            "mismatch/prob_abs_mean": float(((old.exp() - beh.exp()).abs() * w).sum()
                                            / w.sum())}


def _per_token(micro: list[Sample], attr: str, mask: torch.Tensor) -> torch.Tensor:
    """A per-response-token list attribute laid out like `mask` ([B, L-1])."""
    out = torch.zeros(mask.shape, dtype=torch.float32)
    for row, s in enumerate(micro):
        values = getattr(s, attr)
        out[row, s.start - 1:s.start - 1 + len(values)] = torch.tensor(values,
                                                                        dtype=torch.float32)
    return out.to(mask.device)


def _add(d: dict, k: str, v: float) -> None:
    d[k] = d.get(k, 0.0) + v
