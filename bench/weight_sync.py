"""Weight-sync bandwidth of each transport against a plain memcpy of the same bytes.

    python bench/weight_sync.py                       # 100 MB, 300 MB, 1 GB on CPU
    python bench/weight_sync.py --sizes 100 3000      # MB; 3 GB ~ Qwen2-1.5B in bf16

Parameters are bf16 tensors shaped like Qwen2-1.5B's MLP matrices (1536 x 8960, the last
one cut to size). Rows, each the best of --repeats after one warm-up, GB/s = bytes / s:

- memcpy:         `dst.copy_(src)` of one flat buffer of the same bytes (the ceiling)
- inprocess:      `InProcessSender` into a sink engine that copies every tensor into its
                  own preallocated parameters (what `Engine.update_weights` costs)
- gloo/raw:       ProcessGroupGloo broadcast of the same bytes in 512 MB pieces to a second
                  process on loopback (TCP, the transport alone)
- gloo/protocol:  `WeightSender.send` to a `WeightReceiver` in a second process, as the Ray
                  launcher runs it on one machine: manifest, verdict, packing the buckets
                  into the shared-memory segment, per-bucket notices, the final
                  acknowledgement (the receiver's apply is a no-op here, so the row
                  measures the transport)
- gloo-tcp/protocol: the same with shared_memory=False: buckets broadcast over TCP
- nccl/...:       the same between two GPUs, only with >= 2 CUDA devices

Writes bench/results/weight-sync-<device>.json (device, versions, date, rows).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROWS, COLS = 1536, 8960  # a Qwen2-1.5B MLP matrix
RAW_PIECE = 512 << 20


def param_shapes(num_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """bf16 tensors of ROWS x COLS adding up to num_bytes (the last one shorter)."""
    elems, out = num_bytes // 2, []
    while elems > 0:
        rows = min(ROWS, -(-elems // COLS))
        out.append((f"layers.{len(out)}.weight", (rows, COLS)))
        elems -= rows * COLS
    return out


class _Sink:
    """Enough of an Engine for the protocol: slots to validate against, and an apply that
    either copies into its own parameters (`copy=True`) or does nothing."""

    def __init__(self, shapes, copy: bool, device="cpu") -> None:
        from brorl.engine.models.weights import ParamSlot

        self.device = torch.device(device)
        self.model = type("M", (), {})()
        self.model.slots = {n: ParamSlot(n, 0, s[0], s) for n, s in shapes}
        self.params = {n: torch.empty(s, dtype=torch.bfloat16, device=device)
                       for n, s in shapes} if copy else None
        self.policy_version = 0

    def update_weights(self, named, version=None) -> None:
        if self.params is not None:
            for n, t in named:
                self.params[n].copy_(t)
        self.policy_version = version


def _best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _raw(ch, buf: torch.Tensor) -> None:
    for i in range(0, buf.numel(), RAW_PIECE):
        ch.broadcast(buf[i:i + RAW_PIECE], src=0)


def _receiver(transport: str, port: int, sizes: list[int], repeats: int,
              shared_memory: bool) -> None:
    torch.set_num_threads(1)
    from brorl.trainer.weight_sync import make_receiver

    device = "cuda:1" if transport == "nccl" else "cpu"
    for k, size in enumerate(sizes):
        shapes = param_shapes(size)
        rx = make_receiver(transport, _Sink(shapes, False, device), host="127.0.0.1",
                           port=port + k, rank=1, world_size=2, timeout_s=600,
                           shared_memory=shared_memory)
        buf = torch.empty(sum(s[0] * s[1] for _, s in shapes) * 2, dtype=torch.uint8,
                          device=rx.channel.device)
        for _ in range(repeats + 1 if not shared_memory else 0):
            _raw(rx.channel, buf)
        for _ in range(repeats + 2):  # the sender's check, its warm-up, the timed runs
            rx.receive()
        del buf
        rx.close()


def run_transport(transport: str, sizes: list[int], repeats: int, bucket_mb: int,
                  shared_memory: bool = True) -> list:
    """Rows of one transport; gloo with shared_memory=False is the "gloo-tcp" rows and the
    only one with a raw TCP row (shared memory has no raw broadcast of its own)."""
    from brorl.trainer.weight_sync import make_sender
    from brorl.trainer.weight_sync.channel import free_port

    port = free_port()
    while any(_busy(port + k) for k in range(len(sizes))):
        port = free_port()
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_receiver, args=(transport, port, sizes, repeats,
                                               shared_memory), daemon=True)
    proc.start()
    device = "cuda:0" if transport == "nccl" else "cpu"
    name = transport if shared_memory or transport != "gloo" else "gloo-tcp"
    rows = []
    for k, size in enumerate(sizes):
        tx = make_sender(transport, host="127.0.0.1", port=port + k, world_size=2,
                         timeout_s=600, bucket_bytes=bucket_mb << 20, device=device,
                         shared_memory=shared_memory)
        named = [(n, torch.randn(s, device=device).to(torch.bfloat16))
                 for n, s in param_shapes(size)]
        num_bytes = sum(t.numel() * 2 for _, t in named)
        if not shared_memory:
            buf = torch.ones(num_bytes, dtype=torch.uint8, device=device)
            rows.append(_row("gloo/raw", num_bytes,
                             _best(partial(_raw, tx.channel, buf), repeats)))
            del buf
        used = tx.send(named, version=1)["shared_memory"]
        if shared_memory and transport == "gloo" and not used:
            print(f"note: no shared memory at {size // 1_000_000} MB; the gloo row is TCP")
        proto = _best(partial(tx.send, named, version=1), repeats)
        rows.append(_row(f"{name}/protocol", num_bytes, proto))
        del named
        tx.close()
    proc.join(60)
    return rows


def _busy(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def run_local(sizes: list[int], repeats: int) -> list:
    from brorl.trainer.weight_sync import InProcessSender

    rows = []
    for size in sizes:
        shapes = param_shapes(size)
        named = [(n, torch.randn(s).to(torch.bfloat16)) for n, s in shapes]
        num_bytes = sum(t.numel() * 2 for _, t in named)
        src = torch.ones(num_bytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        rows.append(_row("memcpy", num_bytes, _best(partial(dst.copy_, src), repeats)))
        del src, dst
        sender = InProcessSender(_Sink(shapes, True))
        rows.append(_row("inprocess", num_bytes,
                         _best(partial(sender.send, named, version=1), repeats)))
        del named, sender
    return rows


def _row(name: str, num_bytes: int, seconds: float) -> dict:
    return {"transport": name, "mb": round(num_bytes / 1e6), "seconds": round(seconds, 4),
            "gb_per_s": round(num_bytes / seconds / 1e9, 3)}


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import cupy

        out["cupy"] = cupy.__version__
    except ImportError:
        pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000], help="MB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mb", type=int, default=512)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [s * 1_000_000 for s in args.sizes]
    rows = run_local(sizes, args.repeats)
    rows += run_transport("gloo", sizes, args.repeats, args.bucket_mb)
    rows += run_transport("gloo", sizes, args.repeats, args.bucket_mb, shared_memory=False)
    gpus = torch.cuda.device_count()
    if gpus >= 2:
        rows += run_transport("nccl", sizes, args.repeats, args.bucket_mb)
    device = torch.cuda.get_device_name(0).replace(" ", "-") if gpus else "cpu"
    memcpy = {r["mb"]: r["gb_per_s"] for r in rows if r["transport"] == "memcpy"}
    for r in rows:
        r["fraction_of_memcpy"] = round(r["gb_per_s"] / memcpy[r["mb"]], 3)
    print(f"{'transport':16s} {'MB':>6s} {'seconds':>9s} {'GB/s':>7s} {'of memcpy':>9s}")
    for r in sorted(rows, key=lambda r: (r["mb"], r["transport"])):
        print(f"{r['transport']:16s} {r['mb']:6d} {r['seconds']:9.4f} {r['gb_per_s']:7.2f} "
              f"{r['fraction_of_memcpy']:9.1%}")
    result = dict(benchmark="weight_sync", device=device, cpu=platform.processor() or
                  platform.machine(), cpu_count=os.cpu_count(), torch_threads=args.threads,
                  gpus=gpus, versions=versions(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  config=dict(sizes_mb=args.sizes, repeats=args.repeats,
                              bucket_mb=args.bucket_mb, dtype="bfloat16"),
                  rows=rows)
    out = Path(args.out or ROOT / "bench" / "results" / f"weight-sync-{device}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
