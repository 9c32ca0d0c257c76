"""BroRL's token-level simulation of Theorem 1 (trainer/theory.py): does one RL step on a
128k-token categorical policy lose correct mass at small N and gain it at large N?

    python bench/token_sim.py                    # V = 131072, 10,000 correct, 64 trials
    python bench/token_sim.py --trials 16 --ns 1 4 512 --logit-std 2

Per trial a fresh policy: logits ~ N(0, s^2) for each s in --logit-std (1, 2, 4; at 2 a
head of a few hundred tokens holds most of the mass) and a random correct set. Each N
draws N samples per trial; the same samples drive four single steps: loss "reinforce"
(-sum over distinct sampled tokens of R p, whose SGD step is the theorem's update) or
"sample_mean" (-(1/N) sum over samples of R log p), optimizer SGD (lr 1) or AdamW (lr
1e-3, eps 1e-8, no weight decay: decay would also cool every logit). Two reward settings:
"fixed" R_c = 1, R_w = -1, and "baseline" 1{correct} minus the group's accuracy
(GRPO-style; an all-correct or all-wrong group gets no update).
Per row: mean actual dQ_pos, the share of trials with dQ_pos < 0, the mean share of correct
tokens whose probability rose (and the share of trials where all did), and the theorem's
mean terms per unit lr (sampled = the two non-negative ones). Writes
bench/results/token-sim-cpu.json. CPU only, float64; it measures no time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _print_table(reward: str, rows: list[dict]) -> None:
    print(f"\nreward {reward}: dQ = actual dQ_pos; fell = share of trials with dQ_pos < 0; "
          "gained = mean share of correct tokens that rose (all = trials where every one did)")
    print(f"{'N':>6} {'loss':11} {'opt':5} {'dQ mean':>10} {'fell':>5} {'gained':>6} "
          f"{'all':>5} | {'sampled':>9} {'unsampled':>10} {'pred fell':>9}")
    for r in rows:
        print(f"{r['n']:6d} {r['loss']:11} {r['optimizer']:5} {r['dq_mean']:+10.2e} "
              f"{r['dq_neg_frac']:5.2f} {r['gained_frac']:6.3f} {r['all_gained_frac']:5.2f} | "
              f"{r['sampled_pos'] + r['sampled_neg']:9.2e} {r['unsampled']:+10.2e} "
              f"{r['predicted_neg_frac']:9.2f}")


def main() -> None:
    from bench.throughput import versions
    from brorl.trainer.theory import REWARDS, SimConfig, simulate

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--correct", type=int, default=10000)
    ap.add_argument("--ns", type=int, nargs="+", default=[1, 4, 16, 64, 256, 512, 2048, 16384])
    ap.add_argument("--trials", type=int, default=64)
    ap.add_argument("--logit-std", type=float, nargs="+", default=[1.0, 2.0, 4.0],
                    help="initial logits' standard deviation(s); one table per value")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "token-sim-cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    rows, configs = [], {}
    for std in args.logit_std:
        for reward in REWARDS:
            cfg = SimConfig(vocab_size=args.vocab, num_correct=args.correct, ns=tuple(args.ns),
                            trials=args.trials, logit_std=std, reward=reward, seed=args.seed)
            start = time.perf_counter()
            part = [dict(reward=reward, logit_std=std, **r) for r in simulate(cfg)]
            _print_table(f"{reward}, logits ~ N(0, {std:g}^2)", part)
            print(f"({time.perf_counter() - start:.0f} s)", flush=True)
            rows += part
            configs[f"{reward}@{std:g}"] = dataclasses.asdict(cfg)
    result = dict(benchmark="token_sim", device="cpu", cpu_count=os.cpu_count(),
                  versions=versions(), date=datetime.datetime.now(datetime.timezone.utc)
                  .isoformat(timespec="seconds"), config=configs, rows=rows)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
