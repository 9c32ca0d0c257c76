"""Samples/s at N=16 and N=512 on a trained policy: the demo's warm-start policy on its own
task (reasoning-gym chain_sum), the same total number of samples at every N (N=16 uses 32x
the prompts), with sample merging on and off, in one run.

    python bench/large_n_trained.py                 # 8192 samples per row, 3 repeats
    python bench/large_n_trained.py --total 2048 --repeats 1

bench/throughput.py measures the issue's workload on a random model, whose samples part at
their first token. A trained policy is peaked: many of a prompt's samples share their first
tokens or are the same answer, and the more samples a prompt has, the larger the share that
repeats one another. The engine decodes each distinct context once
(`merge_identical_samples`), so large N costs less per sample, on top of prefilling 32x
fewer prompts. Rows alternate N and merging on each repeat and report the median; each run
starts from an empty prefix cache and unseen prompts. Writes
bench/results/large-n-trained-<device>.json (--device cuda runs the engine on a GPU).
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


def main() -> None:
    from bench.throughput import device_name
    from brorl.engine import Engine, SamplingParams
    from brorl.trainer.config_load import load_config
    from brorl.trainer.data import gym_problems, render_prompt
    from brorl.trainer.demo import demo_policy

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ns", type=int, nargs="+", default=[16, 512])
    ap.add_argument("--total", type=int, default=8192, help="samples per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default bench/results/large-n-trained-<device>.json)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here")
    name = f"large-n-trained-{device_name(args.device)}.json"
    out = args.out or ROOT / "bench" / "results" / name
    bad = [n for n in args.ns if n < 1 or args.total % n]
    if bad:
        ap.error(f"every N must divide --total={args.total}; these do not: {bad}")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cfg = load_config(None, [])  # the shipped demo: its policy, task and sampling
    path = demo_policy(cfg.demo)
    runs = [(n, merge) for _ in range(args.repeats) for n in args.ns for merge in (True, False)]
    needed = sum(args.total // n for n, _ in runs) + args.total // min(args.ns)
    problems = gym_problems("chain_sum", needed, 12345, cfg.data.gym_kwargs, "auto")
    engines = {m: Engine(path, device=args.device, dtype=args.dtype,
                         merge_identical_samples=m) for m in (True, False)}
    prompts = [render_prompt(p, engines[True].tokenizer) for p in problems]
    params = {n: SamplingParams(n=n, temperature=cfg.rollout.temperature,
                                max_tokens=cfg.rollout.max_tokens, seed=1) for n in args.ns}
    warm = prompts[:args.total // min(args.ns)]
    for engine in engines.values():  # warm-up: kernels, allocator, numba
        for n in args.ns:
            engine.generate(warm[:args.total // n], params[n])
    offset, results = len(warm), {}
    for n, merge in runs:
        engine = engines[merge]
        engine.cache.flush()
        batch = prompts[offset:offset + args.total // n]
        offset += len(batch)
        before = engine.stats()
        start = time.perf_counter()
        outs = engine.generate(batch, params[n])
        seconds = time.perf_counter() - start
        after = engine.stats()
        row = dict(seconds=seconds, samples_per_s=args.total / seconds,
                   tokens=sum(len(c.token_ids) for o in outs for c in o.outputs),
                   decode_tokens=after["decode_tokens"] - before["decode_tokens"],
                   decode_rows=after["decode_rows"] - before["decode_rows"],
                   prefill_tokens=after["prefill_tokens"] - before["prefill_tokens"])
        results.setdefault((n, merge), []).append(row)
        print(f"  N={n:4d} merge={'on ' if merge else 'off'} {row['samples_per_s']:8.0f} "
              f"samples/s, decode rows {row['decode_rows']}/{row['decode_tokens']}",
              flush=True)
    rows = []
    for (n, merge), rs in results.items():
        med = sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2]
        rows.append(dict(n=n, merge=merge, num_prompts=args.total // n,
                         samples_per_s=med["samples_per_s"],
                         all_samples_per_s=[r["samples_per_s"] for r in rs],
                         decode_rows_fraction=med["decode_rows"] / max(med["decode_tokens"], 1),
                         mean_response_tokens=med["tokens"] / args.total,
                         prefill_tokens=med["prefill_tokens"]))
    rate = {(r["n"], r["merge"]): r["samples_per_s"] for r in rows}
    lo, hi = min(args.ns), max(args.ns)
    ratios = {f"n{hi}_over_n{lo}_merged": rate[hi, True] / rate[lo, True],
              f"n{hi}_over_n{lo}_unmerged": rate[hi, False] / rate[lo, False]}
    for n in args.ns:
        ratios[f"merged_over_unmerged_n{n}"] = rate[n, True] / rate[n, False]
    print(f"\n{'samples/s':<12}" + "".join(f"{'N=' + str(n):>10}" for n in args.ns))
    for merge in (True, False):
        print(f"{'merged' if merge else 'unmerged':<12}"
              + "".join(f"{rate[n, merge]:10.0f}" for n in args.ns))
    for k, v in ratios.items():
        print(f"{k:32s} {v:.2f}x")
    result = dict(benchmark="large_n_trained", device=device_name(args.device),
                  cpu_count=os.cpu_count(),
                  torch_threads=torch.get_num_threads(),
                  versions={"python": platform.python_version(), "torch": torch.__version__},
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds"),
                  config=dict(policy=str(path), task="chain_sum",
                              gym_kwargs=cfg.data.gym_kwargs, total=args.total, ns=args.ns,
                              repeats=args.repeats, dtype=args.dtype,
                              temperature=cfg.rollout.temperature,
                              max_tokens=cfg.rollout.max_tokens),
                  rows=rows, ratios=ratios)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")



if __name__ == "__main__":
    main()
