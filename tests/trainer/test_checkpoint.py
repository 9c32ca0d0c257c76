"""Checkpoints (trainer/checkpoint.py): written aside and renamed into place, readable as
the run directory is, leftovers of a killed save removed, the newest `keep` kept."""

import os

from tests.helpers import make_checkpoint
from trainer.checkpoint import CHECKPOINTS, checkpoint_dirs, load_state, save_checkpoint


def test_saves_replace_atomically_clean_leftovers_and_keep_the_newest(tmp_path):
    model = make_checkpoint(tmp_path / "policy", "qwen2", seed=1)
    run = tmp_path / "run"
    root = run / CHECKPOINTS
    root.mkdir(parents=True)
    os.chmod(root, 0o755)
    stale = root / ".tmp-step-000001-killed"  # what a save killed midway leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    first = save_checkpoint(run, 1, model, None, {"note": "first"})
    assert not stale.exists()
    assert first.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    again = save_checkpoint(run, 1, model, None, {"note": "again"})  # the same step again
    assert again == first and load_state(again)["note"] == "again"
    assert sorted(p.name for p in root.iterdir()) == ["step-000001"]
    for step in (2, 3):
        save_checkpoint(run, step, model, None, {}, keep=2)
    assert [p.name for p in checkpoint_dirs(run)] == ["step-000002", "step-000003"]
    assert load_state(checkpoint_dirs(run)[-1])["step"] == 3
