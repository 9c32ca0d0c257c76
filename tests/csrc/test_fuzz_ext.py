"""Differential fuzzing and robustness of the compiled CPU paths against their references.

1. The C++ radix tree + page allocator (engine/cache_ext.py) against engine/radix_cache.py
   and engine/allocator.py: long seeded operation sequences over page sizes 1..16 with
   keys that share long prefixes and diverge mid-page, match lengths that are not page
   multiples (and empty), repeated inserts of one key, eviction of more than is evictable,
   locks on the root and on split nodes; after every step the Twin of test_cache_ext.py
   compares return values, pages, node paths, LRU times, counts, refcounts, free stacks and
   both integrity checks. Refused inserts must leave the tree as a match_prefix would.
2. C++ paged and cascade decode (kernels/decode_attention_cpp.py) against the torch
   references on random ragged cases: page size 1..16, GQA ratios 1/2/4/7, head dims
   8..128, groups of one and of different sizes with -1 padding anywhere, prefix 0, empty
   suffixes, rows in no group, non-contiguous and int32 inputs. Tolerances as in
   tests/kernels/test_attention_cpp.py (float32 atol 1e-5, bfloat16 KV atol 1e-4).
3. Bad input to the C++ and numba kernels runs in a subprocess, so that a segfault or an
   out-of-bounds read shows as a failed test instead of killing pytest: each case must
   raise the stated Python exception.
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from brorl.engine.cache_ext import CppPageAllocator, CppRadixCache, extension_built
from brorl.kernels.decode_attention import cascade_decode_ref, paged_decode_ref
from brorl.kernels.decode_attention_cpp import (
    attention_ext_built,
    cascade_decode_cpp,
    paged_decode_cpp,
)
from tests.csrc.test_cache_ext import Twin

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_cache = pytest.mark.skipif(not extension_built(),
                                 reason="brorl.engine._cache_ext is not built")
needs_attention = pytest.mark.skipif(not attention_ext_built(),
                                     reason="brorl.kernels._attention_ext is not built")


# -- 1. radix tree + allocator ----------------------------------------------------------
class RadixFuzz:
    """Random operations on a Twin; `held` lists the caller's page references (one entry
    per reference), `locks` the (python node, C++ handle) pairs locked."""

    def __init__(self, seed: int, page_size: int) -> None:
        self.rng = random.Random(seed)
        self.ps = page_size
        self.t = Twin(num_pages=self.rng.choice([10, 24, 64]), page_size=page_size)
        self.held: list[int] = []
        self.locks: list = []
        # a few long sequences: keys are their prefixes, sometimes with one token changed,
        # so prefixes are shared over many pages and diverge at any offset inside a page
        self.bases = [[self.rng.randrange(3) for _ in range(page_size * 9 + 3)]
                      for _ in range(3)]

    def ids(self) -> list[int]:
        rng = self.rng
        base = rng.choice(self.bases)
        ids = base[:rng.randrange(len(base) + 1)]
        if ids and rng.random() < 0.4:
            ids = list(ids)
            ids[rng.randrange(len(ids))] = rng.randrange(5)
        return ids

    def both(self, method, *args, on="cache"):
        a, b = self.t.both(method, *args, on=on)
        assert a == b, (method, a, b)
        return a

    def same_node(self, py_node, cpp_node) -> None:
        self.t.same_node(py_node, cpp_node)
        while py_node is not None:  # LRU times along the path too
            assert py_node.last_access == cpp_node.last_access
            py_node, cpp_node = py_node.parent, cpp_node.parent

    def maybe_lock(self, na, nb, p: float) -> None:
        if self.rng.random() < p:
            self.t.py.lock(na)
            self.t.cpp.lock(nb)
            self.locks.append((na, nb))

    def match(self) -> None:
        (pa, na), (pb, nb) = self.t.both("match_prefix", self.ids())
        assert pa == pb
        self.same_node(na, nb)
        self.maybe_lock(na, nb, 0.3)

    def room(self, ids: list[int], need: int) -> bool:
        """Evicts (keeping the prefix of ids) until `need` pages are free, if it can."""
        t = self.t
        (_, na), (_, nb) = t.both("match_prefix", ids)
        t.py.lock(na)
        t.cpp.lock(nb)
        if need > t.py_alloc.num_free:
            self.both("evict", need - t.py_alloc.num_free)
        t.py.unlock(na)
        t.cpp.unlock(nb)
        return need <= t.py_alloc.num_free

    def insert(self) -> None:
        t, rng, ps = self.t, self.rng, self.ps
        ids = self.ids()
        ids = ids[:len(ids) // ps * ps]
        (ma, _), (mb, _) = t.both("match_prefix", ids)
        assert ma == mb
        # the engine's way (canonical matched pages + fresh ones) or all fresh pages even
        # where the prefix is cached (the duplicates are not adopted)
        reuse = ma[:rng.randrange(len(ma) + 1)] if rng.random() < 0.6 else []
        need = len(ids) // ps - len(reuse)
        if not self.room(ids, need):
            return
        fresh = self.both("alloc", need, on="alloc")
        pages = reuse + fresh
        (pa, na), (pb, nb) = t.both("insert", ids, pages)
        assert pa == pb and len(pa) == len(ids) // ps
        self.same_node(na, nb)
        if rng.random() < 0.3:  # the same key again: nothing changes, same canonical pages
            (qa, xa), (qb, xb) = t.both("insert", ids, pa)
            assert qa == qb == pa
            self.same_node(xa, xb)
        if rng.random() < 0.85:  # the cache holds its own references now
            self.both("decref", fresh, on="alloc")
        else:
            self.held.extend(fresh)
        self.maybe_lock(na, nb, 0.3)

    def refused_insert(self) -> None:
        """Adopting a page that is cached already, or one listed twice, is refused by
        both, after the insert's match_prefix, and changes nothing else."""
        t, ps, rng = self.t, self.ps, self.rng
        ids = self.ids()
        n = len(ids) // ps
        ids = ids[:n * ps]
        (ma, _), _ = t.both("match_prefix", ids)
        m, cached = n - len(ma), sorted(t.cpp.page_holders())
        if m >= 2 and self.held and (not cached or rng.random() < 0.5):
            bad = [rng.choice(self.held)] * m  # a held page listed twice
        elif m and cached:
            bad = [rng.choice(self.held + cached) for _ in range(m - 1)]
            bad.insert(rng.randrange(m), rng.choice(cached))
        else:
            return
        for impl in (t.py, t.cpp):
            with pytest.raises(ValueError, match="cached already or listed twice"):
                impl.insert(ids, ma + bad)

    def unlock(self) -> None:
        if self.locks:
            na, nb = self.locks.pop(self.rng.randrange(len(self.locks)))
            self.t.py.unlock(na)
            self.t.cpp.unlock(nb)

    def evict(self) -> None:
        rng = self.rng
        n = rng.choice([0, 1, 2, 5, self.t.py.num_evictable_pages,
                        self.t.py.num_evictable_pages + 3, 10**9])
        before = self.t.py.num_evictable_pages
        freed = self.both("evict", n)
        assert freed <= before + self.t.py_alloc.num_pages

    def flush(self) -> None:
        while self.locks and self.rng.random() < 0.7:  # often every lock goes first
            self.unlock()
        if self.locks:
            with pytest.raises(RuntimeError):
                self.t.py.flush()
            with pytest.raises(RuntimeError):
                self.t.cpp.flush()
        else:
            self.both("flush")

    def caller_pages(self) -> None:
        t, rng = self.t, self.rng
        op = rng.random()
        if op < 0.3:
            n = rng.randrange(0, 3)
            if n <= t.py_alloc.num_free:
                self.held.extend(self.both("alloc", n, on="alloc"))
        elif op < 0.5 and self.held:
            pages = rng.sample(self.held, min(len(self.held), rng.randrange(1, 4)))
            self.both("incref", pages, on="alloc")
            self.held.extend(pages)
        elif op < 0.85 and self.held:
            pages = [self.held.pop(rng.randrange(len(self.held)))
                     for _ in range(min(len(self.held), rng.randrange(1, 4)))]
            self.both("decref", pages, on="alloc")
        elif t.py_alloc.num_free:
            # C++ only: a list that frees held pages and then meets a free page is refused
            # as a whole (the earlier pages' counts and the free stack restored)
            free = [p for p, rc in enumerate(t.py_alloc.refcount) if rc == 0]
            pages = rng.sample(self.held, min(len(self.held), rng.randrange(0, 4)))
            pages.insert(rng.randrange(len(pages) + 1), rng.choice(free))
            method = rng.choice(["decref", "incref"])
            with pytest.raises(ValueError, match=f"{method} of free page"):
                getattr(t.cpp_alloc, method)(pages)

    def step(self) -> None:
        ops = [(0.28, self.insert), (0.22, self.match), (0.1, self.unlock),
               (0.1, self.evict), (0.012, self.flush), (0.07, self.refused_insert),
               (0.2, self.caller_pages)]
        x = self.rng.random()
        for p, op in ops:
            if x < p:
                op()
                return
            x -= p
        self.caller_pages()

    def check(self) -> None:
        self.t.check(self.held, self.locks)
        for na, nb in self.locks:
            self.same_node(na, nb)
        # unlocked leaves never share an LRU time (the nodes stamped by one call form one
        # root path), so eviction order never falls back to the id tie-break, which
        # differs between the two (Python's id() vs C++ node ids)
        leaves = [n for n in self.t.py._nodes() if not n.children and n.lock_ref == 0]
        assert len({n.last_access for n in leaves}) == len(leaves)

    def drain(self) -> None:
        for na, nb in self.locks:
            self.t.py.unlock(na)
            self.t.cpp.unlock(nb)
        self.locks = []
        self.both("flush")
        self.both("decref", self.held, on="alloc")
        self.held = []
        self.check()
        assert self.t.cpp_alloc.num_free == self.t.cpp_alloc.num_pages


@needs_cache
@pytest.mark.parametrize("page_size", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("seed", [0, 1])
def test_radix_fuzz_agrees_with_python_reference_after_every_step(page_size, seed):
    fz = RadixFuzz(seed=1000 * seed + page_size, page_size=page_size)
    for _ in range(600):
        fz.step()
        fz.check()
    fz.drain()


@needs_cache
def test_match_of_empty_and_sub_page_keys_returns_the_root():
    t = Twin(num_pages=4, page_size=4)
    pages = t.both("alloc", 2, on="alloc")[0]
    t.both("insert", list(range(8)), pages)
    for ids in ([], [0], [0, 1, 2]):
        (pa, na), (pb, nb) = t.both("match_prefix", ids)
        assert pa == pb == [] and na is t.py.root and nb == t.cpp.root
    t.py.lock(t.py.root)  # a lock on the root protects nothing and unlocks cleanly
    t.cpp.lock(t.cpp.root)
    t.check(pages, [])
    assert t.both("evict", 10) == (0, 0)  # the caller still holds both pages
    t.py.unlock(t.py.root)
    t.cpp.unlock(t.cpp.root)
    t.check(pages, [])


@needs_cache
def test_evict_after_the_caller_dropped_the_cache_reference_leaves_the_tree_intact():
    """A caller that decrefs a page the cache holds makes evict's decref fail. Before the
    fix the node was unlinked first and left in the id map with its parent pointer; once
    the parent was evicted, locking the stale handle walked freed memory."""
    alloc = CppPageAllocator(4)
    cache = CppRadixCache(1, alloc)
    pages = alloc.alloc(2)
    _, top = cache.insert([1], pages[:1])
    _, leaf = cache.insert([1, 2], pages)
    alloc.decref(pages)  # the caller's references
    alloc.decref(pages[1:])  # caller bug: the cache's reference to the leaf's page
    with pytest.raises(ValueError, match="decref of free page"):
        cache.evict(1)
    # the leaf is still linked (not "unreachable from the root"): only the caller's bug shows
    with pytest.raises(AssertionError, match="cached page 1 is free"):
        cache.check_integrity()
    assert leaf.alive and top.alive and cache.num_cached_pages == 2
    with pytest.raises(ValueError):
        cache.evict(10)  # still refused: the leaf blocks its parent too
    cache.lock(leaf)  # walks leaf -> top -> root: all alive
    cache.unlock(leaf)
    with pytest.raises(ValueError, match="decref of free page"):
        cache.flush()
    assert list(alloc.refcount) == [1, 0, 0, 0]  # flush changed nothing either


@needs_cache
def test_insert_refuses_pages_cached_under_another_key_or_listed_twice():
    alloc = CppPageAllocator(6)
    cache = CppRadixCache(2, alloc)
    a = alloc.alloc(2)
    cache.insert([1, 2, 3, 4], a)
    b = alloc.alloc(2)
    with pytest.raises(ValueError, match="cached already"):
        cache.insert([7, 7, 8, 8], [b[0], a[1]])
    with pytest.raises(ValueError, match="listed twice"):
        cache.insert([7, 7, 8, 8], [b[0], b[0]])
    cache.check_integrity()
    assert cache.num_cached_pages == 2 and cache.page_holders() == {a[0]: 1, a[1]: 1}
    cache.insert([7, 7, 8, 8], b)  # the refused calls left nothing marked
    alloc.decref(a + b)
    assert cache.evict(10) == 4 and alloc.num_free == 6
    cache.insert([9, 9], alloc.alloc(1))  # an evicted page may be cached again
    cache.check_integrity()


# -- 2. C++ attention against the torch references -------------------------------------
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4}


def close(got, want, dtype):
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=ATOL[dtype], rtol=1e-4)


def random_case(rng: random.Random, g: torch.Generator):
    """A random cascade layout: (q, kc, vc, group_rows, prefix_pages, prefix_lens,
    suffix_pages, suffix_lens, scale) plus the dtype."""
    dtype = rng.choice([torch.float32, torch.bfloat16])
    ps = rng.choice([1, 2, 3, 4, 16])
    hkv = rng.choice([1, 2])
    ratio = rng.choice([1, 2, 4, 7])
    d = rng.choice([8, 16, 24, 40, 64, 72, 128])
    sizes = [rng.choice([1, 2, 3, 5, rng.randrange(1, 40)]) for _ in range(rng.randrange(0, 4))]
    ungrouped = rng.randrange(0, 3) if sizes else rng.randrange(1, 4)
    batch = sum(sizes) + ungrouped
    plens = [rng.choice([0, 1, ps, 5 * ps + 1, rng.randrange(300), rng.randrange(257, 700)])
             for _ in sizes]  # past 256: more than one chunk of the online softmax
    slens = [rng.choice([0, 0, 1, ps, rng.randrange(40)]) for _ in range(batch)]
    pw = max([math.ceil(n / ps) for n in plens] + [1]) + rng.randrange(2)  # extra padding
    sw = max([math.ceil(n / ps) for n in slens] + [1]) + rng.randrange(2)
    num_pages = rng.randrange(8, 64)
    kc = torch.randn(num_pages, ps, hkv, d, generator=g).to(dtype)
    vc = torch.randn(num_pages, ps, hkv, d, generator=g).to(dtype)
    q = torch.randn(batch, hkv * ratio, d, generator=g)
    order = list(range(batch))
    rng.shuffle(order)
    nmax = max(sizes, default=1) + rng.randrange(2)
    rows, start = [], 0
    for n in sizes:  # -1 padding at random places, not only at the end
        row = order[start:start + n] + [-1] * (nmax - n)
        rng.shuffle(row)
        rows.append(row)
        start += n
    group_rows = torch.tensor(rows, dtype=torch.int64).view(len(sizes), nmax)
    # any valid page ids (pages may repeat across rows: only reads)
    prefix_pages = torch.randint(0, num_pages, (len(sizes), pw), generator=g)
    suffix_pages = torch.randint(0, num_pages, (batch, sw), generator=g)
    return dtype, (q, kc, vc, group_rows, prefix_pages, torch.tensor(plens, dtype=torch.int64),
                   suffix_pages, torch.tensor(slens, dtype=torch.int64), rng.uniform(0.05, 1.0))


def odd_layout(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """The same values as a non-contiguous view, or (index tensors) as int32."""
    if not t.is_floating_point() and rng.random() < 0.5:
        return t.to(torch.int32)
    if t.dim() >= 2 and t.numel() and rng.random() < 0.5:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    return t


@needs_attention
@pytest.mark.parametrize("seed", range(40))
def test_cpp_attention_fuzz_matches_torch_reference(seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    dtype, args = random_case(rng, g)
    q, kc, vc, group_rows, prefix_pages, prefix_lens, suffix_pages, suffix_lens, scale = args
    odd = [odd_layout(t, rng) for t in args[:8]]
    assert all(torch.equal(a, b) for a, b in zip(odd, args[:8]))
    want = cascade_decode_ref(*args)
    close(cascade_decode_cpp(*odd, scale), want, dtype)
    # paged decode of the suffixes alone, with lse (-inf exactly where a row is empty)
    out, lse = paged_decode_cpp(odd[0], odd[1], odd[2], odd[6], odd[7], scale)
    ref_out, ref_lse = paged_decode_ref(q, kc, vc, suffix_pages, suffix_lens, scale)
    close(out, ref_out, dtype)
    assert torch.equal(torch.isinf(lse), suffix_lens[:, None].expand_as(lse) == 0)
    fin = torch.isfinite(ref_lse)
    close(lse[fin], ref_lse[fin], dtype)


@needs_attention
def test_cpp_attention_single_row_and_empty_batch():
    g = torch.Generator().manual_seed(0)
    kc, vc = torch.randn(5, 1, 1, 8, generator=g), torch.randn(5, 1, 1, 8, generator=g)
    q = torch.randn(1, 7, 8, generator=g)  # N = 1, GQA ratio 7, page size 1
    pt, lens = torch.tensor([[4, 0, 2]]), torch.tensor([3])
    out, lse = paged_decode_cpp(q, kc, vc, pt, lens, 0.4)
    want, want_lse = paged_decode_ref(q, kc, vc, pt, lens, 0.4)
    close(out, want, torch.float32)
    close(lse, want_lse, torch.float32)
    args = (q, kc, vc, torch.tensor([[0]]), torch.tensor([[1, 3]]), torch.tensor([2]), pt,
            torch.tensor([0]))
    close(cascade_decode_cpp(*args, 0.4), cascade_decode_ref(*args, 0.4), torch.float32)
    e = torch.empty(0, 7, 8)
    out, lse = paged_decode_cpp(e, kc, vc, torch.empty(0, 2, dtype=torch.int64),
                                torch.empty(0, dtype=torch.int64), 0.4)
    assert out.shape == (0, 7, 8) and lse.shape == (0, 7)
    out = cascade_decode_cpp(e, kc, vc, torch.empty(0, 3, dtype=torch.int64),
                             torch.empty(0, 1, dtype=torch.int64),
                             torch.empty(0, dtype=torch.int64),
                             torch.empty(0, 1, dtype=torch.int64),
                             torch.empty(0, dtype=torch.int64), 0.4)
    assert out.shape == (0, 7, 8)


# -- 3. bad input, each case in one subprocess --------------------------------------------
def run_cases(body: str, cases: dict[str, str]) -> None:
    """Runs `body` then each case (an expression) in one fresh interpreter, in order; each
    must raise the exception class named by its key's prefix ("ValueError: ...") or,
    for "ok: ...", return. A crash fails with the case that was running."""
    lines = [textwrap.dedent(body), "import sys", "def _run(name, fn):",
             "    print('START', name, flush=True)",
             "    try:", "        fn()", "    except Exception as e:",
             "        print('RAISED', type(e).__name__, flush=True)", "        return",
             "    print('RAISED ok', flush=True)"]
    for name, expr in cases.items():
        lines.append(f"_run({name!r}, lambda: {expr})")
    env = dict(os.environ, OMP_NUM_THREADS="2", NUMBA_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", "\n".join(lines)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout.splitlines()
    started = [line[len("START "):] for line in out if line.startswith("START ")]
    raised = [line[len("RAISED "):] for line in out if line.startswith("RAISED ")]
    assert proc.returncode == 0, (f"crashed (rc {proc.returncode}) in case "
                                  f"{started[-1] if started else None!r}:\n{proc.stderr[-2000:]}")
    assert len(raised) == len(cases)
    for (name, _), got in zip(cases.items(), raised):
        assert got == name.split(":")[0], f"{name}: {got}"


ATTENTION_SETUP = """
import numpy as np, torch
from brorl.kernels.decode_attention_cpp import paged_decode_cpp as P, cascade_decode_cpp as C
from brorl.kernels import _attention_ext as ext
g = torch.Generator().manual_seed(0)
q = torch.randn(2, 4, 8, generator=g); k = torch.randn(10, 4, 2, 8, generator=g); v = k + 1
pt = torch.tensor([[0, 1], [2, 3]]); L = torch.tensor([5, 8])
gr = torch.tensor([[0, 1]]); pp = torch.tensor([[4, 5]]); pl = torch.tensor([6])
def paged(**kw):
    a = dict(q=q, k_cache=k, v_cache=v, page_table=pt, seq_lens=L, scale=0.5); a.update(kw)
    return P(**a)
def casc(**kw):
    a = dict(q=q, k_cache=k, v_cache=v, group_rows=gr, prefix_pages=pp, prefix_lens=pl,
             suffix_pages=pt, suffix_lens=L, scale=0.5); a.update(kw)
    return C(**a)
n = lambda t: t.numpy()
def raw(**kw):
    a = dict(q=n(q), k_cache=n(k), v_cache=n(v), page_table=n(pt), seq_lens=n(L), scale=0.5)
    a.update(kw)
    return ext.paged_decode(*a.values())
def unaligned(a):
    buf = np.zeros(a.nbytes + 1, np.uint8)
    b = buf[1:].view(a.dtype).reshape(a.shape); b[...] = a
    return b
"""

ATTENTION_CASES = {
    "ok: int32 tables and lengths": "paged(page_table=pt.int(), seq_lens=L.int())",
    "ok: empty table and lengths 0": "paged(page_table=pt[:, :0], seq_lens=L * 0)",
    "ValueError: q int": "paged(q=q.long())",
    "ValueError: kv float16": "paged(k_cache=k.half(), v_cache=v.half())",
    "ValueError: kv float64": "paged(k_cache=k.double())",
    "ValueError: k bf16, v fp32": "paged(k_cache=k.bfloat16())",
    "ValueError: q rank 2": "paged(q=q[0])",
    "ValueError: k rank 3": "paged(k_cache=k[0], v_cache=v[0])",
    "ValueError: v other shape": "paged(v_cache=v[:9])",
    "ValueError: head_dim": "paged(q=q[..., :4])",
    "ValueError: GQA heads": "paged(q=q[:, :3])",
    "ValueError: meta q": "paged(q=q.to('meta'))",
    "ValueError: meta k": "paged(k_cache=k.to('meta'))",
    "ValueError: meta page table": "paged(page_table=pt.to('meta'))",
    "TypeError: numpy page table": "paged(page_table=pt.numpy())",
    "IndexError: page id -1": "paged(page_table=torch.tensor([[0, -1], [2, 3]]))",
    "IndexError: page id = num_pages": "paged(page_table=torch.tensor([[0, 10], [2, 3]]))",
    "IndexError: page id 2**40": "paged(page_table=torch.tensor([[0, 2**40], [2, 3]]))",
    "IndexError: int32 page id -5": "paged(page_table=torch.tensor([[0, -5], [2, 3]]).int())",
    "IndexError: padding page out of range": "paged(page_table=torch.tensor([[0, 99], [2, 3]]),"
                                             " seq_lens=torch.tensor([1, 8]))",
    "ValueError: length past the table": "paged(seq_lens=torch.tensor([5, 9]))",
    "ValueError: length 2**40": "paged(seq_lens=torch.tensor([5, 2**40]))",
    "ValueError: negative length": "paged(seq_lens=torch.tensor([-1, 8]))",
    "ValueError: table short of rows": "paged(page_table=pt[:1])",
    "ValueError: lengths short": "paged(seq_lens=L[:1])",
    "ValueError: lengths 0-dim": "paged(seq_lens=L[0])",
    "ValueError: float lengths": "paged(seq_lens=L.float())",
    "ValueError: bool lengths": "paged(seq_lens=L > 0)",
    "ValueError: table rank 1": "paged(page_table=pt[0])",
    "ValueError: empty batch, rows claimed": "paged(q=q[:0])",
    "ok: empty batch": "paged(q=q[:0], page_table=pt[:0], seq_lens=L[:0])",
    "ok: cascade": "casc()",
    "ok: cascade int32": "casc(group_rows=gr.int(), prefix_pages=pp.int(), prefix_lens=pl.int())",
    "ValueError: row twice": "casc(group_rows=torch.tensor([[0, 0]]))",
    "IndexError: row = batch": "casc(group_rows=torch.tensor([[0, 2]]))",
    "IndexError: row -2": "casc(group_rows=torch.tensor([[0, -2]]))",
    "ValueError: prefix rows != groups": "casc(prefix_pages=torch.tensor([[4, 5], [6, 7]]))",
    "ValueError: prefix lens count": "casc(prefix_lens=torch.tensor([6, 1]))",
    "ValueError: prefix past its pages": "casc(prefix_lens=torch.tensor([9]))",
    "IndexError: prefix page out of range": "casc(prefix_pages=torch.tensor([[4, 10]]))",
    "ValueError: suffix table short": "casc(suffix_pages=pt[:1])",
    "ValueError: suffix past its pages": "casc(suffix_lens=torch.tensor([9, 0]))",
    "ValueError: group rows rank 1": "casc(group_rows=gr[0])",
    "ValueError: ext q float64": "raw(q=n(q).astype(np.float64))",
    "ValueError: ext big-endian q": "raw(q=n(q).astype('>f4'))",
    "ValueError: ext big-endian table": "raw(page_table=n(pt).astype('>i8'))",
    "ValueError: ext unaligned k": "raw(k_cache=unaligned(n(k)))",
    "ValueError: ext fortran q": "raw(q=np.asfortranarray(n(q)))",
    "ValueError: ext uint64 table": "raw(page_table=n(pt).astype(np.uint64))",
    "ValueError: ext int32 lengths": "raw(seq_lens=n(L).astype(np.int32))",
    "ValueError: ext bf16 k with fp32 v": "raw(k_cache=n(k.bfloat16().view(torch.int16)))",
    "TypeError: ext list table": "raw(page_table=[[0, 1], [2, 3]])",
}


@needs_attention
def test_cpp_attention_bad_input_raises_in_a_subprocess():
    run_cases(ATTENTION_SETUP, ATTENTION_CASES)


NUMBA_SETUP = """
import numpy as np, torch
from brorl.kernels.decode_attention_numba import paged_decode_numba as P
from brorl.kernels.sampling_numba import sample_numba as S
from brorl.kernels.sampling import row_keys
g = torch.Generator().manual_seed(0)
q = torch.randn(2, 4, 8, generator=g); k = torch.randn(10, 4, 2, 8, generator=g); v = k + 1
pt = torch.tensor([[0, 1], [2, 3]]); L = torch.tensor([5, 8])
def paged(**kw):
    a = dict(q=q, k_cache=k, v_cache=v, page_table=pt, seq_lens=L, scale=0.5); a.update(kw)
    return P(**a)
x = torch.randn(3, 50, generator=g); t = torch.ones(3); keys = row_keys(0, 0, np.arange(3), 0)
def samp(**kw):
    a = dict(x=x, temperature=t, thr=None, keys=keys); a.update(kw)
    tok = S(**a)[0]
    assert ((tok >= 0) & (tok < a['x'].shape[1])).all(), tok
"""

NUMBA_CASES = {
    "ok: int32 tables": "paged(page_table=pt.int(), seq_lens=L.int())",
    "IndexError: page id 10**9": "paged(page_table=torch.tensor([[0, 10**9], [2, 3]]))",
    "IndexError: page id -10**9": "paged(page_table=torch.tensor([[0, -10**9], [2, 3]]))",
    "IndexError: page id = num_pages": "paged(page_table=torch.tensor([[0, 10], [2, 3]]))",
    "ValueError: length past the table": "paged(seq_lens=torch.tensor([5, 9]))",
    "ValueError: length 10**6": "paged(seq_lens=torch.tensor([5, 10**6]))",
    "ValueError: negative length": "paged(seq_lens=torch.tensor([-5, 8]))",
    "ValueError: table short of rows": "paged(page_table=pt[:1])",
    "ValueError: lengths short": "paged(seq_lens=L[:1])",
    "ValueError: head_dim": "paged(q=torch.randn(2, 4, 16))",
    "ValueError: v other shape": "paged(v_cache=v[:3])",
    "ValueError: q rank 2": "paged(q=q[0])",
    "ValueError: float table": "paged(page_table=pt.float())",
    "ValueError: meta k": "paged(k_cache=k.to('meta'))",
    "ValueError: GQA heads": "paged(q=q[:, :3])",
    "ok: empty batch": "paged(q=q[:0], page_table=pt[:0], seq_lens=L[:0])",
    "ok: sampler": "samp()",
    "ValueError: temperature short": "samp(temperature=t[:1])",
    "ValueError: thr short": "samp(thr=torch.zeros(1))",
    "ValueError: keys short": "samp(keys=keys[:1])",
    "ValueError: empty vocabulary": "samp(x=x[:, :0])",
    "ValueError: logits rank 1": "samp(x=x[0])",
    "ok: greedy NaN row": "samp(x=torch.where(torch.arange(50) == 7, float('nan'), x), "
                          "temperature=t * 0)",
}


def test_numba_bad_input_raises_in_a_subprocess():
    pytest.importorskip("numba")
    run_cases(NUMBA_SETUP, NUMBA_CASES)


# -- 4. the numba sampler on degenerate rows -----------------------------------------------
def test_numba_greedy_row_with_nan_takes_torch_argmax_and_every_token_is_in_range():
    """A greedy row with a NaN logit used to return token -1 (and read z[-1]); torch's
    argmax (the reference's) takes the first NaN. Rows with +-inf or NaN still give tokens
    in [0, V)."""
    pytest.importorskip("numba")
    import numpy as np

    from brorl.kernels.sampling import row_keys, sample_ref
    from brorl.kernels.sampling_numba import sample_numba

    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 40, generator=g)
    x[0, 7] = x[1, 0] = float("nan")
    x[2, 5] = x[3, 9] = float("inf")
    x[4] = float("-inf")
    x[4, 11] = 0.0
    x[5, 2] = float("nan")
    temperature = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    keys = row_keys(5, 0, np.arange(6), 0)
    tokens, _, _ = sample_numba(x, temperature, None, keys)
    assert ((tokens >= 0) & (tokens < 40)).all()
    zero = torch.zeros(6)
    ref, _ = sample_ref(x, temperature, zero.long(), zero + 1, zero, keys)
    assert tokens[:3].tolist() == ref[:3].tolist() == [7, 0, 5]
    assert tokens[4] == ref[4] == 11
