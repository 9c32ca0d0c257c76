"""What merging identical samples saves in the demo's RL steps: the shipped demo config
(its warm-start policy, N=512, 16 kept groups per step), run for a few steps with the
engine's and the trainer's merging on and then off, from the same start, in one run.

    python bench/merge.py              # 4 steps each way
    python bench/merge.py --steps 2

At large N a peaked policy repeats itself: many of a prompt's 512 samples share their
first tokens or are the same sequence. The engine decodes each distinct context once
(`merge_identical_samples`), the trainer computes each distinct sample of a mini-batch
once, weighted by its count (`optim.merge_identical_samples`). Both give the same tokens,
logprobs, loss and gradient; this measures the time. Writes bench/results/merge-cpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_steps(merge: bool, steps: int, overrides: list[str]) -> dict:
    from brorl.trainer import loop
    from brorl.trainer.config_load import load_config

    out_dir = f"/tmp/brorl-bench-merge-{'on' if merge else 'off'}"
    cfg = load_config(None, [f"output_dir={out_dir}", "overwrite=true", "progress=false",
                             "eval.every=0", "checkpoint_every=1000", f"steps={steps}",
                             f"rollout.merge_identical_samples={merge}",
                             f"optim.merge_identical_samples={merge}", *overrides])
    run = loop.setup(cfg, None)
    rows = []
    try:
        for _ in range(steps):
            before = run.engine.stats()
            t0 = time.perf_counter()
            m = loop.train_step(run)
            seconds = time.perf_counter() - t0
            after = run.engine.stats()
            rollout = m["rollout/seconds"]
            rows.append({
                "step": run.step,
                "step_seconds": round(seconds, 3),
                "rollout_seconds": round(rollout, 3),
                "update_seconds": round(seconds - rollout - m.get("weight_sync/seconds", 0.0),
                                        3),
                "decode_tokens": after["decode_tokens"] - before["decode_tokens"],
                "decode_rows": after["decode_rows"] - before["decode_rows"],
                "train_samples": m["train/samples"],
                "train_distinct_samples": m["train/distinct_samples"],
                "reward_mean": round(m["reward/mean"], 4),
                "loss": m["train/loss"],
            })
            print({"merge": merge, **rows[-1]}, flush=True)
    finally:
        run.pool.close()
        run.metrics.close()
    return {"rows": rows, "n": cfg.rollout.n, "prompts_per_step": cfg.rollout.prompts_per_step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "merge-cpu.json")
    args, overrides = ap.parse_known_args()  # the rest: config overrides (key=value)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    on = run_steps(True, args.steps, overrides)
    off = run_steps(False, args.steps, overrides)

    def total(r, k):
        return sum(row[k] for row in r["rows"])

    summary = {
        "step_speedup": total(off, "step_seconds") / total(on, "step_seconds"),
        "rollout_speedup": total(off, "rollout_seconds") / total(on, "rollout_seconds"),
        "update_speedup": total(off, "update_seconds") / total(on, "update_seconds"),
        "decode_rows_fraction": total(on, "decode_rows") / total(on, "decode_tokens"),
        "train_distinct_fraction": (total(on, "train_distinct_samples")
                                    / total(on, "train_samples")),
        "first_step_loss": {"merged": on["rows"][0]["loss"], "plain": off["rows"][0]["loss"]},
    }
    print(f"{'':>9} {'step s':>8} {'rollout s':>10} {'update s':>9}")
    for name, r in (("merged", on), ("plain", off)):
        print(f"{name:>9} {total(r, 'step_seconds'):8.1f} {total(r, 'rollout_seconds'):10.1f} "
              f"{total(r, 'update_seconds'):9.1f}")
    print(f"speed-up: step {summary['step_speedup']:.2f}x, rollout "
          f"{summary['rollout_speedup']:.2f}x, update {summary['update_speedup']:.2f}x; "
          f"decode rows {summary['decode_rows_fraction']:.3f} of tokens, trained sequences "
          f"{summary['train_distinct_fraction']:.3f} of samples")
    result = dict(benchmark="merge_identical_samples", device="cpu", cpu_count=os.cpu_count(),
                  torch_threads=torch.get_num_threads(),
                  versions={"python": platform.python_version(), "torch": torch.__version__},
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds"),
                  config=dict(overrides=overrides, steps=args.steps, n=on["n"],
                              prompts_per_step=on["prompts_per_step"]),
                  merged=on["rows"], plain=off["rows"], summary=summary)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
