"""The C++ page allocator and radix cache (brorl.engine._cache_ext via engine/cache_ext.py) against
the Python reference: random operation sequences applied to both side by side and compared
after every step, bad input that must raise (never crash), and the engine on both."""

import random
from collections import Counter

import pytest

from brorl.engine.allocator import OutOfPages, PageAllocator
from brorl.engine.cache_ext import (
    CppPageAllocator,
    CppRadixCache,
    cache_impl,
    extension_built,
    make_cache,
)
from brorl.engine.radix_cache import RadixCache

pytestmark = pytest.mark.skipif(not extension_built(),
                                reason="brorl.engine._cache_ext is not built")


class Twin:
    """The Python and the C++ cache driven by one call; every call's results must agree."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        self.ps = page_size
        self.py_alloc = PageAllocator(num_pages)
        self.py = RadixCache(page_size, self.py_alloc)
        self.cpp_alloc = CppPageAllocator(num_pages)
        self.cpp = CppRadixCache(page_size, self.cpp_alloc)

    def both(self, method: str, *args, on: str = "cache"):
        a = getattr(self.py if on == "cache" else self.py_alloc, method)(*args)
        b = getattr(self.cpp if on == "cache" else self.cpp_alloc, method)(*args)
        return a, b

    def same_node(self, py_node, cpp_node) -> None:
        assert cpp_node.alive
        assert tuple(py_node.key) == cpp_node.key and py_node.pages == cpp_node.pages
        assert py_node.lock_ref == cpp_node.lock_ref
        while py_node.parent is not None:  # the same path up to the root
            py_node, cpp_node = py_node.parent, cpp_node.parent
            assert tuple(py_node.key) == cpp_node.key
        assert cpp_node.parent is None and cpp_node == self.cpp.root

    def check(self, held: list[int], locks: list) -> None:
        """Counts, refcounts, the free stack, cached pages and both integrity checks agree."""
        assert self.py.num_cached_pages == self.cpp.num_cached_pages
        assert self.py.num_evictable_pages == self.cpp.num_evictable_pages
        assert self.py_alloc.num_free == self.cpp_alloc.num_free
        assert self.py_alloc.refcount == list(self.cpp_alloc.refcount)
        assert self.py_alloc._free == self.cpp_alloc.free_stack()
        assert self.py.page_holders() == self.cpp.page_holders()
        for py_node, cpp_node in locks:
            self.same_node(py_node, cpp_node)
        self.py.check_integrity()
        self.cpp.check_integrity()
        holders = self.cpp.page_holders() + Counter(held)
        self.py_alloc.check_integrity(holders)
        self.cpp_alloc.check_integrity(holders)


def random_step(t: Twin, rng: random.Random, held: list[int], locks: list) -> None:
    """One random operation on both caches; asserts that their results agree."""
    ps = t.ps
    ids = [rng.randrange(3) for _ in range(ps * rng.randrange(0, 6))]
    op = rng.random()
    if op < 0.3:  # insert, with fresh pages or reusing the canonical pages of a match
        (ma, mna), (mb, mnb) = t.both("match_prefix", ids)
        assert ma == mb
        reuse = ma if rng.random() < 0.5 else []
        need = len(ids) // ps - len(reuse)
        t.py.lock(mna)  # as the engine does: the matched prefix survives the eviction
        t.cpp.lock(mnb)
        if need > t.py_alloc.num_free:
            a, b = t.both("evict", need - t.py_alloc.num_free)
            assert a == b
        t.py.unlock(mna)
        t.cpp.unlock(mnb)
        if need > t.py_alloc.num_free:
            return
        fresh = t.both("alloc", need, on="alloc")
        assert fresh[0] == fresh[1]
        pages = reuse + fresh[0]
        (pa, na), (pb, nb) = t.both("insert", ids, pages)
        assert pa == pb
        t.same_node(na, nb)
        if rng.random() < 0.7:  # the cache holds its own references now
            a, b = t.both("decref", fresh[0], on="alloc")
            assert a == b
        else:
            held.extend(fresh[0])
        if rng.random() < 0.3:
            t.py.lock(na)
            t.cpp.lock(nb)
            locks.append((na, nb))
    elif op < 0.55:
        (pa, na), (pb, nb) = t.both("match_prefix", ids)
        assert pa == pb
        t.same_node(na, nb)
        if rng.random() < 0.3:
            t.py.lock(na)
            t.cpp.lock(nb)
            locks.append((na, nb))
    elif op < 0.65 and locks:
        na, nb = locks.pop(rng.randrange(len(locks)))
        t.py.unlock(na)
        t.cpp.unlock(nb)
    elif op < 0.75:
        a, b = t.both("evict", rng.randrange(0, 8))
        assert a == b
    elif op < 0.78:
        if locks:
            with pytest.raises(RuntimeError):
                t.py.flush()
            with pytest.raises(RuntimeError):
                t.cpp.flush()
        else:
            t.both("flush")
    elif op < 0.86:
        n = rng.randrange(0, 4)
        if n > t.py_alloc.num_free:
            with pytest.raises(OutOfPages):
                t.py_alloc.alloc(n)
            with pytest.raises(OutOfPages):
                t.cpp_alloc.alloc(n)
        else:
            a, b = t.both("alloc", n, on="alloc")
            assert a == b
            held.extend(a)
    elif op < 0.93 and held:
        pages = rng.sample(held, rng.randrange(1, min(4, len(held)) + 1))
        t.both("incref", pages, on="alloc")
        held.extend(pages)
    elif held:
        pages = [held.pop(rng.randrange(len(held))) for _ in range(rng.randrange(1, 4))
                 if held]
        a, b = t.both("decref", pages, on="alloc")
        assert a == b


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("page_size", [1, 2, 4])
def test_random_operations_agree_with_the_python_reference_step_by_step(seed, page_size):
    """insert / match / lock / unlock / evict / flush / alloc / incref / decref at random:
    after every step both give the same pages, nodes, counts, refcounts and free stack."""
    rng = random.Random(seed * 10 + page_size)
    t = Twin(num_pages=rng.choice([8, 24, 48]), page_size=page_size)
    held: list[int] = []
    locks: list = []
    for _ in range(300):
        random_step(t, rng, held, locks)
        t.check(held, locks)
    for na, nb in locks:
        t.py.unlock(na)
        t.cpp.unlock(nb)
    t.both("flush")
    t.both("decref", held, on="alloc")
    t.check([], [])
    assert t.cpp_alloc.num_free == t.cpp_alloc.num_pages


def cpp_cache(num_pages=8, page_size=2):
    alloc = CppPageAllocator(num_pages)
    return CppRadixCache(page_size, alloc), alloc


def test_allocator_bad_input_raises_and_changes_nothing():
    with pytest.raises(ValueError, match="at least one page"):
        CppPageAllocator(0)
    a = CppPageAllocator(4)
    a.alloc(2)  # pages 0, 1
    before = (list(a.refcount), a.free_stack())
    with pytest.raises(ValueError, match="decref of free page 3"):
        a.decref([0, 1, 3])  # 0 and 1 would be freed first: the C++ one undoes that
    with pytest.raises(ValueError, match="decref of free page 1"):
        a.decref([1, 1])  # listed more often than it is held
    with pytest.raises(ValueError, match="incref of free page 2"):
        a.incref([0, 2])
    with pytest.raises(IndexError):
        a.incref([4])
    with pytest.raises(IndexError):
        a.decref([-1])
    with pytest.raises(ValueError):
        a.alloc(-1)
    with pytest.raises(OutOfPages, match="need 3 KV pages, 2 free"):
        a.alloc(3)
    with pytest.raises(TypeError):
        a.decref([0.0])
    with pytest.raises(TypeError):
        a.incref(["0"])
    with pytest.raises(TypeError):
        a.alloc("1")
    with pytest.raises(TypeError):
        a.incref([2**70])
    assert (list(a.refcount), a.free_stack()) == before
    a.check_integrity()
    with pytest.raises(AssertionError, match="page 0: refcount 1 but 2 holders"):
        a.check_integrity(Counter({0: 2, 1: 1}))
    assert a.refcount[-4] == 1 and a.refcount[1:3] == [1, 0] and len(a.refcount) == 4
    with pytest.raises(IndexError):
        a.refcount[4]


def test_radix_bad_input_raises_and_the_tree_stays_consistent():
    with pytest.raises(TypeError, match="CppPageAllocator"):
        CppRadixCache(2, PageAllocator(4))
    with pytest.raises(ValueError, match="page_size"):
        CppRadixCache(0, CppPageAllocator(4))
    cache, alloc = cpp_cache()
    pages = alloc.alloc(2)
    with pytest.raises(ValueError, match="whole pages"):
        cache.insert([1, 2, 3], pages)
    with pytest.raises(ValueError, match="free page 7"):
        cache.insert([1, 2, 3, 4], [pages[0], 7])
    with pytest.raises(IndexError):
        cache.insert([1, 2, 3, 4], [pages[0], 99])
    for bad in (["a", "b"], [1.5, 2], [None, 1], "ab", 12, [2**64, 1]):
        with pytest.raises(TypeError):
            cache.match_prefix(bad)
        with pytest.raises(TypeError):
            cache.insert(bad, pages[:1])
    _, node = cache.insert([1, 2, 3, 4], pages)
    alloc.decref(pages)
    with pytest.raises(ValueError, match="unlock without a lock"):
        cache.unlock(node)
    with pytest.raises(ValueError):
        cache.evict(-1)
    other, _ = cpp_cache()
    with pytest.raises(ValueError, match="another radix cache"):
        other.lock(node)
    with pytest.raises(TypeError):
        cache.lock("not a node")
    cache.lock(node)
    with pytest.raises(RuntimeError, match="hold locks"):
        cache.flush()
    cache.unlock(node)
    assert cache.evict(10) == 2 and not node.alive
    with pytest.raises(ValueError, match="no longer in the cache"):
        cache.lock(node)  # a stale handle is refused, not dereferenced
    with pytest.raises(ValueError):
        _ = node.key
    cache.check_integrity()
    alloc.check_integrity(cache.page_holders())
    assert alloc.num_free == 8


def test_node_handles_follow_splits_like_python_nodes():
    """After a split the old handle is the lower part (as the Python node object is)."""
    cache, alloc = cpp_cache(page_size=2)
    pages = alloc.alloc(3)
    _, node = cache.insert([1, 2, 3, 4, 5, 6], pages)
    cache.lock(node)
    got, mid = cache.match_prefix([1, 2, 9, 9])
    assert got == pages[:1] and mid.key == (1, 2) and mid.pages == pages[:1]
    assert node.key == (3, 4, 5, 6) and node.parent == mid and mid.parent == cache.root
    assert mid.lock_ref == 1 and cache.num_evictable_pages == 0
    assert hash(node) == hash(cache.insert([1, 2, 3, 4, 5, 6], pages)[1])
    cache.unlock(node)
    cache.check_integrity()


def test_cache_impl_choice(monkeypatch):
    monkeypatch.delenv("BRORL_CACHE_IMPL", raising=False)
    assert cache_impl() == "cpp"
    monkeypatch.setenv("BRORL_CACHE_IMPL", "python")
    alloc, radix, name = make_cache(4, 2)
    assert name == "python" and type(radix) is RadixCache and type(alloc) is PageAllocator
    monkeypatch.setenv("BRORL_CACHE_IMPL", "fortran")
    with pytest.raises(ValueError, match="supported: auto, python, cpp"):
        make_cache(4, 2)
    assert cache_impl("cpp") == "cpp"


def test_engine_gives_the_same_samples_and_stats_on_both(monkeypatch, qwen2):
    """A small pool (preemptions, evictions, a flush) on the Python and the C++ cache."""
    from brorl.engine import Engine, SamplingParams

    prompts = [list(range(5, 25)), list(range(5, 21)) + [60, 61], list(range(40, 47))]
    params = SamplingParams(n=4, max_tokens=16, seed=7, ignore_eos=True)
    results = {}
    for impl in ("python", "cpp"):
        monkeypatch.setenv("BRORL_CACHE_IMPL", impl)
        eng = Engine(qwen2[0], page_size=4, max_kv_tokens=32 * 4, reserve_ratio=0.0,
                     debug_integrity=True)
        outs = eng.generate(prompts, params)
        outs += eng.generate(prompts[:1], params)  # reuses the cached prompt
        stats = eng.stats()
        assert stats["cache_impl"] == impl
        eng.update_weights({})
        assert eng.stats()["free_pages"] == eng.stats()["num_pages"]
        results[impl] = ([[c.token_ids for c in o.outputs] for o in outs],
                         {k: stats[k] for k in ("prefill_tokens", "cached_prompt_tokens",
                                                "decode_tokens", "preemptions", "free_pages",
                                                "cached_pages")})
    assert results["cpp"] == results["python"]
    assert results["cpp"][1]["preemptions"] > 0 and results["cpp"][1]["cached_prompt_tokens"] > 0


def test_token_ids_may_be_any_int_sequence_like_in_python():
    import numpy as np

    cache, alloc = cpp_cache(page_size=2)
    pages = alloc.alloc(2)
    cache.insert((4, 5, 6, 7), pages)
    for ids in ([4, 5, 6, 7, 8], (4, 5, 6, 7), range(4, 8), np.arange(4, 8), [4, 5, True, 7]):
        assert cache.match_prefix(ids)[0] == (pages if ids[2] == 6 else pages[:1])
    with pytest.raises(TypeError, match="item 1 is float"):
        cache.match_prefix([4, 5.0])


def test_a_huge_page_size_cannot_wrap_the_whole_pages_check():
    # 4 pages x 2**62 tokens wrapped to 0 in size_t: an empty insert passed and crashed
    alloc = CppPageAllocator(8)
    cache = CppRadixCache(2**62, alloc)
    with pytest.raises(ValueError, match="whole pages"):
        cache.insert([], alloc.alloc(4))
