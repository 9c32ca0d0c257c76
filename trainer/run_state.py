"""A run's state on disk: checkpoints of the whole trainer state (policy, optimizer,
scheduler, data stream, RNG, KL reference, elapsed time), restoring them on every
data-parallel rank, and claiming the run directory for a new run."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from brorl.trainer.checkpoint import (
    CHECKPOINTS,
    checkpoint_dirs,
    load_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from brorl.trainer.config import TrainConfig
from brorl.trainer.config_load import to_dict
from brorl.trainer.metrics import METRICS_FILE, TB_DIR
from brorl.trainer.parallel import (
    broadcast_object,
    full_state,
    load_full_state,
    load_optimizer_state,
    on_main,
    optimizer_state,
)

if TYPE_CHECKING:
    from brorl.trainer.loop import Run

log = logging.getLogger("brorl")


def save_run(run: Run, trainer_state: dict | None = None) -> None:
    """Every rank joins the gathers of a sharded policy; rank 0 writes. `trainer_state`:
    the stream, RNG and elapsed time to save in place of the current ones."""
    dp = run.dp
    optim = optimizer_state(run.model, run.optimizer, dp)
    weights = full_state(run.model, dp) if dp.enabled else None
    ref = full_state(run.ref_model, dp) if dp.enabled and run.ref_model is not None else None
    if not dp.is_main:
        return
    state = {"optimizer": optim, "scheduler": run.scheduler.state_dict(),
             "stream": run.stream.state(), "rng": rng_state(), "elapsed_s": run.elapsed_s,
             **(trainer_state or {}), "config": to_dict(run.cfg), "data_parallel": dp.enabled}
    path = save_checkpoint(run.run_dir, run.step, run.model, run.engine.tokenizer, state,
                           run.ref_model, run.cfg.keep_checkpoints, weights, ref)
    run.checkpointed = run.step
    log.info("checkpoint: %s", path)


def save_interrupted(run: Run) -> None:
    """On Ctrl-C while a step draws its rollouts, the last finished step is saved as it
    ended, so `--resume` loses nothing and continues exactly. Interrupted later in a step
    (the policy half updated), the run resumes from its newest checkpoint. The embedded
    launch only: data-parallel ranks are not interrupted together, and with the Ray
    launcher Ctrl-C reaches the driver, not the trainer actor."""
    if run.dp.enabled or run.resumable is None or run.step <= run.checkpointed:
        return  # (step 0 is the initial policy: a new run starts it again)
    save_run(run, run.resumable)


def restore_run(run: Run, ckpt: Path) -> None:
    """Rank 0 alone reads the checkpoint (the other ranks know only its path); the others
    get the small trainer state by a broadcast and their shards of the optimizer state (and
    of a KL reference) from rank 0's full copies, so they need no shared filesystem."""
    dp = run.dp
    state = on_main(lambda: load_state(ckpt), dp) or {}
    info = broadcast_object(
        {**{k: v for k, v in state.items() if k != "optimizer"},
         "has_reference": (ckpt / "reference.pt").is_file()}
        if dp.is_main else None, dp)
    saved_dp = bool(info.get("data_parallel", False))
    if saved_dp != dp.enabled:  # raised on every rank alike
        raise ValueError(f"{ckpt} holds the optimizer state of a "
                         f"{'data-parallel' if saved_dp else 'one-rank'} trainer; resume it "
                         f"with ray.num_trainers {'> 1' if saved_dp else '= 1'}")
    load_optimizer_state(run.model, run.optimizer, state.get("optimizer", {}), dp)
    run.scheduler.load_state_dict(info["scheduler"])
    set_rng_state(info["rng"])
    run.step, run.elapsed_s = int(info["step"]), float(info["elapsed_s"])
    run.checkpointed = run.step
    if run.ref_model is not None and info["has_reference"]:
        ref = on_main(lambda: torch.load(ckpt / "reference.pt", map_location="cpu"), dp)
        load_full_state(run.ref_model, ref or {}, dp)
    if dp.is_main:
        run.stream.load_state(info["stream"])
        run.metrics.truncate_after(run.step)
        run.engine.policy_version = run.step
        log.info("resumed from %s (step %d)", ckpt, run.step)


def claim_run_dir(run_dir: Path, cfg: TrainConfig) -> None:
    """A new run may not write into another run's directory: its metrics would be appended
    to the old ones and its checkpoints replace theirs. With `overwrite` the old run's
    files are deleted first, unless the new run reads from them."""
    held = [p for p in (run_dir / METRICS_FILE, run_dir / CHECKPOINTS, run_dir / TB_DIR)
            if p.exists()]
    if not held:
        return
    if not cfg.overwrite:
        resumable = checkpoint_dirs(run_dir)
        raise ValueError(f"output_dir {run_dir} already holds a run "
                         f"({', '.join(p.name for p in held)}): "
                         + (f"continue it with --resume {run_dir}, " if resumable else
                            "it has no checkpoint to resume; ")
                         + "choose another output_dir, or pass overwrite=true to delete it "
                         "and start over")
    for value in (cfg.model.path, cfg.data.train, cfg.data.eval):
        if value and Path(value).exists() and any(
                Path(value).resolve().is_relative_to(p.resolve()) for p in held):
            raise ValueError(f"overwrite=true would delete {value}, which this run reads; "
                             "copy it out of the old run first")
    log.warning("overwrite=true: deleting the run in %s", run_dir)
    from brorl.trainer.plot import DEFAULT_FILE

    for p in [*held, run_dir / DEFAULT_FILE]:  # the old run's curves too, if plotted
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
