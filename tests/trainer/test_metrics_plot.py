"""metrics.jsonl writing, truncation on resume, crash-tolerant reading, and PNG curves."""

import json
import math
import re
import struct

import pytest
import torch

from brorl.trainer import metrics
from brorl.trainer.metrics import METRICS_FILE, MetricsWriter, read_metrics
from brorl.trainer.plot import plot_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _steps(run_dir):
    return [r["step"] for r in read_metrics(run_dir)]


def test_log_round_trips_values_with_nan_as_null_and_tensor_scalars_as_numbers(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.log(1, {"loss": 0.5, "count": 3})
        w.log(2, {"loss": float("nan"), "grad": float("inf"), "reward": torch.tensor(0.25),
                  "kept": torch.tensor(7), "missing": None})
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # strict JSON: no NaN/Infinity tokens
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == 0.5 and rows[0]["count"] == 3
    assert rows[1]["loss"] is None and rows[1]["grad"] is None and rows[1]["missing"] is None
    assert rows[1]["reward"] == 0.25 and type(rows[1]["reward"]) is float
    assert rows[1]["kept"] == 7 and type(rows[1]["kept"]) is int
    assert all(isinstance(r["time"], float) and r["time"] > 0 for r in rows)


def test_log_rejects_reserved_keys(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w, pytest.raises(ValueError, match="step"):
        w.log(1, {"step": 2})


def test_truncate_after_keeps_steps_up_to_k_and_logging_continues(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in range(1, 6):
            w.log(step, {"x": step})
    with MetricsWriter(tmp_path, tensorboard=False) as w:  # a resumed run
        w.truncate_after(3)
        assert _steps(tmp_path) == [1, 2, 3]
        w.log(4, {"x": 40})
    assert _steps(tmp_path) == [1, 2, 3, 4]
    assert read_metrics(tmp_path)[-1]["x"] == 40


class _FakeSummaryWriter:
    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars = log_dir, purge_step, []

    def add_scalar(self, key, value, global_step):
        self.scalars.append((key, value, global_step))

    def flush(self):
        pass

    def close(self):
        pass


def test_tensorboard_gets_numeric_scalars_and_purges_after_truncation(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(metrics, "_tensorboard_writer",
                        lambda log_dir, purge_step=None: made.append(
                            _FakeSummaryWriter(log_dir, purge_step)) or made[-1])
    with MetricsWriter(tmp_path) as w:
        w.log(5, {"loss": 0.5, "nan": math.nan, "name": "x", "flag": True, "n": 2})
        w.truncate_after(3)
    assert made[0].log_dir == tmp_path / "tb"
    assert made[0].scalars == [("loss", 0.5, 5), ("n", 2, 5)]
    assert made[1].purge_step == 4


def test_partial_trailing_line_is_skipped_and_dropped_before_appending(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.log(1, {"x": 1})
        w.log(2, {"x": 2})
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 3, "x": ')  # a crash mid-write
    assert _steps(tmp_path) == [1, 2]
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.truncate_after(2)
        w.log(3, {"x": 3})
    assert _steps(tmp_path) == [1, 2, 3]
    # Opening for append alone also repairs the tail, so the next line stays valid.
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write("garbage")
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.log(4, {"x": 4})
    assert _steps(tmp_path) == [1, 2, 3, 4]


def test_read_metrics_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=METRICS_FILE):
        read_metrics(tmp_path / "nope")


def test_read_metrics_rejects_a_corrupt_complete_line(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r":2:"):
        read_metrics(tmp_path)


def _fake_run(run_dir, steps=12, eval_every=4):
    """Rows like the trainer's: eval keys only every few steps, an eval-only row at step 0."""
    with MetricsWriter(run_dir, tensorboard=False) as w:
        w.log(0, {"elapsed_s": 0.0, "eval/mean_at_k": 0.1, "eval/pass_at_k": 0.3, "eval/k": 4})
        for step in range(1, steps + 1):
            row = {"elapsed_s": 600.0 * step, "reward/mean": 0.1 + 0.02 * step,
                   "rollout/pass_rate": 0.5, "rollout/predicted_pass_rate": 0.55,
                   "reward/kept_mean": None, "rollout/unsampled_mass": 0.01,
                   "rollout/unsampled_mass_n16": 0.05}
            if step % eval_every == 0:
                row.update({"eval/mean_at_k": 0.1 + 0.01 * step, "eval/pass_at_k": math.nan})
            w.log(step, row)


def test_plot_run_writes_a_png_with_sparse_eval_rows(tmp_path):
    _fake_run(tmp_path)
    paths = plot_run(tmp_path)
    assert paths == [tmp_path / "curves.png"]
    data = paths[0].read_bytes()
    width, height = _png_size(data)
    assert width > 4.5 * height > 0  # four panels side by side (three: 3.8)


def test_plot_run_draws_a_panel_per_section_with_data(tmp_path, monkeypatch):
    import brorl.trainer.plot

    drawn = []
    monkeypatch.setattr(brorl.trainer.plot, "_draw", lambda curves, *a, **k: drawn.append(
        [(p.title, [s.key for s, _, _ in c]) for p, c in curves]))
    _fake_run(tmp_path)
    plot_run(tmp_path)
    assert drawn[0][3] == ("Unsampled next-token mass",
                           ["rollout/unsampled_mass", "rollout/unsampled_mass_n16"])
    assert [t for t, _ in drawn[0]] == [p.title for p in brorl.trainer.plot.PANELS]


def test_plot_run_skips_missing_panels_and_honours_out(tmp_path):
    with MetricsWriter(tmp_path / "run", tensorboard=False) as w:
        for step in range(1, 4):  # no elapsed_s: x falls back to time since the first row
            w.log(step, {"reward/mean": 0.1 * step})
    out = tmp_path / "plots" / "reward.png"
    assert plot_run(tmp_path / "run", str(out)) == [out]
    width, height = _png_size(out.read_bytes())
    assert width > 0 and height > 0


def test_plot_run_without_usable_rows_raises_naming_the_run_dir(tmp_path):
    (tmp_path / METRICS_FILE).write_text("")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        plot_run(tmp_path)
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.log(1, {"other": 1.0, "reward/mean": math.nan})
    with pytest.raises(ValueError, match="no usable"):
        plot_run(tmp_path)


def test_the_time_axis_unit_follows_the_run_length():
    from brorl.trainer.plot import _time_axis

    assert _time_axis([None, 0.0, 42.0]) == ([None, 0.0, 42.0], "seconds")
    assert _time_axis([0.0, 600.0]) == ([0.0, 10.0], "minutes")
    assert _time_axis([0.0, 7200.0, 5 * 3600.0]) == ([0.0, 2.0, 5.0], "hours")
    assert _time_axis([None]) == ([None], "seconds")
