"""Kernel benchmark at Qwen2-1.5B shapes (12 query heads, 2 KV heads, head dim 128, bf16,
page size 16): Triton cascade vs paged decode (and their torch references), extend
attention, RMSNorm and RoPE. Each row reports the median time (CUDA events, L2 flushed
before each repeat), bytes and FLOPs from explicit formulas, achieved GB/s and TFLOP/s, and
the fraction of the floor max(bytes / copy bandwidth, FLOPs / bf16 matmul peak), both
measured in the same run. Writes bench/results/kernels-<device>.json.

    python bench/kernels_triton.py                    # needs a CUDA GPU
    python bench/kernels_triton.py --interpret-smoke  # tiny shapes under the Triton interpreter

Other kernel families add rows by appending a function `(ctx: BenchContext) -> list[dict]`
(each dict from `ctx.measure(...)`) to `SECTIONS`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

# KV bytes of one decode step, per layer (RESEARCH.md):
#   unshared N (P + t) * 2 * h_kv * d * s,  shared (P + N t) * 2 * h_kv * d * s,
#   plus the queries (N h_q d s) and the float32 outputs (N h_q d 4); FLOPs 4 N h_q d (P + t).
FORMULAS = {
    "paged_bytes": "N*(P+t)*2*h_kv*d*s + N*h_q*d*(s+4)",
    "cascade_bytes": "(P+N*t)*2*h_kv*d*s + N*h_q*d*(s+4)",
    "decode_flops": "4*N*h_q*d*(P+t)",
    "extend_bytes": "sum(c+t)*2*h_kv*d*s + 2*sum(t)*h_q*d*s",
    "extend_flops": "4*h_q*d*sum(t*c + t*(t+1)/2)",
    "norm_bytes": "rows*hidden*s*(2 or 4 with the residual) + hidden*s",
    "rope_bytes": "2*T*heads*d*s + 2*T*d*s",
}


@dataclass
class Shapes:
    h_q: int = 12
    h_kv: int = 2
    d: int = 128
    page: int = 16
    dtype: torch.dtype = torch.bfloat16
    decode: list[tuple[int, int, int]] = field(default_factory=lambda: [
        (n, p, 256) for p in (1024, 4096) for n in (16, 128, 512)])  # (N, prefix, suffix)
    extend: list[tuple[int, int]] = field(default_factory=lambda: [
        (0, 1024)] * 4 + [(4096, 512)])  # (prefix, new tokens) per sequence
    norm_rows: list[int] = field(default_factory=lambda: [512, 8192])
    hidden: int = 1536


SMOKE = Shapes(h_q=4, h_kv=2, d=16, page=4, dtype=torch.float16, decode=[(2, 8, 4)],
               extend=[(0, 5), (6, 3)], norm_rows=[4], hidden=32)


class BenchContext:
    """Timing, the measured floors, and the row format."""

    def __init__(self, shapes: Shapes, device: str, smoke: bool, reps: int = 20,
                 warmup: int = 3) -> None:
        self.shapes, self.device, self.smoke = shapes, device, smoke
        self.reps, self.warmup = (1, 1) if smoke else (reps, warmup)
        self.s = torch.finfo(shapes.dtype).bits // 8
        self.flush_buf = None if smoke else torch.empty(256 << 20, dtype=torch.int8,
                                                        device=device)
        self.bandwidth = self.peak = None  # bytes/s, FLOP/s

    def time_ms(self, fn: Callable[[], object], flush: bool = True) -> float:
        """Median wall time of fn in ms (CUDA events; perf_counter in smoke mode)."""
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            if self.smoke:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
                continue
            if flush:
                self.flush_buf.zero_()  # evict the operands from L2
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def measure_floors(self) -> None:
        """Copy bandwidth (1 GiB device copy) and bf16 matmul peak (8192^3)."""
        if self.smoke:
            return
        src = torch.empty(1 << 30, dtype=torch.int8, device=self.device)
        dst = torch.empty_like(src)
        self.bandwidth = 2 * src.numel() / (self.time_ms(partial(dst.copy_, src), False) / 1e3)
        del src, dst
        n = 8192
        a = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        self.peak = 2 * n ** 3 / (self.time_ms(partial(torch.matmul, a, b), False) / 1e3)
        del a, b
        torch.cuda.empty_cache()

    def measure(self, section: str, case: str, impl: str, fn: Callable[[], object],
                nbytes: float, flops: float, **extra) -> dict:
        """One row; an exception (say, a reference out of memory) is recorded, not raised."""
        row = dict(section=section, case=case, impl=impl, bytes=nbytes, flops=flops, **extra)
        try:
            ms = self.time_ms(fn)
        except Exception as e:  # noqa: BLE001 - a failed row must not stop the run
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return row
        row.update(ms=ms, gbps=nbytes / ms / 1e6, tflops=flops / ms / 1e9)
        if self.bandwidth and self.peak:
            floor_ms = max(nbytes / self.bandwidth, flops / self.peak) * 1e3
            row.update(floor_ms=floor_ms, frac_of_floor=floor_ms / ms)
        return row


def decode_rows(ctx: BenchContext) -> list[dict]:
    """Cascade vs paged decode (Triton and torch) for one group of N samples."""
    from brorl.kernels.decode_attention import cascade_decode_ref, paged_decode_ref
    from brorl.kernels.decode_attention_triton import cascade_decode_triton, paged_decode_triton

    sh, dev, s = ctx.shapes, ctx.device, ctx.s
    rows = []
    for n, p, t in sh.decode:
        pp, tp = -(-p // sh.page), -(-t // sh.page)
        num_pages = pp + n * tp
        kc = torch.randn(num_pages, sh.page, sh.h_kv, sh.d, device=dev).to(sh.dtype)
        vc = torch.randn_like(kc)
        q = torch.randn(n, sh.h_q, sh.d, device=dev).to(sh.dtype)
        prefix = torch.arange(pp, device=dev)
        suffix = pp + torch.arange(n * tp, device=dev).view(n, tp)
        full = torch.cat([prefix.expand(n, pp), suffix], dim=1)
        i64 = dict(dtype=torch.int64, device=dev)
        gr, pl = torch.arange(n, device=dev)[None], torch.tensor([p], **i64)
        sl, fl = torch.full((n,), t, **i64), torch.full((n,), p + t, **i64)
        scale = sh.d ** -0.5
        io = n * sh.h_q * sh.d * (s + 4)
        paged_b = n * (p + t) * 2 * sh.h_kv * sh.d * s + io
        casc_b = (p + n * t) * 2 * sh.h_kv * sh.d * s + io
        flops = 4 * n * sh.h_q * sh.d * (p + t)
        case = f"N={n} P={p} t={t}"
        cascade_args = (q, kc, vc, gr, prefix[None], pl, suffix, sl, scale)
        rows += [
            # as the engine calls it: the group padding known on the host, no device check
            ctx.measure("decode", case, "cascade_triton",
                        partial(cascade_decode_triton, *cascade_args, padded=False), casc_b,
                        flops),
            ctx.measure("decode", case, "paged_triton",
                        partial(paged_decode_triton, q, kc, vc, full, fl, scale), paged_b, flops),
            ctx.measure("decode", case, "cascade_torch",
                        partial(cascade_decode_ref, *cascade_args), casc_b, flops),
            ctx.measure("decode", case, "paged_torch",
                        partial(paged_decode_ref, q, kc, vc, full, fl, scale), paged_b, flops),
        ]
        err = (cascade_decode_triton(*cascade_args) - cascade_decode_ref(*cascade_args)).abs()
        rows[-4]["max_abs_err_vs_torch"] = float(err.max())
    return rows


def extend_rows(ctx: BenchContext) -> list[dict]:
    """Extend attention over several sequences in one launch, Triton vs torch."""
    from brorl.kernels.extend_attention import extend_attention_ref
    from brorl.kernels.extend_attention_triton import extend_attention_packed, pack_extend_meta

    sh, dev, s = ctx.shapes, ctx.device, ctx.s
    prefix_lens = [c for c, _ in sh.extend]
    extend_lens = [t for _, t in sh.extend]
    tables, start = [], 0
    for c, t in sh.extend:
        k = -(-(c + t) // sh.page)
        tables.append(torch.arange(start, start + k, device=dev))
        start += k
    kc = torch.randn(start, sh.page, sh.h_kv, sh.d, device=dev).to(sh.dtype)
    vc = torch.randn_like(kc)
    q = torch.randn(sum(extend_lens), sh.h_q, sh.d, device=dev).to(sh.dtype)
    meta = pack_extend_meta(tables, prefix_lens, extend_lens, q.device)
    scale = sh.d ** -0.5
    nbytes = (sum(c + t for c, t in sh.extend) * 2 * sh.h_kv * sh.d * s
              + 2 * sum(extend_lens) * sh.h_q * sh.d * s)
    flops = 4 * sh.h_q * sh.d * sum(t * c + t * (t + 1) / 2 for c, t in sh.extend)
    case = " ".join(f"{c}+{t}" for c, t in sh.extend)
    return [
        ctx.measure("extend", case, "extend_triton",
                    partial(extend_attention_packed, q, kc, vc, meta, scale), nbytes, flops),
        ctx.measure("extend", case, "extend_torch",
                    partial(extend_attention_ref, q, kc, vc, tables, prefix_lens,
                            extend_lens, scale), nbytes, flops),
    ]


def norm_rope_rows(ctx: BenchContext) -> list[dict]:
    """RMSNorm, fused residual add + RMSNorm and RoPE, Triton vs torch."""
    from brorl.kernels.norm import add_rms_norm_ref, rms_norm_ref
    from brorl.kernels.norm_triton import add_rms_norm_triton, rms_norm_triton
    from brorl.kernels.rope import apply_rope_ref
    from brorl.kernels.rope_triton import apply_rope_triton

    sh, dev, s = ctx.shapes, ctx.device, ctx.s
    rows = []
    for r in sh.norm_rows:
        x = torch.randn(r, sh.hidden, device=dev).to(sh.dtype)
        res = torch.randn_like(x)
        w = torch.randn(sh.hidden, device=dev).to(sh.dtype)
        b2, b4 = (2 * r + 1) * sh.hidden * s, (4 * r + 1) * sh.hidden * s
        fl = 4 * r * sh.hidden
        case = f"rows={r} hidden={sh.hidden}"
        rows += [ctx.measure("norm", case, "rms_norm_triton",
                             partial(rms_norm_triton, x, w, 1e-6), b2, fl),
                 ctx.measure("norm", case, "rms_norm_torch", partial(rms_norm_ref, x, w, 1e-6),
                             b2, fl),
                 ctx.measure("norm", case, "add_rms_norm_triton",
                             partial(add_rms_norm_triton, x, res, w, 1e-6), b4, fl + r * sh.hidden),
                 ctx.measure("norm", case, "add_rms_norm_torch",
                             partial(add_rms_norm_ref, x, res, w, 1e-6), b4, fl + r * sh.hidden)]
        qk = torch.randn(r, sh.h_q, sh.d, device=dev).to(sh.dtype)
        cos, sin = (torch.randn(r, sh.d, device=dev).to(sh.dtype) for _ in range(2))
        rb = 2 * r * sh.h_q * sh.d * s + 2 * r * sh.d * s
        case = f"T={r} heads={sh.h_q} d={sh.d}"
        rows += [ctx.measure("rope", case, "rope_triton",
                             partial(apply_rope_triton, qk, cos, sin), rb, 3 * r * sh.h_q * sh.d),
                 ctx.measure("rope", case, "rope_torch", partial(apply_rope_ref, qk, cos, sin),
                             rb, 3 * r * sh.h_q * sh.d)]
    return rows


# Sections run in order; other kernel families append their own (sampling, logprobs).
SECTIONS: list[Callable[[BenchContext], list[dict]]] = [decode_rows, extend_rows,
                                                        norm_rope_rows]


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets: cascade >= 5x paged at N=512, P=4k; attention >= 60% of floor."""
    by = {(r["case"], r["impl"]): r for r in rows if "ms" in r}
    out = []
    for (case, impl), r in by.items():
        if impl == "cascade_triton" and (case, "paged_triton") in by:
            speedup = by[(case, "paged_triton")]["ms"] / r["ms"]
            r["speedup_vs_paged"] = speedup
            if case.startswith("N=512 P=4096"):
                out.append(dict(target="cascade >= 5x paged", case=case, value=speedup,
                                ok=speedup >= 5))
        if r["section"] in ("decode", "extend") and impl.endswith("_triton") \
                and "frac_of_floor" in r:
            out.append(dict(target=">= 60% of floor", case=f"{impl} {case}",
                            value=r["frac_of_floor"], ok=r["frac_of_floor"] >= 0.6))
        ref = by.get((case, impl.replace("_triton", "_torch")))
        if impl.endswith("_triton") and ref:
            r["speedup_vs_torch"] = ref["ms"] / r["ms"]
    return out


def print_table(rows: list[dict]) -> None:
    head = f"{'section':8} {'case':28} {'impl':20} {'ms':>9} {'GB/s':>8} {'TFLOP/s':>8} " \
           f"{'floor%':>7} {'vs torch':>8} {'vs paged':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['section']:8} {r['case'][:28]:28} {r['impl']:20} ERROR {r['error']}")
            continue
        frac = f"{100 * r['frac_of_floor']:.0f}" if "frac_of_floor" in r else "-"
        vt = f"{r['speedup_vs_torch']:.1f}x" if "speedup_vs_torch" in r else "-"
        vp = f"{r['speedup_vs_paged']:.1f}x" if "speedup_vs_paged" in r else "-"
        print(f"{r['section']:8} {r['case'][:28]:28} {r['impl']:20} {r['ms']:9.4f} "
              f"{r['gbps']:8.1f} {r['tflops']:8.2f} {frac:>7} {vt:>8} {vp:>8}")


def versions() -> dict:
    import triton

    return dict(python=platform.python_version(), torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interpret-smoke", action="store_true",
                    help="tiny shapes on CPU under the Triton interpreter (no JSON written)")
    ap.add_argument("--out", default=None, help="JSON path (default "
                    "bench/results/kernels-<device>.json)")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        ctx = BenchContext(SMOKE, "cpu", smoke=True)
    elif not torch.cuda.is_available():
        print("bench/kernels_triton.py: no CUDA GPU found; run it on a GPU machine, or pass "
              "--interpret-smoke to run tiny shapes under the Triton interpreter",
              file=sys.stderr)
        return 2
    else:
        ctx = BenchContext(Shapes(), "cuda", smoke=False, reps=args.reps)
    ctx.measure_floors()
    rows = [row for section in SECTIONS for row in section(ctx)]
    checks = targets(rows)
    print_table(rows)
    for c in checks:
        print(f"target {c['target']:22} {c['case'][:44]:44} {c['value']:.2f} "
              f"{'ok' if c['ok'] else 'MISSED'}")
    if ctx.smoke:
        return 0 if all("error" not in r for r in rows) else 1
    name = torch.cuda.get_device_name()
    result = dict(
        device=name, versions=versions(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        config=dict(h_q=ctx.shapes.h_q, h_kv=ctx.shapes.h_kv, d=ctx.shapes.d,
                    page_size=ctx.shapes.page, dtype=str(ctx.shapes.dtype), reps=ctx.reps,
                    warmup=ctx.warmup, timing="CUDA events, median, L2 flushed (256 MiB) "
                    "before each repeat", formulas=FORMULAS),
        copy_bandwidth_gbps=ctx.bandwidth / 1e9, bf16_matmul_peak_tflops=ctx.peak / 1e12,
        rows=rows, targets=checks)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"kernels-{slug}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"copy bandwidth {ctx.bandwidth / 1e9:.0f} GB/s, bf16 matmul peak "
          f"{ctx.peak / 1e12:.0f} TFLOP/s; wrote {out}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
