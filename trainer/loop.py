"""The embedded BroRL loop: engine and trainer in one process on one device. Each step:
rollouts (N samples per prompt, dynamic sampling) -> advantages + clipped policy update ->
in-process weight sync (the protocol's InProcessSender, then `Engine.update_weights`;
skipped when no group was kept, as the weights did not change) -> metrics, periodic eval,
checkpoint.

With a data-parallel group (trainer/parallel.py, the Ray launcher's ray.num_trainers > 1)
every trainer rank runs this loop on an FSDP2 shard of the policy: rank 0 alone holds the
engine, the data stream, the verifiers and the run directory; the other ranks receive each
step's kept groups from it and join the collectives (update, full-state gathers)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from brorl.engine import Engine
from brorl.trainer.checkpoint import (
    RUN_CONFIG,
    latest_checkpoint,
    rng_state,
)
from brorl.trainer.config import TrainConfig
from brorl.trainer.config_load import to_dict
from brorl.trainer.data import GYM_PREFIX, ProblemStream, load_problems
from brorl.trainer.evaluate import evaluate
from brorl.trainer.metrics import MetricsWriter, read_metrics
from brorl.trainer.parallel import (
    SINGLE,
    DataParallel,
    MainRankError,
    broadcast_object,
    full_state,
    load_sharded_policy,
    on_main,
    plain_copy,
)
from brorl.trainer.policy import load_policy, set_matmul_precision
from brorl.trainer.rollout import collect_rollouts
from brorl.trainer.run_state import claim_run_dir, restore_run, save_interrupted, save_run
from brorl.trainer.update import policy_update
from brorl.trainer.verifiers import VerifierPool
from brorl.trainer.weight_sync import InProcessSender, WeightSyncError
from brorl.trainer.weight_sync.probe import probe_check

log = logging.getLogger("brorl")


@dataclass
class Run:
    """Everything a step touches."""

    cfg: TrainConfig
    run_dir: Path
    engine: Engine | None  # None on data-parallel ranks other than 0 (so are the next four)
    model: torch.nn.Module
    ref_model: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    stream: ProblemStream | None
    held_out: list
    pool: VerifierPool | None
    metrics: MetricsWriter | None
    pad_id: int = 0
    dp: DataParallel = SINGLE
    step: int = 0
    elapsed_s: float = 0.0  # training wall time, carried across resumes
    checkpointed: int = 0  # the step of the newest checkpoint (0: none yet)
    # the trainer state as the last finished step left it, kept while the next step has
    # only drawn rollouts (the policy is unchanged): an interrupt then saves that step
    resumable: dict | None = None


def train(cfg: TrainConfig, resume: str | None = None, make_engine=None,
          dp: DataParallel = SINGLE) -> dict:
    """Runs (or resumes) a training run; returns {"before": eval, "after": eval} (an empty
    dict on data-parallel ranks other than 0). `make_engine(path, cfg)` builds the engine
    (default: a local `Engine`; the Ray launcher passes one that returns its rollout
    workers behind the same interface)."""
    run = setup(cfg, resume, make_engine, dp)
    try:
        if run.step == 0:
            _log_eval(run, 0, {"elapsed_s": 0.0})
        elif run.step >= cfg.steps and dp.is_main:
            log.warning("the run is already at step %d of steps=%d: nothing to train (pass "
                        "steps=N to go on)", run.step, cfg.steps)
        while run.step < cfg.steps:
            train_step(run)
    except KeyboardInterrupt:
        save_interrupted(run)
        raise
    finally:
        if dp.is_main:
            run.pool.close()
            run.metrics.close()
    return summary(run.run_dir) if dp.is_main else {}


def _transformers_progress(progress: bool) -> None:
    """progress=false also silences transformers' own bars (loading weights, writing each
    checkpoint's shards); progress=true leaves them as they are."""
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def setup(cfg: TrainConfig, resume: str | None, make_engine=None,
          dp: DataParallel = SINGLE) -> Run:
    _transformers_progress(cfg.progress)
    run_dir = Path(resume or cfg.output_dir)

    problems: list = []  # (train, held-out), read on rank 0

    def prepare() -> tuple[Path | None, str]:
        ckpt = latest_checkpoint(run_dir) if resume else None
        # before the policy is built (the demo's warm start takes minutes): a bad dataset
        # or verifier fails in seconds
        problems.extend(load_problems(cfg.data))
        if ckpt is None:
            claim_run_dir(run_dir, cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        # saved without overwrite: a run's config reused as a template must not delete
        # that run
        saved = to_dict(dataclasses.replace(cfg, overwrite=False))
        config_file = run_dir / RUN_CONFIG
        if ckpt is not None and config_file.is_file():
            # a resume with overrides (steps=20) runs them: so must the next resume
            changed = _changed_keys(yaml.safe_load(config_file.read_text()), saved)
            if changed:
                log.warning("resuming with a changed config (%s); %s now holds it",
                            ", ".join(changed), config_file)
            else:
                config_file = None
        if config_file is not None:
            config_file.write_text(yaml.safe_dump(saved, sort_keys=False))
        return ckpt, (str(ckpt) if ckpt else _initial_policy(cfg))  # e.g. the demo policy

    # only rank 0 touches the filesystem; the other ranks get what they need from it
    ckpt, path = on_main(prepare, dp, share=True)
    device = torch.device(cfg.model.resolved_device)
    set_matmul_precision(device, cfg.optim.tf32)
    r = cfg.rollout

    def rank0_parts():
        engine = (make_engine or local_engine)(path, cfg)
        if engine.tokenizer is None:
            raise ValueError(f"{path} has no tokenizer; the trainer needs one to render "
                             "prompts")
        train_set, held_out = problems
        return (engine, ProblemStream(train_set, cfg.seed), len(train_set), held_out,
                VerifierPool(cfg.verifier.num_workers, cfg.verifier.timeout_s),
                MetricsWriter(run_dir))

    engine, stream, n_train, held_out, pool, metrics = (on_main(rank0_parts, dp)
                                                        or (None, None, 0, [], None, None))
    pad_id = broadcast_object((engine.tokenizer.pad_token_id or 0) if dp.is_main else None,
                              dp)
    if dp.enabled:  # rank 0 reads the weights; the others get their shards by broadcast
        model = load_sharded_policy(path, dp, device,
                                    checkpointing=cfg.optim.gradient_checkpointing)
        ref_model = (load_sharded_policy(path, dp, device, frozen=True)
                     if cfg.algorithm.kl_coef else None)
    else:
        model = load_policy(path, device, cfg.optim.gradient_checkpointing)
        ref_model = _frozen_copy(model) if cfg.algorithm.kl_coef else None
    if cfg.algorithm.ref_reset_every and ref_model is None and dp.is_main:
        log.warning("algorithm.ref_reset_every=%d does nothing with algorithm.kl_coef=0: "
                    "there is no reference to reset (nor, with it, the optimizer state)",
                    cfg.algorithm.ref_reset_every)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.optim.betas),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    run = Run(cfg, run_dir, engine, model, ref_model, optimizer, scheduler, stream, held_out,
              pool, metrics, pad_id, dp)
    if ckpt is not None:
        restore_run(run, ckpt)
    if dp.is_main:
        log.info("policy %s on %s; %d training / %d held-out problems; N=%d, %d groups per "
                 "step%s", path, device, n_train, len(held_out), r.n,
                 r.prompts_per_step, f"; {dp.world_size} FSDP2 trainer ranks"
                 if dp.enabled else "")
    return run


def train_step(run: Run) -> dict:
    cfg, step = run.cfg, run.step + 1
    start = time.perf_counter()
    groups, metrics = None, {}
    if run.dp.is_main:
        run.resumable = {"stream": run.stream.state(), "rng": rng_state(),
                         "elapsed_s": run.elapsed_s}
        rollouts = collect_rollouts(run.engine, run.stream, run.pool, cfg, step)
        groups, metrics = rollouts.groups, dict(rollouts.metrics)
    run.resumable = None  # from here on the step changes the policy
    groups = broadcast_object(groups, run.dp)
    if groups:
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        metrics.update(policy_update(run.model, run.optimizer, run.scheduler, groups, cfg,
                                     run.pad_id, run.ref_model, gen, run.dp))
    elif run.dp.is_main:
        log.warning("step %d: every group had equal rewards; no update (the engine keeps "
                    "policy version %d)", step, run.engine.policy_version)
    a = cfg.algorithm  # before the sync: a checkpoint of a failed sync holds the reset
    if a.ref_reset_every and run.ref_model is not None and step % a.ref_reset_every == 0:
        run.ref_model.load_state_dict(run.model.state_dict())
        if a.reset_optimizer_on_ref_reset:
            run.optimizer.state.clear()
        metrics["train/ref_reset"] = 1
    if groups:  # no update: the engine already holds these weights (and keeps its cache)
        metrics.update(sync_weights(run, step, metrics, start))
    run.step = step
    run.elapsed_s += time.perf_counter() - start
    metrics["elapsed_s"] = run.elapsed_s
    metrics["step_seconds"] = time.perf_counter() - start
    if run.dp.is_main:
        if cfg.eval.every and step % cfg.eval.every == 0 or step == cfg.steps:
            _log_eval(run, step, metrics)
        else:
            run.metrics.log(step, metrics)
        _console(step, cfg.steps, metrics)
    if step % cfg.checkpoint_every == 0 or step == cfg.steps:
        save_run(run)
    return metrics


def local_engine(path: str, cfg: TrainConfig) -> Engine:
    """The embedded launch's engine, on the trainer's device."""
    r = cfg.rollout
    return Engine(path, device=cfg.model.resolved_device, dtype=cfg.model.dtype,
                  page_size=r.page_size, max_kv_tokens=r.max_kv_tokens,
                  attention_backend=r.attention_backend,
                  merge_identical_samples=r.merge_identical_samples,
                  kv_memory_fraction=r.kv_memory_fraction, reserve_ratio=r.reserve_ratio)


def sync_weights(run: Run, step: int, metrics: dict | None = None,
                 start: float | None = None) -> dict:
    """Sends the trainer's weights to the engine(s) as policy version `step`; with
    rollout.weight_sync_probe also compares logits on a fixed prompt. If a rollout worker
    is lost mid-sync, the step's `metrics` (begun at `start`) are logged with
    weight_sync/failed = 1 and the trainer's state is checkpointed (by every trainer rank)
    before the error propagates: a resume goes on from the next step with nothing lost."""
    t0 = time.perf_counter()
    named = full_state(run.model, run.dp)  # collective when sharded; empty off rank 0
    try:
        on_main(lambda: _send(run.engine, named, step), run.dp)
    except (WeightSyncError, MainRankError) as err:
        # rank 0 holds the error itself, the other ranks its type's name: every rank must
        # decide alike, since the checkpoint below is a collective
        sync_failed = (WeightSyncError.__name__ in err.kinds if isinstance(err, MainRankError)
                       else isinstance(err, WeightSyncError))
        if not sync_failed:
            raise
        run.step = step
        if start is not None:
            run.elapsed_s += time.perf_counter() - start
        if metrics is not None and run.dp.is_main:
            run.metrics.log(step, {**metrics, "weight_sync/failed": 1,
                                   "elapsed_s": run.elapsed_s})
        save_run(run)  # every rank joins its gathers
        if isinstance(err, MainRankError):
            raise WeightSyncError(f"trainer rank 0 could not sync the weights: {err}") from err
        raise
    if not run.dp.is_main:
        return {}
    out = {"weight_sync/seconds": time.perf_counter() - t0}
    sent = getattr(run.engine, "last_sync", None)  # a sender's statistics (Ray launcher)
    if isinstance(sent, dict):
        out["weight_sync/bytes"] = sent["bytes"]
        out["weight_sync/shared_memory"] = int(sent["shared_memory"])
    r = run.cfg.rollout
    if r.weight_sync_probe:
        model = plain_copy(run.model, named) if run.dp.enabled else run.model
        out["weight_sync/probe_max_abs_diff"] = probe_check(
            run.engine, model, run.cfg.model.dtype, r.weight_sync_probe_threshold)
    return out


def _send(engine, named: dict, step: int) -> None:
    """Our own engine gets the weights through the protocol's in-process sender, which
    checks them as a receiver checks a manifest (every tensor, its shape, a version that
    does not go back) before changing anything; a Ray launcher's engine has its own."""
    if isinstance(engine, Engine):
        InProcessSender(engine).send(named, step)
    else:
        engine.update_weights(list(named.items()), version=step)


def _log_eval(run: Run, step: int, metrics: dict) -> None:
    if not run.dp.is_main:
        return
    t0 = time.perf_counter()
    result = evaluate(run.engine, run.held_out, run.cfg, run.pool)
    result["eval/seconds"] = time.perf_counter() - t0
    run.metrics.log(step, {**metrics, **result})
    log.info("step %d eval: mean@%d %.3f, pass@%d %.3f, %.1f response tokens", step,
             run.cfg.eval.k, result["eval/mean_at_k"], run.cfg.eval.k,
             result["eval/pass_at_k"], result["eval/mean_response_tokens"])


def _console(step: int, steps: int, m: dict) -> None:
    n16 = m.get("rollout/pass_rate_n16")
    log.info("step %d/%d: reward %.3f, pass rate %.2f (predicted %.2f; at N=16 %.2f%s), "
             "%.0f samples/s, loss %s, %.1f s", step, steps, m["reward/mean"],
             m["rollout/pass_rate"], m["rollout/predicted_pass_rate"],
             m["rollout/predicted_pass_rate_n16"],
             "" if n16 is None else f", first 16 samples {n16:.2f}", m["rollout/samples_per_s"],
             f"{m['train/loss']:.4f}" if "train/loss" in m else "-", m["step_seconds"])


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for k in dict.fromkeys([*old, *new]):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict) and a and b:
            out += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def check_inputs(cfg: TrainConfig) -> None:
    """Fails fast, before any engine, process or Ray actor starts, on inputs that cannot
    work: a model.path that is no checkpoint, data files that do not exist, a CUDA device
    that is not there. Skipped when joining a Ray cluster (ray.address): its actors, not
    this machine, read the files and hold the GPUs."""
    if cfg.launcher == "ray" and cfg.ray.address:
        return
    if cfg.model.path != "demo":
        _require_checkpoint(cfg.model.path)
    for key, value in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if value and not value.startswith(GYM_PREFIX) and not Path(value).is_file():
            raise FileNotFoundError(f"{key} {value!r}: no such file")
    if cfg.model.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"model.device is {cfg.model.device} but torch sees no CUDA "
                             "device (a CPU build of torch, or no GPU); use model.device="
                             "auto or cpu")
        index = torch.device(cfg.model.device).index
        if index is not None and index >= torch.cuda.device_count():
            raise ValueError(f"model.device={cfg.model.device}: torch sees "
                             f"{torch.cuda.device_count()} CUDA device(s)")


def _initial_policy(cfg: TrainConfig) -> str:
    if cfg.model.path == "demo":
        from brorl.trainer.demo import demo_policy

        if cfg.data.train == "gym:chain_sum" and cfg.data.gym_kwargs != cfg.demo.task_kwargs:
            log.warning("the demo policy is warm-started on chain_sum %s but trains and "
                        "evaluates on %s (demo.task_kwargs vs data.gym_kwargs)",
                        cfg.demo.task_kwargs, cfg.data.gym_kwargs)
        return demo_policy(cfg.demo, cfg.progress)
    _require_checkpoint(cfg.model.path)
    return cfg.model.path


def _require_checkpoint(path: str) -> None:
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"model.path {path!r} is not a checkpoint directory "
                                f"(no config.json)")


def _frozen_copy(model):
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def _lr_lambda(cfg: TrainConfig):
    total = cfg.steps * cfg.algorithm.num_mini_batches
    warmup = cfg.optim.warmup_steps

    def factor(i: int) -> float:
        if warmup and i < warmup:
            return (i + 1) / warmup
        if cfg.optim.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warmup) / max(1, total - warmup))))
        return 1.0
    return factor


def summary(run_dir: Path) -> dict:
    """The first and the last evaluation of a run, from its metrics.jsonl."""
    evals = [r for r in read_metrics(run_dir) if r.get("eval/mean_at_k") is not None]
    return {"before": evals[0] if evals else None, "after": evals[-1] if evals else None}
