"""Host time of the scheduler's page bookkeeping, Python vs C++ radix cache + allocator.

Drives the engine's own `CacheManager` (no model, no KV tensors) through a rollout the way
the engine does: match + lock each prompt, allocate its pages, cache them, fork n samples
(each copies the partial last page), grow every sample by one page every page_size decode
steps, then free private pages and release the group. Reports microseconds per decode step
(the whole rollout's bookkeeping divided by its decode steps, and the decode phase alone),
and single-operation costs. Writes bench/results/cache-ops-<device>.json.

    .venv/bin/python bench/cache_ops.py            # the full table (about 20 s on 2 cores)
    .venv/bin/python bench/cache_ops.py --quick    # small sizes, writes nothing
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from brorl.engine.cache_ext import extension_built, make_cache  # noqa: E402
from brorl.engine.cache_manager import CacheManager, pages_for  # noqa: E402
from brorl.engine.request import Group, Sequence  # noqa: E402
from brorl.engine.sampling_params import SamplingParams  # noqa: E402


class _NoKV:
    """The KV pool's page count and copy hook, without tensors."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages

    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        pass


def rollout(impl: str, num_prompts: int, n: int, prompt_len: int, new_tokens: int,
            page_size: int, shared_len: int) -> dict:
    """One rollout's bookkeeping; returns seconds per phase."""
    os.environ["BRORL_CACHE_IMPL"] = impl
    need = num_prompts * (pages_for(prompt_len, page_size)
                          + n * pages_for(prompt_len + new_tokens, page_size))
    cm = CacheManager(_NoKV(need + 16), page_size)
    system = list(range(1000, 1000 + shared_len))
    prompts = [system + [(7 * g + i) % 997 for i in range(prompt_len - shared_len)]
               for g in range(num_prompts)]
    t0 = time.perf_counter()
    groups = []
    for g, prompt in enumerate(prompts):
        group = Group(g, prompt, SamplingParams(n=n), 0, frozenset(), page_size)
        pages = cm.match_and_lock(group)
        group.num_cached_tokens = len(pages) * page_size
        table = pages + cm.alloc(pages_for(prompt_len, page_size) - len(pages))
        cm.finish_prefill(group, table)
        group.samples = [Sequence(group, i, list(prompt)) for i in range(n)]
        for seq in group.samples:
            cm.fork(seq)
        cm.release_tail(group)
        groups.append(group)
    t1 = time.perf_counter()
    for step in range(new_tokens):
        for group in groups:
            for seq in group.samples:
                if not cm.grow(seq, prompt_len + step + 1):
                    raise RuntimeError("pool too small")
    t2 = time.perf_counter()
    for group in groups:
        for seq in group.samples:
            cm.free_private(seq)
        cm.release_group(group)
    t3 = time.perf_counter()
    cm.check_integrity([])
    assert cm.allocator.num_free + cm.radix.num_cached_pages == cm.kv.num_pages
    return {"admit_s": t1 - t0, "decode_s": t2 - t1, "free_s": t3 - t2, "total_s": t3 - t0}


def op_costs(impl: str, reps: int) -> dict:
    """Microseconds per call of single operations on a warm cache."""
    alloc, radix, _ = make_cache(4096, 16, impl)
    prompt = list(range(1024))
    pages = alloc.alloc(64)
    radix.insert(prompt, pages)
    out = {}

    def timed(name, fn):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        out[name] = (time.perf_counter() - t) / reps * 1e6

    timed("alloc(1)+decref([p])", lambda: alloc.decref(alloc.alloc(1)))
    timed("alloc(16)+decref(16)", lambda: alloc.decref(alloc.alloc(16)))
    timed("match_prefix(1024 tokens)", lambda: radix.match_prefix(prompt))
    timed("insert(cached 1024 tokens)", lambda: radix.insert(prompt, pages))
    node = radix.match_prefix(prompt)[1]
    timed("lock+unlock", lambda: (radix.lock(node), radix.unlock(node)))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes; writes no JSON")
    ap.add_argument("--out", default=None, help="JSON path (default: bench/results/"
                    "cache-ops-cpu.json; --quick writes nothing unless given)")
    args = ap.parse_args(argv)
    impls = ["python"] + (["cpp"] if extension_built() else [])
    ps, new_tokens = 16, (32 if args.quick else 256)
    workloads = [dict(num_prompts=1, n=512, prompt_len=512, shared_len=0),
                 dict(num_prompts=64, n=8, prompt_len=512, shared_len=256)]
    if args.quick:
        workloads = [dict(w, n=max(1, w["n"] // 8)) for w in workloads]
    rows = []
    for w in workloads:
        for impl in impls:
            best = min((rollout(impl, new_tokens=new_tokens, page_size=ps, **w)
                        for _ in range(5)), key=lambda r: r["total_s"])
            rows.append(dict(w, impl=impl, page_size=ps, new_tokens=new_tokens,
                             batch=w["num_prompts"] * w["n"],
                             us_per_step=best["total_s"] / new_tokens * 1e6,
                             decode_us_per_step=best["decode_s"] / new_tokens * 1e6,
                             admit_ms=best["admit_s"] * 1e3, free_ms=best["free_s"] * 1e3))
    ops = {impl: op_costs(impl, 2000 if args.quick else 20000) for impl in impls}
    print_tables(rows, ops)
    result = dict(benchmark="cache_ops", device="cpu", cpu=platform.processor()
                  or platform.machine(), cpu_count=os.cpu_count(),
                  python=platform.python_version(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  rollouts=rows, op_us=ops)
    out = args.out or (None if args.quick else
                       str(ROOT / "bench" / "results" / "cache-ops-cpu.json"))
    if out:
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    return result


def print_tables(rows: list[dict], ops: dict) -> None:
    print(f"{'workload':<28} {'impl':<7} {'us/step':>9} {'decode us/step':>15} "
          f"{'admit ms':>9} {'free ms':>8}")
    for r in rows:
        name = f"{r['num_prompts']}x{r['n']} prompt {r['prompt_len']}"
        print(f"{name:<28} {r['impl']:<7} {r['us_per_step']:>9.1f} "
              f"{r['decode_us_per_step']:>15.1f} {r['admit_ms']:>9.2f} {r['free_ms']:>8.2f}")
    print(f"\n{'operation (us per call)':<28} " + " ".join(f"{i:>8}" for i in ops))
    for name in next(iter(ops.values())):
        print(f"{name:<28} " + " ".join(f"{ops[i][name]:>8.2f}" for i in ops))


if __name__ == "__main__":
    main()
