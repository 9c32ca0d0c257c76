"""The policy update of one step: advantages over each kept group, then clipped policy-
gradient steps on mini-batches, each accumulated over micro-batches so that N=512 samples
per prompt fit in memory. Micro-batch losses are normalised by their mini-batch's token
(or sequence) count, so accumulation equals one large batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.algorithms import (
    aggregate_loss,
    compute_advantages,
    kl_penalty,
    max_variance_subset,
    ppo_clip_loss,
    tis_weights,
)
from trainer.config import TrainConfig
from trainer.policy import pad_batch, token_logprobs
from trainer.rollout import Group


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
    for g, row in zip(groups, adv):
        keep = (max_variance_subset(g.rewards, k, generator).tolist() if k
                else range(g.n))
        samples += [Sample(g.prompt_ids + g.response_ids[j], len(g.prompt_ids),
                           float(row[j]), g.behaviour_logprobs[j])
                    for j in sorted(keep) if g.response_ids[j]]
    return samples, {"advantage/abs_mean": float(adv.abs().mean()),
                     "advantage/max": float(adv.max()), "advantage/min": float(adv.min())}


def policy_update(model, optimizer, scheduler, groups: list[Group], cfg: TrainConfig,
                  pad_id: int, ref_model=None, generator: torch.Generator | None = None
                  ) -> dict:
    """Runs algorithm.num_mini_batches optimizer steps over the kept groups' samples.
    Returns averaged loss statistics."""
    samples, metrics = build_samples(groups, cfg, generator)
    if cfg.algorithm.old_logprobs == "recompute":
        recompute_old_logprobs(model, samples, cfg, pad_id)
    order = torch.randperm(len(samples), generator=generator).tolist()
    chunks = [order[i::cfg.algorithm.num_mini_batches]
              for i in range(cfg.algorithm.num_mini_batches)]
    totals: dict[str, float] = {}
    for idx in chunks:
        mini = [samples[i] for i in sorted(idx)]
        stats = _mini_batch_step(model, optimizer, mini, cfg, pad_id, ref_model)
        scheduler.step()
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v / len(chunks)
    return {**metrics, **totals, "train/lr": scheduler.get_last_lr()[0],
            "train/samples": len(samples),
            "train/tokens": sum(s.num_response for s in samples)}


def _mini_batch_step(model, optimizer, mini: list[Sample], cfg: TrainConfig, pad_id: int,
                     ref_model) -> dict:
    a, o = cfg.algorithm, cfg.optim
    device = next(model.parameters()).device
    num_tokens = sum(s.num_response for s in mini)
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    for i in range(0, len(mini), o.micro_batch_size):
        micro = mini[i:i + o.micro_batch_size]
        ids, targets, mask = pad_batch([s.ids for s in micro], [s.start for s in micro],
                                       pad_id, device)
        behaviour = _per_token(micro, "behaviour_logprobs", mask)
        logprobs, entropy = token_logprobs(model, ids, targets, mask,
                                           cfg.rollout.temperature, o.logprob_chunk,
                                           with_entropy=True)
        adv = torch.tensor([s.advantage for s in micro], device=device)[:, None] * mask
        old = behaviour
        if a.old_logprobs == "recompute":
            old = _per_token(micro, "old_logprobs", mask)
            if a.tis != "none":  # correct for the engine/trainer mismatch, per token
                weights, tis = tis_weights(old, behaviour, mask, a.tis_low, a.tis_high, a.tis)
                adv = adv * weights
                for k, v in tis.items():
                    _add(sums, f"tis/{k}", float(v) * mask.sum().item() / num_tokens)
        agg = dict(mode=a.loss_agg, num_tokens=num_tokens, num_seqs=len(mini))
        pg, stats = ppo_clip_loss(logprobs, old, adv, mask, a.eps_low, a.eps_high,
                                  a.dual_clip, a.loss_agg, num_tokens, len(mini))
        loss = pg
        if a.entropy_coef:
            loss = loss - a.entropy_coef * aggregate_loss(entropy, mask, **agg)
        if a.kl_coef and ref_model is not None:
            with torch.no_grad():
                ref, _ = token_logprobs(ref_model, ids, targets, mask,
                                        cfg.rollout.temperature, o.logprob_chunk, False)
            kl = aggregate_loss(kl_penalty(logprobs, ref, a.kl_estimator, a.kl_clamp),
                                mask, **agg)
            loss = loss + a.kl_coef * kl
            _add(sums, "train/kl", kl.item())
        loss.backward()
        share = mask.sum().item() / num_tokens
        _add(sums, "train/loss", loss.item())
        _add(sums, "train/pg_loss", pg.item())
        _add(sums, "train/entropy", aggregate_loss(entropy.detach(), mask,
                                                   "token-mean").item() * share)
        for k, v in stats.items():
            _add(sums, f"train/{k}", float(v) * share)
    params = [p for p in model.parameters() if p.grad is not None]
    clip = o.grad_clip if o.grad_clip > 0 else float("inf")
    sums["train/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, clip))
    optimizer.step()
    return sums


@torch.no_grad()
def recompute_old_logprobs(model, samples: list[Sample], cfg: TrainConfig,
                           pad_id: int) -> None:
    """The trainer's logprobs of every response token before this step's update."""
    device = next(model.parameters()).device
    for i in range(0, len(samples), cfg.optim.micro_batch_size):
        micro = samples[i:i + cfg.optim.micro_batch_size]
        ids, targets, mask = pad_batch([s.ids for s in micro], [s.start for s in micro],
                                       pad_id, device)
        lp, _ = token_logprobs(model, ids, targets, mask, cfg.rollout.temperature,
                               cfg.optim.logprob_chunk, with_entropy=False)
        for row, s in enumerate(micro):
            s.old_logprobs = lp[row, s.start - 1:len(s.ids) - 1].tolist()


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
