"""Does an RL step on some prompts help on others? The demo's loop trained on one fixed set
of prompts, scoring after every step both those prompts and the held-out set, at
temperature 1 (mean of 256 / 32 samples) and greedy.

    python bench/rl_transfer.py                                # the shipped demo config
    python bench/rl_transfer.py --out bench/results/rl-transfer-cpu-full-warm-start.json \
        demo.sft_cut_short=0 demo.sft_steps=500 \
        "demo.task_kwargs={min_terms: 2, max_terms: 3, min_digits: 1, max_digits: 2}" \
        "data.gym_kwargs={min_terms: 2, max_terms: 3, min_digits: 1, max_digits: 2}"
        # a warm start that always works the whole chain, on two-digit numbers

Writes bench/results/rl-transfer-cpu.json, or --out (device, versions, date, per-step rows). The
trainer is the real one (`brorl.trainer.loop.train_step`); only the data stream is replaced by
the same `rollout.prompts_per_step` prompts every step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class _FixedPrompts:
    """A ProblemStream that hands out the same problems every step."""

    def __init__(self, problems: list) -> None:
        self.problems = problems

    def take(self, k: int) -> list:
        return self.problems[:k]

    def state(self) -> dict:
        return {}


def _mean_reward(run, problems, n: int, temperature: float, seed: int) -> float:
    from brorl.trainer.rollout import generate_groups

    cfg = run.cfg
    sampling = {**cfg.rollout.sampling, "n": n, "temperature": temperature, "top_p": 1.0,
                "top_k": -1}
    groups = generate_groups(run.engine, problems, cfg, [seed + i for i in range(len(problems))],
                             run.pool, sampling)
    return round(float(torch.stack([g.rewards for g in groups]).mean()), 4)


def score(run, trained: list) -> dict:
    held = run.held_out
    return {"trained_t1": _mean_reward(run, trained, 256, 1.0, 10**6),
            "trained_greedy": _mean_reward(run, trained, 1, 0.0, 0),
            "held_out_t1": _mean_reward(run, held, 32, 1.0, 7 * 10**6),
            "held_out_greedy": _mean_reward(run, held, 1, 0.0, 0)}


def main() -> None:
    from brorl.trainer import loop
    from brorl.trainer.config_load import load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" /
                    "rl-transfer-cpu.json")
    args, overrides = ap.parse_known_args()  # the rest: config overrides (key=value)
    out = args.out
    out_dir = "/tmp/brorl-rl-transfer"
    cfg = load_config(None, [f"output_dir={out_dir}", "overwrite=true", "progress=false",
                             "eval.every=0", "checkpoint_every=1000",
                             "rollout.dynamic_sampling=false", "steps=8", *overrides])
    run = loop.setup(cfg, None)
    trained = run.stream.take(cfg.rollout.prompts_per_step)
    run.stream = _FixedPrompts(trained)
    rows = [{"step": 0, **score(run, trained)}]
    print(rows[-1], flush=True)
    try:
        for _ in range(cfg.steps):
            m = loop.train_step(run)
            rows.append({"step": run.step, "train_reward": round(m["reward/mean"], 4),
                         "entropy": round(m.get("train/entropy", 0.0), 4),
                         **score(run, trained)})
            print(rows[-1], flush=True)
    finally:
        run.pool.close()
        run.metrics.close()
    result = dict(benchmark="rl_transfer", device="cpu", cpu_count=os.cpu_count(),
                  versions={"python": platform.python_version(), "torch": torch.__version__},
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds"),
                  config=dict(overrides=overrides, prompts=len(trained),
                              held_out=len(run.held_out), n=cfg.rollout.n, steps=cfg.steps),
                  rows=rows)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
