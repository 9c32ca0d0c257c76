"""A run's per-step rollout figures from its metrics.jsonl, with the machine they came from:
the dynamic-sampling pass rate at N, the one predicted from each group's rewards at N and
at N=16, the one measured on each group's first 16 samples, the prefix-cache hit rate and
the step time; and the held-out evaluation before and after.

    brorl train output_dir=runs/demo && python bench/demo_metrics.py runs/demo \
        --out bench/results/demo-metrics-cpu.json

Prints a table; writes --out (default RUN_DIR/demo-metrics.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SERIES = ("rollout/pass_rate", "rollout/predicted_pass_rate",
          "rollout/predicted_pass_rate_n16", "rollout/pass_rate_n16",
          "rollout/prefix_cache_hit_rate", "rollout/groups_kept",
          "rollout/groups_generated", "step_seconds")
EVAL = ("eval/mean_at_k", "eval/pass_at_k", "eval/greedy")


def cpu_model() -> str:
    """The CPU's model name and the instruction sets that pick oneDNN's kernels."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                  if line.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx_ne_convert")
           if f in flags]
    return f"{name} ({', '.join(isa) or 'no AVX2'})"


def summarise(rows: list[dict]) -> dict:
    steps = [r for r in rows if "rollout/pass_rate" in r]
    out = {"steps": len(steps), "series": {}, "summary": {}}
    for key in SERIES:
        values = [r.get(key) for r in steps]
        out["series"][key] = values
        known = [v for v in values if v is not None]
        if known:
            out["summary"][key] = {"min": min(known), "max": max(known),
                                   "mean": sum(known) / len(known)}
    evals = [r for r in rows if "eval/mean_at_k" in r]
    if evals:
        out["eval_before"] = {k: evals[0].get(k) for k in EVAL}
        out["eval_after"] = {k: evals[-1].get(k) for k in EVAL}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    from brorl.trainer.metrics import read_metrics

    run = Path(a.run_dir)
    result = summarise(read_metrics(run))
    if not result["steps"]:
        sys.exit(f"{run}/metrics.jsonl has no rollout steps")
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    result = dict(benchmark="demo_metrics", device=f"cpu: {cpu_model()}",
                  cpu_count=os.cpu_count(), date=datetime.date.today().isoformat(),
                  commit=commit, run_dir=str(run),
                  versions={"python": platform.python_version(), "torch": torch.__version__},
                  **result)
    print(f"{'step':>4} " + " ".join(f"{k.split('/')[-1][:14]:>14}" for k in SERIES))
    for i in range(result["steps"]):
        cells = [result["series"][k][i] for k in SERIES]
        print(f"{i + 1:>4} " + " ".join(f"{'-':>14}" if v is None else f"{v:>14.3f}"
                                        for v in cells))
    for k, s in result["summary"].items():
        print(f"{k}: {s['min']:.3f}-{s['max']:.3f}, mean {s['mean']:.3f}")
    out = Path(a.out or run / "demo-metrics.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
