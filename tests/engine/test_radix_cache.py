import random

import pytest

from brorl.engine.allocator import OutOfPages
from brorl.engine.cache_ext import extension_built, make_cache

PS = 4
IMPLS = ["python", pytest.param("cpp", marks=pytest.mark.skipif(
    not extension_built(), reason="brorl.engine._cache_ext is not built"))]


@pytest.fixture(params=IMPLS)
def impl(request):
    """Every test runs on the Python reference and on the C++ extension (when built)."""
    return request.param


def cache_with(impl, num_pages=64):
    alloc, cache, _ = make_cache(num_pages, PS, impl)
    return cache, alloc


def insert_fresh(cache, alloc, ids):
    """Inserts ids (whole pages) with freshly allocated pages; drops the caller's refs."""
    pages = alloc.alloc(len(ids) // PS)
    canonical, node = cache.insert(ids, pages)
    alloc.decref(pages)  # the cache keeps its own references
    return canonical, node


def test_allocator_refcounts_and_exhaustion(impl):
    a, _, _ = make_cache(4, PS, impl)
    pages = a.alloc(3)
    assert pages == [0, 1, 2] and a.num_free == 1
    with pytest.raises(OutOfPages):
        a.alloc(2)
    assert a.num_free == 1  # a failed alloc takes nothing
    a.incref([0])
    assert a.decref([0, 1]) == 1  # page 1 freed, page 0 still held
    a.check_integrity()
    assert a.decref([0, 2]) == 2 and a.num_free == 4


def test_match_returns_only_whole_pages_and_splits_at_page_boundaries(impl):
    cache, alloc = cache_with(impl)
    ids = list(range(100, 112))  # 3 pages
    pages, _ = insert_fresh(cache, alloc, ids)
    assert cache.match_prefix(ids[:11])[0] == pages[:2]  # partial third page not matched
    assert cache.match_prefix(ids[:8] + [0, 0, 0, 0])[0] == pages[:2]  # forces a split
    other = ids[:4] + [7, 7, 7, 7]
    p2, _ = insert_fresh(cache, alloc, other)
    assert p2[0] == pages[0] and p2[1] != pages[1]
    assert cache.num_cached_pages == 4
    cache.check_integrity()


def test_insert_of_cached_prefix_keeps_canonical_pages(impl):
    cache, alloc = cache_with(impl)
    ids = list(range(8))
    pages, _ = insert_fresh(cache, alloc, ids)
    dup = alloc.alloc(2)
    canonical, _ = cache.insert(ids, dup)
    assert canonical == pages
    assert alloc.decref(dup) == 2  # duplicates were not adopted
    cache.check_integrity()


def test_locked_prefixes_survive_eviction_and_lru_goes_first(impl):
    cache, alloc = cache_with(impl, num_pages=6)
    _, a = insert_fresh(cache, alloc, [1] * 8)
    _, b = insert_fresh(cache, alloc, [2] * 8)
    _, c = insert_fresh(cache, alloc, [3] * 8)
    cache.lock(a)
    cache.match_prefix([2] * 8)  # b is now more recent than c
    assert cache.num_evictable_pages == 4
    assert cache.evict(1) == 2  # the whole LRU leaf (c)
    assert cache.match_prefix([3] * 8)[0] == []
    assert cache.match_prefix([2] * 8)[0] != []
    assert cache.evict(100) == 2  # only b remains evictable
    assert len(cache.match_prefix([1] * 8)[0]) == 2
    with pytest.raises(RuntimeError):
        cache.flush()
    cache.unlock(a)
    cache.flush()
    assert alloc.num_free == 6
    cache.check_integrity()


def still_cached(cache, cached):
    """Forgets evicted prefixes: keeps those the cache still matches in full."""
    return {k: v for k, v in cached.items()
            if len(cache.match_prefix(list(k))[0]) == len(k) // PS}


def test_random_operations_keep_cache_consistent_with_a_naive_model(impl):
    """Insert/match/lock/unlock/evict at random; after each operation the cache agrees
    with a plain dict of cached page-prefixes and passes check_integrity."""
    rng = random.Random(0)
    cache, alloc = cache_with(impl, num_pages=48)
    cached: dict[tuple, int] = {}  # whole-page prefix -> page of its last page
    locks = []
    for _ in range(600):
        op = rng.random()
        ids = [rng.randrange(3) for _ in range(PS * rng.randrange(1, 5))]
        if op < 0.45:
            n_pages = len(ids) // PS  # insert_fresh allocates duplicates too
            if n_pages > alloc.num_free:
                cache.evict(n_pages - alloc.num_free)
                cached = still_cached(cache, cached)
            if n_pages > alloc.num_free:
                continue
            pages, node = insert_fresh(cache, alloc, ids)
            for j in range(1, len(pages) + 1):
                cached[tuple(ids[:j * PS])] = pages[j - 1]
            if rng.random() < 0.3:
                cache.lock(node)
                locks.append(node)
        elif op < 0.8:
            pages, _ = cache.match_prefix(ids)
            expect = 0
            while expect < len(ids) // PS and tuple(ids[:(expect + 1) * PS]) in cached:
                expect += 1
            assert len(pages) == expect
            assert pages == [cached[tuple(ids[:(j + 1) * PS])] for j in range(expect)]
        elif op < 0.9 and locks:
            cache.unlock(locks.pop(rng.randrange(len(locks))))
        else:
            cache.evict(rng.randrange(1, 6))
            cached = still_cached(cache, cached)
        cache.check_integrity()
        alloc.check_integrity(cache.page_holders())
    for node in locks:
        cache.unlock(node)
    cache.flush()
    assert alloc.num_free == 48


def test_integrity_check_of_a_very_deep_chain(impl):
    """A prefix extended one page at a time makes a chain of nodes as deep as it is long
    (1500 here); the check walks it without recursion (the Python one recursed and raised
    RecursionError past about 1000)."""
    alloc, cache, _ = make_cache(1600, 1, impl)
    ids = []
    for t in range(1500):
        ids.append(t % 7 + 3)
        pages = alloc.alloc(1)
        if t:
            pages = [*cache.match_prefix(ids[:-1])[0], *pages]
        cache.insert(ids, pages)
        alloc.decref(pages[-1:])  # the cache keeps its own reference to the new page
    assert cache.num_cached_pages == 1500
    cache.check_integrity()


def test_insert_refuses_a_page_cached_already_or_listed_twice_and_changes_nothing(impl):
    """One page holds one prefix's KV: adopting a cached page under another key, or the
    same page twice, would leave two nodes owning one page (evicting one frees the other's
    KV). Both implementations refuse before anything is adopted."""
    cache, alloc = cache_with(impl, num_pages=16)
    a, _ = insert_fresh(cache, alloc, list(range(2 * PS)))
    b = alloc.alloc(2)
    before = (list(alloc.refcount), cache.num_cached_pages, cache.num_evictable_pages)
    other = [100 + t for t in range(2 * PS)]
    with pytest.raises(ValueError, match=f"insert of page {a[1]}, which is cached already"):
        cache.insert(other, [b[0], a[1]])
    with pytest.raises(ValueError, match=f"insert of page {b[0]}, which is cached already or "
                                         "listed twice"):
        cache.insert(other, [b[0], b[0]])
    assert (list(alloc.refcount), cache.num_cached_pages, cache.num_evictable_pages) == before
    cache.check_integrity()
    assert cache.match_prefix(other)[0] == []
    # the refused pages are still the caller's to insert properly, and evicted pages may
    # be cached again under a new key
    assert cache.insert(other, b)[0] == b
    alloc.decref(b)
    assert cache.evict(4) == 4
    c = alloc.alloc(2)
    assert cache.insert(list(range(50, 50 + 2 * PS)), c)[0] == c
    cache.check_integrity()
