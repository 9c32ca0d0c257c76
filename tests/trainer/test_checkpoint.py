"""Checkpoints (trainer/checkpoint.py): written aside and renamed into place, readable as
the run directory is, leftovers of a killed save removed, the newest `keep` kept."""

import os
from pathlib import Path

import pytest

from brorl.trainer.checkpoint import CHECKPOINTS, checkpoint_dirs, load_state, save_checkpoint
from tests.helpers import make_checkpoint


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


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fds through /proc")
def test_a_checkpoint_is_flushed_to_disk_before_older_ones_are_pruned(tmp_path, monkeypatch):
    """Each file, its directory and the checkpoints directory (the rename) are fsynced
    before the older checkpoints are deleted: a power loss cannot leave only an empty one."""
    from brorl.trainer import checkpoint

    model = make_checkpoint(tmp_path / "policy", "qwen2", seed=1)
    run = tmp_path / "run"
    save_checkpoint(run, 1, model, None, {}, keep=1)
    synced, real = [], os.fsync
    monkeypatch.setattr(checkpoint.os, "fsync",
                        lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                    real(fd)))
    pruned = []
    monkeypatch.setattr(checkpoint.shutil, "rmtree",
                        lambda p, **kw: pruned.append((str(p), len(synced))))
    final = save_checkpoint(run, 2, model, None, {}, keep=1)
    files = {p.name for p in final.rglob("*") if p.is_file()}
    assert files and files <= {Path(s).name for s in synced}  # each, in the temporary dir
    assert str(run / CHECKPOINTS) in synced
    assert pruned and pruned[-1][0].endswith("step-000001") and pruned[-1][1] == len(synced)
