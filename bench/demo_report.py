"""What the demo's RL phase changed, problem by problem: the warm-start policy against a run's
last checkpoint on the run's held-out chain_sum problems, split by the number of terms, at
temperature 1 (k samples), at 0.6 with top-p 0.95 (the paper's protocol) and greedy. Besides
accuracy (the run's own verifier) it counts the responses that work the whole chain (one
clause per operation) and the accuracy of those, which tells a policy that learned to finish
the chain from one that got better at each operation.

    brorl train output_dir=runs/demo && python bench/demo_report.py runs/demo

Writes RUN_DIR/demo-report.json, or --out (the committed figures came from
--out bench/results/demo-report-cpu.json).
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

SETTINGS = {"T=1.0": (1.0, 1.0), "T=0.6, top-p 0.95": (0.6, 0.95), "greedy": (0.0, 1.0)}


def terms_of(problem) -> int:
    return len(problem.metadata["entry"]["metadata"]["expression"].split()) // 2 + 1


def score(engine, problems, cfg, pool, k: int) -> dict:
    """{setting: {terms: {samples, accuracy, full_chain, accuracy_given_full_chain}}}."""
    from brorl.trainer.demo import worked_operations
    from brorl.trainer.rollout import generate_groups

    out = {}
    for name, (temperature, top_p) in SETTINGS.items():
        n = 1 if temperature == 0 else k
        sampling = {**cfg.eval.sampling, "n": n, "temperature": temperature, "top_p": top_p}
        groups = generate_groups(engine, problems, cfg, [10**6 + i for i in range(len(problems))],
                                 pool, sampling)
        rows: dict[int, list[float]] = {}
        for g in groups:
            t = terms_of(g.problem)
            r = rows.setdefault(t, [0, 0.0, 0, 0.0])
            for ids, reward in zip(g.response_ids, g.rewards.tolist()):
                full = worked_operations(engine.tokenizer.decode(ids)) == t - 1
                r[0] += 1
                r[1] += reward
                r[2] += full
                r[3] += reward if full else 0.0
        out[name] = {str(t): {"samples": s, "accuracy": round(acc / s, 4),
                              "full_chain": round(full / s, 4),
                              "accuracy_given_full_chain": round(fa / full, 4) if full
                              else None}
                     for t, (s, acc, full, fa) in sorted(rows.items())}
        out[name]["all"] = {"accuracy": round(sum(r[1] for r in rows.values())
                                              / sum(r[0] for r in rows.values()), 4)}
    return out


def main() -> None:
    from brorl.engine import Engine
    from brorl.trainer.checkpoint import latest_checkpoint
    from brorl.trainer.config_load import load_config
    from brorl.trainer.data import load_problems
    from brorl.trainer.demo import demo_policy
    from brorl.trainer.verifiers import VerifierPool

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--k", type=int, default=32, help="samples per problem when sampling")
    ap.add_argument("--out", default=None,
                    help="JSON path (default: RUN_DIR/demo-report.json; the committed "
                         "figures are bench/results/demo-report-cpu.json)")
    args = ap.parse_args()
    cfg = load_config(Path(args.run_dir) / "config.yaml")
    if cfg.model.path != "demo" or cfg.data.train != "gym:chain_sum":
        sys.exit(f"{args.run_dir} is not a run of the chain_sum demo")
    _, held = load_problems(cfg.data)
    policies = {"warm start": demo_policy(cfg.demo, progress=False),
                "after RL": str(latest_checkpoint(args.run_dir))}
    result = dict(benchmark="demo_report", device="cpu", cpu_count=os.cpu_count(),
                  versions={"python": platform.python_version(), "torch": torch.__version__},
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds"),
                  run_dir=args.run_dir, policies=policies, held_out=len(held), k=args.k,
                  rows={})
    with VerifierPool(cfg.verifier.num_workers, cfg.verifier.timeout_s) as pool:
        for name, path in policies.items():
            engine = Engine(model=path, device="cpu", dtype="float32")
            result["rows"][name] = score(engine, held, cfg, pool, args.k)
            for setting, by_terms in result["rows"][name].items():
                print(f"{name:10s} {setting:18s} " + "  ".join(
                    f"{t} terms: acc {v['accuracy']:.3f}, full chain {v['full_chain']:.3f}"
                    if t != "all" else f"all: {v['accuracy']:.3f}" for t, v in by_terms.items()),
                    flush=True)
    out = Path(args.out) if args.out else Path(args.run_dir) / "demo-report.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
