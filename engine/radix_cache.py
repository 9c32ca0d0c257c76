"""Radix prefix cache over token ids (SGLang's RadixAttention idea), page-granular: every
edge holds a whole number of pages, so nodes split only at page boundaries and a cached
prefix is always a list of whole pages.

Contract (what each method mutates):
- `match_prefix(ids)`: the longest cached whole-page prefix of ids. May split one node at
  a page boundary and refreshes LRU times; takes no reference and no lock.
- `lock(node)` / `unlock(node)`: a lock handle protects node and its ancestors from
  eviction. Whoever uses cached pages locks the deepest node it uses.
- `insert(ids, pages)`: adds the prefix; the cache takes its own reference to the pages it
  adopts. Where the prefix was already cached the caller's pages are not adopted: the
  returned page list is the canonical one, and the caller drops its duplicates. A page to
  adopt that is cached already (under any key) or listed twice is refused (ValueError,
  after the match_prefix; nothing else changes): one page holds one prefix's KV.
- `evict(n)`: frees at least n pages if it can, least recently used unlocked leaves first.
- `flush()`: drops every node (after a weight update the cached KV is stale).
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter

from brorl.engine.allocator import PageAllocator


class RadixNode:
    __slots__ = ("key", "pages", "children", "parent", "lock_ref", "last_access")

    def __init__(self, key: tuple[int, ...], pages: list[int], parent: RadixNode | None):
        self.key = key
        self.pages = pages
        self.children: dict[tuple[int, ...], RadixNode] = {}
        self.parent = parent
        self.lock_ref = 0  # lock handles held at this node or below
        self.last_access = 0


class RadixCache:
    def __init__(self, page_size: int, allocator: PageAllocator) -> None:
        self.page_size = page_size
        self.allocator = allocator
        self.root = RadixNode((), [], None)
        self.root.lock_ref = 1  # never evicted
        self._clock = itertools.count(1)
        self._handles: Counter = Counter()
        self.num_cached_pages = 0
        self.num_evictable_pages = 0
        self._cached: set[int] = set()  # every page a node holds

    # -- lookup ------------------------------------------------------------------------
    def match_prefix(self, token_ids) -> tuple[list[int], RadixNode]:
        """Pages of the longest cached whole-page prefix, and the node where it ends."""
        ps = self.page_size
        n_pages = len(token_ids) // ps
        node, pages, i = self.root, [], 0
        now = next(self._clock)
        node.last_access = now
        while i < n_pages:
            child = node.children.get(tuple(token_ids[i * ps:(i + 1) * ps]))
            if child is None:
                break
            j = self._common_pages(child.key, token_ids, i)
            if j < len(child.pages):
                child = self._split(child, j)
            pages.extend(child.pages)
            child.last_access = now
            node, i = child, i + j
        return pages, node

    def _common_pages(self, key: tuple[int, ...], token_ids, first_page: int) -> int:
        ps = self.page_size
        n = min(len(key) // ps, len(token_ids) // ps - first_page)
        j = 1  # the first page matched through the children dict
        base = first_page * ps
        while j < n:
            lo = j * ps
            if tuple(token_ids[base + lo:base + lo + ps]) != key[lo:lo + ps]:
                break
            j += 1
        return j

    def _split(self, node: RadixNode, j: int) -> RadixNode:
        """Splits node after its j-th page; returns the new upper part."""
        ps = self.page_size
        mid = RadixNode(node.key[:j * ps], node.pages[:j], node.parent)
        mid.lock_ref, mid.last_access = node.lock_ref, node.last_access
        node.parent.children[mid.key[:ps]] = mid
        node.key, node.pages, node.parent = node.key[j * ps:], node.pages[j:], mid
        mid.children[node.key[:ps]] = node
        return mid

    # -- insertion ---------------------------------------------------------------------
    def insert(self, token_ids, pages: list[int]) -> tuple[list[int], RadixNode]:
        """Caches token_ids (len == len(pages) * page_size). Returns (canonical pages,
        deepest node)."""
        ps = self.page_size
        if len(token_ids) != len(pages) * ps:
            raise ValueError(f"insert needs whole pages: {len(token_ids)} tokens, "
                             f"{len(pages)} pages of {ps}")
        cached, node = self.match_prefix(token_ids)
        i = len(cached)
        if i == len(pages):
            return cached, node
        fresh = set(pages[i:])
        if len(fresh) < len(pages) - i or not fresh.isdisjoint(self._cached):
            bad = next(p for k, p in enumerate(pages[i:], i)
                       if p in self._cached or p in pages[i:k])
            raise ValueError(f"insert of page {bad}, which is cached already or listed twice")
        self._cached |= fresh
        new = RadixNode(tuple(token_ids[i * ps:]), list(pages[i:]), node)
        new.last_access = next(self._clock)
        node.children[new.key[:ps]] = new
        self.allocator.incref(new.pages)
        self.num_cached_pages += len(new.pages)
        self.num_evictable_pages += len(new.pages)
        return cached + new.pages, new

    # -- locks -------------------------------------------------------------------------
    def lock(self, node: RadixNode) -> None:
        self._handles[node] += 1
        while node is not None:
            if node.lock_ref == 0:
                self.num_evictable_pages -= len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: RadixNode) -> None:
        assert self._handles[node] > 0, "unlock without a lock"
        self._handles[node] -= 1
        if self._handles[node] == 0:
            del self._handles[node]
        while node is not None:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.num_evictable_pages += len(node.pages)
            node = node.parent

    # -- eviction ----------------------------------------------------------------------
    def evict(self, num_pages: int) -> int:
        """Removes unlocked leaves, LRU first, until num_pages pages were freed or nothing
        is evictable. Returns the number of pages freed."""
        leaves = [(n.last_access, id(n), n) for n in self._nodes()
                  if not n.children and n.lock_ref == 0]
        heapq.heapify(leaves)
        freed = 0
        while leaves and freed < num_pages:
            _, _, node = heapq.heappop(leaves)
            parent = node.parent
            del parent.children[node.key[:self.page_size]]
            self.num_cached_pages -= len(node.pages)
            self.num_evictable_pages -= len(node.pages)
            self._cached.difference_update(node.pages)
            freed += self.allocator.decref(node.pages)
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, (parent.last_access, id(parent), parent))
        return freed

    def flush(self) -> None:
        """Drops every node. Only allowed while no lock handle is held."""
        if self._handles:
            raise RuntimeError("cannot flush the prefix cache while requests hold locks")
        for node in self._nodes():
            self.allocator.decref(node.pages)
        self.root.children = {}
        self._cached.clear()
        self.num_cached_pages = self.num_evictable_pages = 0

    # -- checks ------------------------------------------------------------------------
    def _nodes(self) -> list[RadixNode]:
        out, stack = [], list(self.root.children.values())
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(n.children.values())
        return out

    def page_holders(self) -> Counter:
        """One reference per cached page."""
        return Counter(p for n in self._nodes() for p in n.pages)

    def check_integrity(self) -> None:
        """Shapes of keys and pages, child keys, lock counts and page accounting agree."""
        ps, seen = self.page_size, set()
        cached = evictable = 0

        order, stack = [], [self.root]  # iterative: a chain of single-page nodes is deep
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(node.children.values())
        for node in reversed(order):  # children before their parent
            below = sum(c.lock_ref for c in node.children.values())
            for first, c in node.children.items():
                assert c.parent is node and c.key[:ps] == first, "bad child link"
            if node is self.root:
                continue
            assert len(node.key) == len(node.pages) * ps and node.pages, "key/page mismatch"
            assert node.lock_ref == self._handles.get(node, 0) + below, "bad lock_ref"
            for p in node.pages:
                assert p not in seen, f"page {p} cached twice"
                assert self.allocator.refcount[p] >= 1, f"cached page {p} is free"
                seen.add(p)
            cached += len(node.pages)
            evictable += len(node.pages) if node.lock_ref == 0 else 0
        assert cached == self.num_cached_pages, "num_cached_pages out of sync"
        assert seen == self._cached, "cached-page set out of sync"
        assert evictable == self.num_evictable_pages, "num_evictable_pages out of sync"
