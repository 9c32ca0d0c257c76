"""The C++ page allocator and radix cache (`brorl.engine._cache_ext`, built from csrc/cache/) behind
exactly the Python API of `brorl.engine.allocator.PageAllocator` and `brorl.engine.radix_cache.
RadixCache`, and the factory that picks one implementation for the engine.

Which one runs: `BRORL_CACHE_IMPL=python|cpp` forces one (cpp without the built extension
is an error); unset or `auto` takes the C++ one when the extension is built. The Python
classes stay the reference the C++ ones are tested against (tests/csrc/test_cache_ext.py).

Differences, all on caller errors the Python classes only `assert` or let through: the
C++ ones raise ValueError for incref/decref of a free page, unlock without a lock, a stale
node handle and a negative count; an
evict or flush that meets a page whose cache reference the caller dropped raises
ValueError and leaves that node (flush: the whole tree) as it was; IndexError for a page
outside the pool; TypeError for a token or page that is not an int. They change nothing
when they raise (Python's decref has already dropped the references before the bad
page). Both refuse, with the same ValueError, an insert that would adopt a page already
cached (under any key) or listed twice; that refused insert has done its match_prefix
(LRU times, a split).
"""

from __future__ import annotations

import importlib
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

from brorl.engine.allocator import OutOfPages, PageAllocator
from brorl.engine.radix_cache import RadixCache

ENV_VAR = "BRORL_CACHE_IMPL"
CACHE_IMPLS = ("auto", "python", "cpp")

__all__ = ["CppPageAllocator", "CppRadixCache", "OutOfPages", "cache_impl", "extension_built",
           "make_cache"]


def _ext() -> Any:
    return importlib.import_module("brorl.engine._cache_ext")


def extension_built() -> bool:
    """True when `brorl.engine._cache_ext` imports (built by `python setup.py build_ext`)."""
    try:
        _ext()
    except ImportError:
        return False
    return True


def cache_impl(requested: str | None = None) -> str:
    """Resolves `requested` (default: $BRORL_CACHE_IMPL, else "auto") to "cpp" or "python"."""
    name = (requested or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if name not in CACHE_IMPLS:
        raise ValueError(f"unknown cache implementation {name!r} ({ENV_VAR}); supported: "
                         f"{', '.join(CACHE_IMPLS)}")
    if name == "auto":
        return "cpp" if extension_built() else "python"
    if name == "cpp" and not extension_built():
        raise ValueError(f"{ENV_VAR}=cpp but the C++ extension brorl.engine._cache_ext is "
                         "not built; run `python setup.py build_ext --inplace`")
    return name


def make_cache(num_pages: int, page_size: int, impl: str | None = None
               ) -> tuple[PageAllocator | CppPageAllocator, RadixCache | CppRadixCache, str]:
    """(allocator, radix cache, "cpp" | "python") for a pool of num_pages pages."""
    name = cache_impl(impl)
    if name == "cpp":
        alloc = CppPageAllocator(num_pages)
        return alloc, CppRadixCache(page_size, alloc), name
    alloc = PageAllocator(num_pages)
    return alloc, RadixCache(page_size, alloc), name


class CppPageAllocator:
    """`PageAllocator` in C++: same methods, same page order, OutOfPages on exhaustion."""

    def __init__(self, num_pages: int) -> None:
        self._impl = _ext().PageAllocator(num_pages)
        self.num_pages: int = num_pages

    @property
    def num_free(self) -> int:
        return self._impl.num_free

    @property
    def refcount(self) -> Sequence[int]:
        """Read-only live view: len, indexing (negative too), slicing, iteration."""
        return self._impl.refcount

    def alloc(self, n: int) -> list[int]:
        """n fresh pages with one reference each. Raises OutOfPages (nothing taken)."""
        return self._impl.alloc(n)

    def incref(self, pages: Sequence[int]) -> None:
        """One more reference to each (held) page."""
        self._impl.incref(pages)

    def decref(self, pages: Sequence[int]) -> int:
        """Drops one reference of each page; returns how many pages became free."""
        return self._impl.decref(pages)

    def free_stack(self) -> list[int]:
        """The free pages, the next one to be handed out last (as Python's `_free`)."""
        return self._impl.free_stack()

    def check_integrity(self, expected: Counter | None = None) -> None:
        """Free list and reference counts agree (and equal `expected`, page -> holders);
        raises AssertionError naming the first problem, as the Python allocator does."""
        err = self._impl.check_integrity(None if expected is None else dict(expected))
        if err:
            raise AssertionError(err)


class CppRadixCache:
    """`RadixCache` in C++ over a `CppPageAllocator`. Node handles (`_cache_ext.RadixNode`)
    work with lock/unlock and show `key`, `pages`, `lock_ref`, `parent` of a live node;
    a handle of an evicted node raises ValueError instead of corrupting the tree."""

    def __init__(self, page_size: int, allocator: CppPageAllocator) -> None:
        if not isinstance(allocator, CppPageAllocator):
            raise TypeError("the C++ radix cache needs a CppPageAllocator, got "
                            f"{type(allocator).__name__}")
        self.page_size = page_size
        self.allocator = allocator
        self._impl = _ext().RadixTree(page_size, allocator._impl)

    @property
    def root(self) -> Any:
        return self._impl.root

    @property
    def num_cached_pages(self) -> int:
        return self._impl.num_cached_pages

    @property
    def num_evictable_pages(self) -> int:
        return self._impl.num_evictable_pages

    def match_prefix(self, token_ids: Sequence[int]) -> tuple[list[int], Any]:
        """Pages of the longest cached whole-page prefix, and the node where it ends."""
        return self._impl.match_prefix(token_ids)

    def insert(self, token_ids: Sequence[int], pages: Sequence[int]) -> tuple[list[int], Any]:
        """Caches token_ids (len == len(pages) * page_size). Returns (canonical pages,
        deepest node)."""
        return self._impl.insert(token_ids, pages)

    def lock(self, node: Any) -> None:
        """Protects node and its ancestors from eviction."""
        self._impl.lock(node)

    def unlock(self, node: Any) -> None:
        """Releases one lock handle taken with `lock(node)`."""
        self._impl.unlock(node)

    def evict(self, num_pages: int) -> int:
        """Removes unlocked leaves, LRU first, until num_pages pages were freed or nothing
        is evictable. Returns the number of pages freed."""
        return self._impl.evict(num_pages)

    def flush(self) -> None:
        """Drops every node; RuntimeError while a lock handle is held."""
        self._impl.flush()

    def page_holders(self) -> Counter:
        """One reference per cached page."""
        return Counter(self._impl.cached_pages())

    def check_integrity(self) -> None:
        """Keys, pages, child links, lock counts and page accounting agree; raises
        AssertionError naming the first problem."""
        err = self._impl.check_integrity()
        if err:
            raise AssertionError(err)
