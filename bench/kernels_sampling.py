"""Fused sampling and fused token logprob against torch, on a GPU.

    python bench/kernels_sampling.py                    # GPU: table + bench/results/ JSON
    python bench/kernels_sampling.py --interpret-smoke  # CPU: tiny shapes, Triton interpreter

Sampling at batch 512 x vocab 151936 (bf16 logits): the fused Triton sampler
(kernels/sampling_triton.py) against a torch sort-based top-p sampler (softmax, sort,
cumsum mask, renormalise, exponential race, log-softmax for the logprob: the usual
implementation) and against `sample_ref`. The issue's target: fused >= 3x faster than the
sort-based sampler at top-p. Token logprob + entropy at a trainer shape (T=16384, H=1536,
V=151936, bf16): the fused forward against the trainer's chunked torch path
(`brorl.trainer.policy._chunk_stats` over 1024 positions at a time), forward and forward+backward.

Time: CUDA events, median of --iters runs after warm-up. Floors, from explicit formulas and
this GPU's measured copy bandwidth and bf16 matmul rate: sampling reads the logits once
(B*V*itemsize bytes); token logprob does 2*T*V*H FLOPs (forward; x3 with the backward)
and reads W and the hidden states once. frac_floor = floor time / measured time.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(fn, iters: int, cuda: bool) -> float:
    """Median milliseconds of fn() (CUDA events on a GPU, perf_counter otherwise)."""
    import torch

    fn()
    fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def sort_top_p_sampler(logits, temperature, top_p):
    """The torch baseline: sort-based top-p sampling plus the behaviour logprob."""
    import torch

    z = logits.float() / temperature[:, None]
    probs = torch.softmax(z, -1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    cum = sorted_p.cumsum(-1)
    sorted_p = sorted_p.masked_fill(cum - sorted_p > top_p[:, None], 0.0)
    sorted_p = sorted_p / sorted_p.sum(-1, keepdim=True)
    q = torch.empty_like(sorted_p).exponential_()
    pick = (sorted_p / q).argmax(-1)
    tokens = order.gather(1, pick[:, None])[:, 0]
    logprobs = z.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(z, -1)
    return tokens, logprobs


def device_peaks(cuda: bool) -> dict:
    """Measured copy bandwidth (bytes/s) and bf16 matmul rate (FLOP/s) of this device."""
    import torch

    if not cuda:
        return {"bandwidth": float("nan"), "matmul_flops": float("nan")}
    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    ms = timed(lambda: x.clone(), 10, True)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm = timed(lambda: a @ a, 10, True)
    return {"bandwidth": 2 * x.numel() * 4 / (ms * 1e-3),
            "matmul_flops": 2 * 8192 ** 3 / (mm * 1e-3)}


def bench_sampling(B: int, V: int, iters: int, dev: str, peaks: dict) -> list[dict]:
    import torch

    from brorl.kernels.sampling import row_keys, sample_ref
    from brorl.kernels.sampling_triton import sample_triton

    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, V, generator=gen) * 4).to(torch.bfloat16).to(dev)
    keys = row_keys([0] * B, [0] * B, list(range(B)), [0] * B)
    ones, cuda = torch.ones(B, device=dev), dev == "cuda"
    no_k, no_min = torch.full((B,), -1, device=dev), torch.zeros(B, device=dev)
    cases = {"plain T=1": (ones, no_k, ones), "top_p=0.9": (ones, no_k, ones * 0.9),
             "top_k=50+top_p=0.9": (ones, torch.full((B,), 50, device=dev), ones * 0.9)}
    floor_s = B * V * logits.element_size() / peaks["bandwidth"]
    rows = []
    for name, (temp, top_k, top_p) in cases.items():
        params = (temp, top_k, top_p, no_min)
        t_ref, _ = sample_ref(logits, *params, keys)
        t_tr, _ = sample_triton(logits, *params, keys)
        mismatch = int((t_ref != t_tr).sum())
        ms = {"fused": timed(lambda p=params: sample_triton(logits, *p, keys), iters, cuda),
              "sample_ref": timed(lambda p=params: sample_ref(logits, *p, keys), iters, cuda),
              "torch_sort_top_p": timed(lambda t=temp, p=top_p: sort_top_p_sampler(
                  logits, t, p), iters, cuda)}
        for impl, t in ms.items():
            rows.append({"bench": "sampling", "case": name, "impl": impl, "B": B, "V": V,
                         "ms": t, "GB_s": B * V * logits.element_size() / t / 1e6,
                         "frac_floor": floor_s * 1e3 / t, "token_mismatch_vs_ref": mismatch})
        rows.append({"bench": "sampling", "case": name, "impl": "speedup_vs_sort",
                     "x": ms["torch_sort_top_p"] / ms["fused"]})
    return rows


def bench_token_logprob(T: int, H: int, V: int, iters: int, dev: str, peaks: dict,
                        dtype) -> list[dict]:
    import torch

    from brorl.kernels.token_logprob import token_logprob_entropy
    from brorl.trainer.policy import _chunk_stats

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=gen).to(dtype).to(dev)
    weight = (torch.randn(V, H, generator=gen) * H ** -0.5).to(dtype).to(dev)
    targets = torch.randint(0, V, (T,), generator=gen).to(dev)
    cuda = dev == "cuda"

    def torch_path():
        return torch.cat([_chunk_stats(hidden[i:i + 1024], weight, None, targets[i:i + 1024],
                                       1.0) for i in range(0, T, 1024)], dim=1)

    def fused():
        return token_logprob_entropy(hidden, weight, targets, impl="triton")

    def backward(fn):
        def run():
            h = hidden.detach().requires_grad_()
            w = weight.detach().requires_grad_()
            lp, ent = fn(h, w)
            (lp.sum() + 0.01 * ent.sum()).backward()
        return run

    def torch_fb(h, w):
        from torch.utils.checkpoint import checkpoint
        stats = torch.cat([checkpoint(_chunk_stats, h[i:i + 1024], w, None,
                                      targets[i:i + 1024], 1.0, use_reentrant=False)
                           for i in range(0, T, 1024)], dim=1)
        return stats[0], stats[1]

    with torch.no_grad():
        want, got = torch_path(), torch.stack(fused())
    err = float((want - got).abs().max())
    flops = 2 * T * V * H
    bytes_ = (V * H + T * H) * hidden.element_size()
    rows = []
    for mode, mult, fns in (
            ("forward", 1, {"fused": lambda: torch.no_grad()(fused)(),
                            "torch_chunked": lambda: torch.no_grad()(torch_path)()}),
            ("forward+backward", 3, {
                "fused": backward(lambda h, w: token_logprob_entropy(h, w, targets,
                                                                     impl="triton")),
                "torch_chunked": backward(torch_fb)})):
        floor_s = max(mult * flops / peaks["matmul_flops"], bytes_ / peaks["bandwidth"])
        ms = {impl: timed(fn, iters, cuda) for impl, fn in fns.items()}
        for impl, t in ms.items():
            rows.append({"bench": "token_logprob", "case": mode, "impl": impl, "T": T, "H": H,
                         "V": V, "ms": t, "TFLOP_s": mult * flops / t / 1e9,
                         "GB_s": bytes_ / t / 1e6, "frac_floor": floor_s * 1e3 / t,
                         "max_abs_diff_vs_torch": err})
        rows.append({"bench": "token_logprob", "case": mode, "impl": "speedup_vs_torch",
                     "x": ms["torch_chunked"] / ms["fused"]})
    return rows


def print_table(rows: list[dict]) -> None:
    for r in rows:
        if "x" in r:
            print(f"{r['bench']:14s} {r['case']:20s} {r['impl']:18s} {r['x']:8.2f}x")
        else:
            extra = (f"{r['TFLOP_s']:7.1f} TFLOP/s  diff {r['max_abs_diff_vs_torch']:.1e}"
                     if "TFLOP_s" in r else f"mismatch vs ref {r['token_mismatch_vs_ref']}")
            print(f"{r['bench']:14s} {r['case']:20s} {r['impl']:18s} {r['ms']:9.3f} ms "
                  f"{r['GB_s']:9.1f} GB/s  floor {r['frac_floor']:6.1%} {extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--interpret-smoke", action="store_true",
                    help="tiny shapes on CPU under the Triton interpreter (no JSON)")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    cuda = torch.cuda.is_available() and not args.interpret_smoke
    if not cuda and not args.interpret_smoke:
        print("kernels_sampling: no CUDA GPU here; nothing measured (run on a GPU, or pass "
              "--interpret-smoke for a tiny interpreter run)")
        return
    import triton

    dev = "cuda" if cuda else "cpu"
    peaks = device_peaks(cuda)
    if cuda:
        rows = bench_sampling(512, 151936, args.iters, dev, peaks)
        rows += bench_token_logprob(16384, 1536, 151936, max(3, args.iters // 4), dev, peaks,
                                    torch.bfloat16)
    else:
        rows = bench_sampling(4, 300, 2, dev, peaks)
        rows += bench_token_logprob(20, 32, 100, 2, dev, peaks, torch.float32)
    print_table(rows)
    if not cuda:
        print("interpret smoke run: timings are the CPU interpreter's; no JSON written")
        return
    name = torch.cuda.get_device_name().replace(" ", "-").lower()
    out = ROOT / "bench" / "results" / f"kernels-sampling-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "peak_copy_bandwidth_GB_s": peaks["bandwidth"] / 1e9,
        "peak_bf16_matmul_TFLOP_s": peaks["matmul_flops"] / 1e12, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
