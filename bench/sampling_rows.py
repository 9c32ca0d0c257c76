"""The sampler of merged decode steps: B samples drawing from R distinct rows of logits.
`sample_rows_ref` (each row's truncation and cumulative sums once, a binary search per
sample) against expanding the rows to B and running the per-sample sampler (`sample`,
numba on CPU), at vocab 151936 and batch 512, for several R. The engine picks the first
when R * 16 <= B (`brorl.engine.merging.SHARED_ROW_SAMPLING`).

    python bench/sampling_rows.py            # CPU; bench/results/sampling-rows-cpu.json
    python bench/sampling_rows.py --device cuda

Time: median of --iters runs after a warm-up (`timed` of bench/kernels_sampling.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    from bench.kernels_sampling import timed
    from bench.throughput import device_name
    from brorl.kernels.sampling import row_keys, sample, sample_rows_ref

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32, 64, 128])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    B, V, dev, cuda = args.batch, args.vocab, args.device, args.device == "cuda"
    keys = row_keys([0] * B, [0] * B, list(range(B)), [0] * B)
    results = []
    for R in args.rows:
        g = torch.Generator().manual_seed(R)
        logits = (torch.randn(R, V, generator=g) * 2).to(dev)
        rows = (torch.arange(B) % R).to(dev)

        run_shared = partial(sample_rows_ref, logits, rows, *_params(R, dev), keys)
        run_expanded = partial(_expanded, sample, logits, rows, _params(B, dev), keys)
        assert torch.equal(run_shared()[0], run_expanded()[0]), "the samplers drew differently"
        t_shared = timed(run_shared, args.iters, cuda)
        t_expand = timed(run_expanded, args.iters, cuda)
        results.append(dict(rows=R, batch=B, vocab=V, shared_ms=t_shared, expanded_ms=t_expand,
                            expanded_over_shared=t_expand / t_shared))
        print(f"R={R:4d}: shared rows {t_shared:8.2f} ms, expanded {t_expand:8.2f} ms "
              f"({t_expand / t_shared:.2f}x)", flush=True)
    out = args.out or ROOT / "bench" / "results" / f"sampling-rows-{device_name(dev)}.json"
    out.write_text(json.dumps(dict(
        benchmark="sampling_rows", device=device_name(dev), cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        versions={"python": platform.python_version(), "torch": torch.__version__},
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        config=dict(iters=args.iters, temperature=1.0), rows=results), indent=1) + "\n")
    print(f"wrote {out}")


def _params(n: int, dev: str) -> tuple:
    """temperature 1, no top-k, top-p or min-p, for n rows"""
    return (torch.ones(n, device=dev), torch.full((n,), -1, device=dev),
            torch.ones(n, device=dev), torch.zeros(n, device=dev))


def _expanded(sample, logits, rows, params, keys):
    """What the engine does above the threshold: the rows repeated per sample, then the
    per-sample sampler."""
    return sample(logits[rows], *params, keys)


if __name__ == "__main__":
    main()
