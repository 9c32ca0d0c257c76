"""Engine() start-up on CPU with the default KV pool (kv_memory_fraction of free memory):
the pool from calloc'd memory, mapped as pages are first used (engine/kv_pool.py), against
the same pool cleared up front with torch.zeros. Each start runs in a fresh process, the
two alternating, and reports the seconds Engine() took and the process's resident memory
after it.

    python bench/engine_startup.py [CHECKPOINT]   # default: the demo policy (built if
                                                   # missing); writes bench/results/
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import versions  # noqa: E402

CHILD = """
import json, sys, time, torch
torch.set_num_threads(2)
from brorl.engine import kv_pool
if sys.argv[2] == "eager":
    kv_pool._zeros = lambda shape, dtype, device: torch.zeros(shape, dtype=dtype, device=device)
from brorl.engine import Engine
t = time.perf_counter()
e = Engine(sys.argv[1])
seconds = time.perf_counter() - t
with open("/proc/self/statm") as f:
    resident = int(f.read().split()[1]) * 4096
print(json.dumps({"seconds": seconds, "resident_bytes": resident,
                  "pool_bytes": e.kv.k.nbytes + e.kv.v.nbytes}))
"""


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", nargs="?", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" /
                    "engine-startup-cpu.json")
    args = ap.parse_args(argv)
    path = args.checkpoint
    if path is None:
        from brorl.trainer.config import DemoConfig
        from brorl.trainer.demo import demo_policy

        path = demo_policy(DemoConfig(), progress=False)
    runs: dict[str, list[dict]] = {"lazy": [], "eager": []}
    for _ in range(args.repeats):
        for mode in runs:
            out = subprocess.run([sys.executable, "-c", CHILD, path, mode], check=True,
                                 capture_output=True, text=True, cwd=ROOT)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = {mode: {"seconds_median": statistics.median(r["seconds"] for r in rs),
                   "resident_gb_median": statistics.median(r["resident_bytes"]
                                                           for r in rs) / 1e9,
                   "pool_gb": rs[0]["pool_bytes"] / 1e9, "runs": rs}
            for mode, rs in runs.items()}
    print(f"{'pool':>6} | {'Engine() s':>10} | {'resident GB':>11} | {'pool GB':>7}")
    for mode, r in rows.items():
        print(f"{mode:>6} | {r['seconds_median']:10.2f} | {r['resident_gb_median']:11.2f} | "
              f"{r['pool_gb']:7.1f}")
    result = {"benchmark": "engine_startup", "device": "cpu", "cpu_count": os.cpu_count(),
              "versions": versions(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"),
              "config": {"checkpoint": str(path), "repeats": args.repeats,
                         "kv_memory_fraction": 0.3},
              "rows": rows,
              "ratios": {"eager_over_lazy_seconds": rows["eager"]["seconds_median"]
                         / rows["lazy"]["seconds_median"]}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
