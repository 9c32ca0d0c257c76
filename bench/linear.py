"""Dense layers of one decode step: torch's F.linear (MKL) against oneDNN on prepacked
weights (kernels/linear.py), on the throughput bench model's shapes.

One "step" is every GEMM the engine runs in a decode step at batch `--batch`: per layer
qkv, o, gate_up and down, then the LM head. The two implementations alternate step by
step (`--repeats` pairs), so a noisy neighbour slows both alike; the table reports each
one's median step time, GFLOP/s (2 * batch * sum of weight sizes / time) and the ratio.
Then the whole engine on the throughput workload at N=128 (512 samples, prompt 256, 64
new tokens) with `linear_backend="torch"` and `"onednn"`, alternating run by run.

    python bench/linear.py                   # float32 and bfloat16, writes bench/results/
    python bench/linear.py --quick           # fewer repeats, writes nothing
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import (  # noqa: E402
    MODEL,
    engine_model_config,
    make_model,
    make_prompts,
    run_engine,
    versions,
)
from brorl.engine.models.weights import matrix_shapes  # noqa: E402
from brorl.kernels.linear import OneDNNLinear, TorchLinear, onednn_available  # noqa: E402


def step_weights(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Random [out, in] matrices of the shapes one decode step of the bench model multiplies
    by, in the engine's layout (brorl.engine.models.weights.matrix_shapes)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype)
            for s in matrix_shapes(engine_model_config()).values()]


def measure(dtype: torch.dtype, batch: int, repeats: int, seed: int) -> dict:
    weights = step_weights(dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    inputs = {k: torch.randn(batch, k, generator=g).to(dtype)
              for k in {w.shape[1] for w in weights}}
    impls = {"torch": TorchLinear(), "onednn": OneDNNLinear()}
    packed = {name: [impl.pack(w) for w in weights] for name, impl in impls.items()}

    def step(name: str) -> float:
        impl, start = impls[name], time.perf_counter()
        for w, p in zip(weights, packed[name]):
            impl(inputs[w.shape[1]], p)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in impls}
    with torch.inference_mode():
        for name in impls:  # warm-up
            step(name), step(name)
        for _ in range(repeats):
            for name in impls:
                times[name].append(step(name))
    flops = 2 * batch * sum(w.numel() for w in weights)
    out = {"dtype": str(dtype).removeprefix("torch."), "batch": batch, "flops_per_step": flops}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"median_ms": med * 1e3, "min_ms": min(ts) * 1e3,
                     "gflops": flops / med / 1e9}
    out["onednn_over_torch"] = out["torch"]["median_ms"] / out["onednn"]["median_ms"]
    return out


def engine_ab(repeats: int, seed: int, n: int = 128) -> dict:
    """samples/s of the engine with each linear backend on the throughput workload at N=n
    (bench/throughput.run_engine), runs alternating; each backend's median."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        make_model(tmp, seed)
        prompts = make_prompts(512 // n, 256, seed + n)
        times: dict[str, list[float]] = {"torch": [], "onednn": []}
        for _ in range(repeats):
            for b in times:
                times[b].append(run_engine(tmp, prompts, n, 64, True, seed,
                                           linear_backend=b)["seconds"])
    out = {"n": n, "samples": 512, **{f"{b}_samples_per_s": 512 / statistics.median(t)
                                       for b, t in times.items()},
           "all_seconds": times}
    out["onednn_over_torch"] = out["onednn_samples_per_s"] / out["torch_samples_per_s"]
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="5 repeats, writes nothing")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not onednn_available():
        sys.exit("this torch build has no working oneDNN: nothing to compare")
    repeats = 5 if args.quick else args.repeats
    rows = [measure(dt, args.batch, repeats, args.seed) for dt in (torch.float32,
                                                                    torch.bfloat16)]
    print(f"one decode step's GEMMs of the bench model at batch {args.batch}, "
          f"{torch.get_num_threads()} threads, median of {repeats} alternating runs")
    print(f"{'dtype':10s}{'torch ms':>10s}{'GFLOP/s':>9s}{'onednn ms':>11s}{'GFLOP/s':>9s}"
          f"{'ratio':>8s}")
    for r in rows:
        print(f"{r['dtype']:10s}{r['torch']['median_ms']:10.2f}{r['torch']['gflops']:9.0f}"
              f"{r['onednn']['median_ms']:11.2f}{r['onednn']['gflops']:9.0f}"
              f"{r['onednn_over_torch']:7.2f}x")
    engine = engine_ab(1 if args.quick else 8, args.seed)
    print(f"engine at N=128: torch {engine['torch_samples_per_s']:.1f} samples/s, onednn "
          f"{engine['onednn_samples_per_s']:.1f} ({engine['onednn_over_torch']:.2f}x)")
    out = args.out or (None if args.quick else str(ROOT / "bench" / "results" / "linear-cpu.json"))
    if out:
        result = dict(benchmark="linear", device="cpu", cpu=platform.processor() or
                      platform.machine(), cpu_count=os.cpu_count(),
                      torch_threads=torch.get_num_threads(), versions=versions(),
                      date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                          timespec="seconds"),
                      config=dict(model=MODEL, batch=args.batch, repeats=repeats,
                                  seed=args.seed), rows=rows, engine=engine)
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
