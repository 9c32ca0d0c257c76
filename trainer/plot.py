"""Training curves of a run as a PNG, after the BroRL blog's Figure 1: held-out accuracy
(mean@k, pass@k, greedy), mean reward, the rollout pass rate (measured, predicted, and
predicted at N=16) and the next-token mass no sample tried at the samples' states (N
samples and 16) against training time."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from brorl.trainer.metrics import read_metrics

DEFAULT_FILE = "curves.png"


@dataclass(frozen=True)
class Series:
    key: str
    label: str
    style: str = "-"


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    series: tuple[Series, ...]


PANELS = (
    Panel("Held-out accuracy", "accuracy",
          (Series("eval/mean_at_k", "mean@k"), Series("eval/pass_at_k", "pass@k"),
           Series("eval/greedy", "greedy", "-."))),
    Panel("Mean reward", "reward", (Series("reward/mean", "reward/mean"),)),
    Panel("Rollout pass rate", "fraction of groups kept",
          (Series("rollout/pass_rate", "measured"),
           Series("rollout/predicted_pass_rate", "predicted", "--"),
           Series("rollout/predicted_pass_rate_n16", "predicted at N=16", ":"),
           Series("rollout/pass_rate_n16", "first 16 samples", "-."))),
    Panel("Unsampled next-token mass", "probability no sample tried",
          (Series("rollout/unsampled_mass", "all N samples"),
           Series("rollout/unsampled_mass_n16", "16 samples", ":"),
           Series("rollout/unsampled_mass_n16_states", "16 samples' states, N samples",
                  "--"))),
)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Writes the curves of `run_dir` to `out` (default `run_dir/curves.png`; a directory gets
    `curves.png` inside) and returns the written paths.

    Panels whose metrics never appear are left out. Raises FileNotFoundError without a
    metrics.jsonl, ValueError when no panel has data, RuntimeError without matplotlib."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    xs, unit = _time_axis(_seconds(rows))
    curves = [(p, c) for p in PANELS if (c := _curves(p, rows, xs))]
    if not curves:
        keys = ", ".join(s.key for p in PANELS for s in p.series)
        raise ValueError(f"{run_dir}: no usable metrics rows to plot (looked for {keys})")
    path = _out_path(run_dir, out)
    _draw(curves, path, title=run_dir.resolve().name, k=_eval_k(rows), unit=unit)
    return [path]


def _number(value) -> float | None:
    """A finite float, or None for missing, null, non-numeric and non-finite values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _seconds(rows: list[dict]) -> list[float | None]:
    """x of each row: `elapsed_s` (training time, carried across resumes) when the row has it,
    else wall time since the first row."""
    times = [t for r in rows if (t := _number(r.get("time"))) is not None]
    t0 = times[0] if times else None
    out = []
    for r in rows:
        seconds = _number(r.get("elapsed_s"))
        if seconds is None and t0 is not None and (t := _number(r.get("time"))) is not None:
            seconds = t - t0
        out.append(seconds)
    return out


def _time_axis(seconds: list[float | None]) -> tuple[list[float | None], str]:
    """The x values in the unit that suits the run's length: seconds up to 5 minutes,
    minutes up to 3 hours, hours beyond."""
    longest = max((t for t in seconds if t is not None), default=0.0)
    unit, scale = next((u, d) for u, d, limit in (("seconds", 1, 300), ("minutes", 60, 3 * 3600),
                                                 ("hours", 3600, math.inf)) if longest <= limit)
    return [None if t is None else t / scale for t in seconds], unit


def _curves(panel: Panel, rows: list[dict], times: list[float | None]):
    """(series, xs, ys) for each series of `panel` with at least one point."""
    found = []
    for s in panel.series:
        points = [(x, y) for x, r in zip(times, rows)
                  if x is not None and (y := _number(r.get(s.key))) is not None]
        if points:
            xs, ys = zip(*points)
            found.append((s, list(xs), list(ys)))
    return found


def _eval_k(rows: list[dict]) -> int | None:
    ks = [r["eval/k"] for r in rows if isinstance(r.get("eval/k"), int)]
    return ks[-1] if ks else None


def _out_path(run_dir: Path, out: str | Path | None) -> Path:
    path = run_dir / DEFAULT_FILE if out is None else Path(out)
    if path.is_dir():
        path = path / DEFAULT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _draw(curves, path: Path, title: str, k: int | None, unit: str) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib") from e
    # A bare Figure on the Agg canvas: no pyplot, so no global backend or figure state.
    fig = Figure(figsize=(4.6 * len(curves), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (panel, series) in zip(axes, curves):
        for s, xs, ys in series:
            label = s.label.replace("@k", f"@{k}") if k is not None else s.label
            marker = "o" if len(xs) < 30 else None  # sparse (eval) points stay visible
            ax.plot(xs, ys, s.style, marker=marker, markersize=3, label=label)
        ax.set_title(panel.title)
        ax.set_xlabel(f"training time ({unit})")
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
