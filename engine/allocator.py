"""Page allocator with reference counts. Holders of a page: the radix cache (one reference
per cached page), a group (its shared prompt pages and its tail page), and a sample (its
private pages). A page returns to the free list when its last reference is dropped."""

from __future__ import annotations

from collections import Counter


class OutOfPages(RuntimeError):
    """Raised by `alloc` when fewer pages are free than requested."""


class PageAllocator:
    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"the KV pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self.refcount = [0] * num_pages
        # A stack popped from the end: a fresh pool hands out ascending, contiguous pages.
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        """n fresh pages with one reference each. Raises OutOfPages (nothing taken)."""
        if n > len(self._free):
            raise OutOfPages(f"need {n} KV pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self.refcount[p] = 1
        return pages

    def incref(self, pages: list[int]) -> None:
        for p in pages:
            assert self.refcount[p] > 0, f"incref of free page {p}"
            self.refcount[p] += 1

    def decref(self, pages: list[int]) -> int:
        """Drops one reference of each page; returns how many pages became free."""
        freed = 0
        for p in pages:
            assert self.refcount[p] > 0, f"decref of free page {p}"
            self.refcount[p] -= 1
            if self.refcount[p] == 0:
                self._free.append(p)
                freed += 1
        return freed

    def check_integrity(self, expected: Counter | None = None) -> None:
        """Free list and reference counts agree; with `expected` (page -> number of
        holders, counted from every holder), the counts are exactly those."""
        free = set(self._free)
        assert len(free) == len(self._free), "a page is on the free list twice"
        for p, rc in enumerate(self.refcount):
            assert rc >= 0, f"page {p} has negative refcount"
            assert (rc == 0) == (p in free), f"page {p}: refcount {rc}, free={p in free}"
        if expected is not None:
            for p, rc in enumerate(self.refcount):
                assert rc == expected.get(p, 0), (
                    f"page {p}: refcount {rc} but {expected.get(p, 0)} holders")
