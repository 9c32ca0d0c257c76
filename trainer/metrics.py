"""A run's metrics: one JSON line per logged step in `run_dir/metrics.jsonl` (fsynced, so a
crash loses at most the line being written), mirrored to TensorBoard under `run_dir/tb/` when
the tensorboard package is installed. `truncate_after` lets a resumed run continue the file
without duplicate steps; `read_metrics` reads it back for summaries and plots."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
_RESERVED = ("step", "time")


class MetricsWriter:
    """Appends `{"step", "time", **metrics}` lines to `run_dir/metrics.jsonl`."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._use_tb = tensorboard
        # A crash mid-write leaves an unterminated line; appending after it would corrupt the
        # next line too, so drop it before opening for append.
        if _has_partial_tail(self.path):
            self._rewrite(keep=lambda row: True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = _tensorboard_writer(self.run_dir / TB_DIR) if tensorboard else None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Appends one line for `step`; nan/inf become null, tensor/numpy scalars Python numbers.

        Raises ValueError if `metrics` uses a reserved key ("step", "time"), TypeError if a
        value is not JSON-serialisable."""
        if self._file.closed:
            raise ValueError(f"MetricsWriter for {self.path} is closed")
        clash = [k for k in _RESERVED if k in metrics]
        if clash:
            raise ValueError(f"metrics may not use the reserved keys {clash}")
        row = {"step": int(step), "time": time.time()}
        row.update({k: _plain(v) for k, v in metrics.items()})
        try:
            line = json.dumps(row, allow_nan=False)
        except TypeError as e:
            raise TypeError(f"step {step}: metrics are not JSON-serialisable: {e}") from e
        self._file.write(line + "\n")  # one write, so a crash leaves a prefix of this line
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            _write_scalars(self._tb, row)

    def truncate_after(self, step: int) -> None:
        """Keeps only lines with `row["step"] <= step` (atomic rewrite); for resuming a run."""
        self._file.close()
        if self.path.exists():
            self._rewrite(keep=lambda row: row["step"] <= step)
        self._file = open(self.path, "a", encoding="utf-8")
        if self._tb is not None:
            # purge_step hides TensorBoard events past `step` written before the crash.
            self._tb.close()
            self._tb = _tensorboard_writer(self.run_dir / TB_DIR, purge_step=step + 1)

    def close(self) -> None:
        """Closes the jsonl file and the TensorBoard writer; idempotent."""
        self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _rewrite(self, keep) -> None:
        lines = [text for row, text in _parse_lines(self.path) if keep(row)]
        _atomic_write(self.path, "".join(text + "\n" for text in lines))


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of `run_dir/metrics.jsonl`, oldest first; a partial trailing line is skipped.

    Raises FileNotFoundError if the file is missing, ValueError on a corrupt complete line."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path} (is {run_dir} a run directory?)")
    return [row for row, _ in _parse_lines(path)]


def _parse_lines(path: Path) -> list[tuple[dict, str]]:
    """(row, line text) for each complete line; warns about and drops an unterminated tail."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline
    if tail:
        log.warning("%s: dropping a partial trailing line (%d chars; crash mid-write?)",
                    path, len(tail))
    out = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path}:{lineno}: not a metrics row (an object with an int step)")
        out.append((row, line))
    return out


def _has_partial_tail(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Makes a rename durable; not every platform can open a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _plain(value: Any) -> Any:
    """A JSON-ready value: tensor/numpy scalars via .item(), non-finite floats as None."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _tensorboard_writer(log_dir: Path, purge_step: int | None = None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed; metrics go to %s only", METRICS_FILE)
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def _write_scalars(tb, row: dict) -> None:
    step = row["step"]
    for key, value in row.items():
        if key in _RESERVED or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        tb.add_scalar(key, value, global_step=step)
    tb.flush()
