"""Atomic checkpoints in a run directory: `checkpoints/step-000005/` holds the policy as a
Hugging Face checkpoint (config.json, model.safetensors, tokenizer files), so any tool and
our engine load it directly, plus `trainer_state.pt` (optimizer, LR schedule, data stream,
RNG, step, elapsed time) for an exact `--resume`."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
CHECKPOINTS = "checkpoints"  # under the run directory
RUN_CONFIG = "config.yaml"  # the run's config, beside it
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def save_checkpoint(run_dir: str | Path, step: int, model, tokenizer, state: dict,
                    ref_model=None, keep: int = 2, model_state: dict | None = None,
                    ref_state: dict | None = None) -> Path:
    """Writes into a temporary directory and renames it into place, so a crash never
    leaves a half-written checkpoint that resume would pick up. Keeps the newest `keep`.
    `model_state` / `ref_state`: full parameters gathered from a sharded policy and
    reference (trainer/parallel.py), written instead of the modules' own."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):  # a save killed midway: a whole model each
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:06d}-", dir=root))
    # mkdtemp's 0700 would survive the rename: readable as the run directory is instead
    os.chmod(tmp, root.stat().st_mode & 0o777)
    try:
        model.save_pretrained(tmp, state_dict=model_state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if ref_state is not None or ref_model is not None:
            torch.save(ref_state if ref_state is not None else ref_model.state_dict(),
                       tmp / "reference.pt")
        torch.save({**state, "step": step}, tmp / STATE_FILE)
        _fsync_tree(tmp)  # on disk before the rename, and before older ones are pruned
        if final.exists():  # aside first, so a kill never leaves this step with none
            aside = tmp.with_name(tmp.name + "-old")
            os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(root)  # the rename itself
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Every file under root and root itself flushed to disk: after a power loss or a
    kernel crash (not only a killed process) the newest checkpoint is whole."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            _fsync(path)
    _fsync(root)


def load_state(ckpt: Path) -> dict:
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest complete checkpoint of a run; an error naming the run dir if none."""
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"--resume: run directory not found: {run_dir}")
    found = checkpoint_dirs(run_dir)
    if not found:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {run_dir}/checkpoints")
    return found[-1]


def rng_state() -> dict:
    import random

    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    import random

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
