"""One step's rollouts: generate N samples per prompt with the engine, score them, and keep
groups by dynamic sampling (rewards not all equal), drawing more prompts until the step has
its configured number of kept groups (with rollout.oversample, as many more as the step's
pass rate so far says are needed)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from brorl.engine import SamplingParams
from brorl.trainer.algorithms import group_keep_mask, predicted_keep_rate_of
from brorl.trainer.config import TrainConfig
from brorl.trainer.coverage import unsampled_mass
from brorl.trainer.data import Problem, ProblemStream, render_prompt, system_prompt
from brorl.trainer.verifiers import VerifyItem

log = logging.getLogger("brorl")


@dataclass
class Group:
    """One prompt and its N samples. rewards [N]; the lists are per sample."""

    problem: Problem
    prompt_ids: list[int]
    response_ids: list[list[int]]
    behaviour_logprobs: list[list[float]]
    finish_reasons: list[str]
    rewards: torch.Tensor

    @property
    def n(self) -> int:
        return len(self.response_ids)


@dataclass
class Rollouts:
    groups: list[Group]  # the kept groups
    metrics: dict = field(default_factory=dict)


def sample_seed(run_seed: int, step: int, draw: int, index: int) -> int:
    """A distinct engine seed per (run, step, draw, prompt): a resumed run draws the same
    samples, and no two prompts share noise."""
    return (run_seed * 1_000_003 + step * 10_007 + draw * 101 + index) % (2**63)


def generate_groups(engine, problems: list[Problem], cfg: TrainConfig, seeds: list[int],
                    pool, sampling: dict, progress: bool = False,
                    timings: dict | None = None) -> list[Group]:
    """N samples for each problem, scored; `sampling` holds the SamplingParams but the
    seed (e.g. `cfg.rollout.sampling`), seeds one per problem. Truncated responses get
    algorithm.truncated_reward (when set). `timings["generate_s"]` accumulates the time
    in the engine (not in the verifiers)."""
    system = system_prompt(cfg.data.system_prompt)
    prompts = [render_prompt(p, engine.tokenizer, cfg.data.chat_template, system)
               for p in problems]
    params = [SamplingParams(**sampling, seed=s) for s in seeds]
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params, use_tqdm=progress)
    if timings is not None:
        timings["generate_s"] = timings.get("generate_s", 0.0) + time.perf_counter() - t0
    items = [VerifyItem(c.text or "", p.answer, p.verifier, p.metadata)
             for p, o in zip(problems, outs) for c in o.outputs]
    results = pool.score(items)
    if results and all(r.status != "ok" for r in results):
        # scored 0 and trained on as such: say so rather than let a broken verifier pass
        # for a policy that solves nothing
        log.warning("the verifier failed on all %d samples, which scored 0 (first: %s, %s)",
                    len(results), results[0].status, results[0].detail)
    groups, k = [], 0
    for p, ids, o in zip(problems, prompts, outs):
        scores = []
        for c in o.outputs:
            r = results[k].score
            k += 1
            if c.finish_reason == "length" and cfg.algorithm.truncated_reward is not None:
                r = cfg.algorithm.truncated_reward
            scores.append(r)
        groups.append(Group(p, ids, [c.token_ids for c in o.outputs],
                            [c.logprobs for c in o.outputs],
                            [c.finish_reason for c in o.outputs],
                            torch.tensor(scores, dtype=torch.float32)))
    return groups


def collect_rollouts(engine, stream: ProblemStream, pool, cfg: TrainConfig, step: int
                     ) -> Rollouts:
    """Draws prompts until `prompts_per_step` groups are kept (or `max_prompts_per_step`
    were generated), as BroRL/DAPO dynamic sampling does. Metrics: pass rate (kept /
    generated groups) beside the rate predicted from each group's solve rate q,
    1 - q^N - (1-q)^N, reward and length statistics, throughput."""
    r = cfg.rollout
    kept, generated, draw = [], [], 0
    before = dict(pool.stats)
    engine_before = _engine_counts(engine)
    timings: dict = {}
    start = time.perf_counter()
    while len(kept) < r.prompts_per_step and len(generated) < r.max_prompts_per_step:
        need = r.prompts_per_step - len(kept)
        if r.oversample and generated:  # expect the pass rate seen so far in this step
            need = (math.ceil(need * len(generated) / len(kept)) if kept
                    else r.max_prompts_per_step)
        k = min(need, r.max_prompts_per_step - len(generated))
        problems = stream.take(k)
        seeds = [sample_seed(cfg.seed, step, draw, i) for i in range(k)]
        groups = generate_groups(engine, problems, cfg, seeds, pool, r.sampling, cfg.progress,
                                 timings)
        generated += groups
        keep = (group_keep_mask(torch.stack([g.rewards for g in groups]))
                if r.dynamic_sampling else torch.ones(len(groups), dtype=torch.bool))
        kept += [g for g, m in zip(groups, keep.tolist()) if m]
        draw += 1
        if not r.dynamic_sampling:
            break
    seconds = time.perf_counter() - start
    metrics = rollout_metrics(generated, kept, seconds)  # pass rate: of all that passed
    generate_s = timings.get("generate_s", 0.0)
    if generate_s > 0:  # BroRL's samples/s: generation alone, without the verifiers
        metrics["rollout/generate_seconds"] = generate_s
        metrics["rollout/generate_samples_per_s"] = (
            sum(g.rewards.numel() for g in generated) / generate_s)
    if r.oversample:
        metrics["rollout/groups_dropped"] = max(0, len(kept) - r.prompts_per_step)
        kept = kept[:r.prompts_per_step]
        metrics["rollout/groups_kept"] = len(kept)
    for key in ("timeouts", "errors"):  # those samples scored 0; the run goes on
        metrics[f"verifier/{key}"] = pool.stats[key] - before[key]
    engine_after = _engine_counts(engine)
    if engine_before and engine_after:
        metrics.update(_engine_metrics(engine_before, engine_after, generated))
    metrics.update(coverage_metrics(generated[:r.coverage_groups]))
    return Rollouts(kept, metrics)


def coverage_metrics(groups: list[Group]) -> dict:
    """The next-token mass no sample tried at each group's samples' states (trainer/coverage.py).
    With more than 16 samples per group, also what ProRL's N=16 leaves untried on the same
    policy: the group's first 16 samples as a tree of their own (`_n16`), and at their
    states with all samples' children (`_n16_states`). Nothing without groups or behaviour
    logprobs."""
    if not groups or any(lp is None for g in groups for lp in g.behaviour_logprobs):
        return {}
    pairs = [(g.response_ids, g.behaviour_logprobs) for g in groups]
    wide_n = min(g.n for g in groups) > 16
    wide = unsampled_mass(pairs, states=16 if wide_n else None)
    out = {"rollout/unsampled_mass": wide["mean"],
           "rollout/unsampled_mass_first_token": wide["first_token"]}
    if wide_n:
        narrow = unsampled_mass([(t[:16], lp[:16]) for t, lp in pairs])
        out["rollout/unsampled_mass_n16"] = narrow["mean"]
        out["rollout/unsampled_mass_n16_states"] = wide["states_mean"]
        out["rollout/unsampled_mass_first_token_n16"] = narrow["first_token"]
    return out


_COUNTS = ("decode_tokens", "decode_rows", "prefill_tokens", "recomputed_prompt_tokens")


def _engine_counts(engine) -> dict | None:
    """The counters of engines that keep them (ours; not SGLang)."""
    stats = engine.stats() if hasattr(engine, "stats") else {}
    return {k: stats[k] for k in _COUNTS} if all(k in stats for k in _COUNTS) else None


def _engine_metrics(before: dict, after: dict, generated: list[Group]) -> dict:
    """decode_rows_fraction: the share of sample-tokens the model computed in decode
    (merged samples decode as one row). prefix_cache_hit_rate: the share of the samples'
    prompt tokens not computed, as SGLang counts it with each sample a request: 1 - 1/N
    from the group fork, more where the radix cache held part of a prompt, less where
    preempted samples recomputed their copy of the prompt's partial last page."""
    d = {k: after[k] - before[k] for k in _COUNTS}
    out = {}
    if d["decode_tokens"] > 0:
        out["rollout/decode_rows_fraction"] = d["decode_rows"] / d["decode_tokens"]
    prompt_tokens = sum(g.n * len(g.prompt_ids) for g in generated)
    if prompt_tokens:
        computed = d["prefill_tokens"] + d["recomputed_prompt_tokens"]
        out["rollout/prefix_cache_hit_rate"] = 1.0 - computed / prompt_tokens
    return out


def rollout_metrics(generated: list[Group], kept: list[Group], seconds: float) -> dict:
    rewards = torch.stack([g.rewards for g in generated])  # [G, N]
    q = rewards.gt(0.5).float().mean(1)  # solve rate of each prompt (binary rewards)
    n = rewards.shape[1]
    lengths = torch.tensor([len(ids) for g in generated for ids in g.response_ids],
                           dtype=torch.float32)
    truncated = sum(f == "length" for g in generated for f in g.finish_reasons)
    samples = rewards.numel()
    out = {
        "rollout/groups_generated": len(generated),
        "rollout/groups_kept": len(kept),
        "rollout/pass_rate": len(kept) / len(generated),
        "rollout/predicted_pass_rate": float(predicted_keep_rate_of(rewards, n).mean()),
        # what the same prompts would keep at ProRL's N=16 (BroRL: 41% there, 62% at 512)
        "rollout/predicted_pass_rate_n16": float(predicted_keep_rate_of(rewards, 16).mean()),
        "rollout/all_correct_groups": int((q == 1).sum()),
        "rollout/all_wrong_groups": int((q == 0).sum()),
        "rollout/seconds": seconds,
        "rollout/samples_per_s": samples / seconds,
        "rollout/tokens_per_s": float(lengths.sum()) / seconds,
        "reward/mean": float(rewards.mean()),
        "reward/kept_mean": float(torch.stack([g.rewards for g in kept]).mean())
        if kept else None,
        "response/mean_tokens": float(lengths.mean()),
        "response/truncated_fraction": truncated / samples,
    }
    if n > 16:
        # each group's first 16 samples are a draw of 16 from the same policy on the same
        # prompts: the share of groups that would pass at N=16, measured, not predicted
        out["rollout/pass_rate_n16"] = float(group_keep_mask(rewards[:, :16]).float().mean())
    return out
