"""Request-level page operations over the allocator, the radix cache and the KV pool:
matching and caching prompts, forking samples, growing and freeing page tables."""

from __future__ import annotations

from collections import Counter

from brorl.engine.allocator import OutOfPages
from brorl.engine.cache_ext import make_cache
from brorl.engine.kv_pool import KVPool
from brorl.engine.request import Group, Sequence, pages_for


class CacheManager:
    def __init__(self, kv: KVPool, page_size: int) -> None:
        self.kv = kv
        self.page_size = page_size
        # C++ radix tree + allocator when built (BRORL_CACHE_IMPL forces one), else Python.
        self.allocator, self.radix, self.impl = make_cache(kv.num_pages, page_size)
        self._tail_copies: list[tuple[int, int]] = []  # (group tail page, sample's page)

    @property
    def available_pages(self) -> int:
        """Pages free now or freeable by evicting unlocked cached prefixes."""
        return self.allocator.num_free + self.radix.num_evictable_pages

    def alloc(self, n: int) -> list[int]:
        """n pages, evicting cached prefixes if needed. Raises OutOfPages."""
        if n > self.allocator.num_free:
            self.radix.evict(n - self.allocator.num_free)
        return self.allocator.alloc(n)

    # -- groups --------------------------------------------------------------------------
    def match_and_lock(self, group: Group) -> list[int]:
        """Locks the longest cached whole-page prefix of the prompt, leaving at least one
        token to compute (its logits start the samples). Returns the cached pages."""
        pages, node = self.radix.match_prefix(group.prompt_ids[:group.prompt_len - 1])
        self.radix.lock(node)
        group.lock_node = node
        return pages

    def unlock(self, group: Group) -> None:
        if group.lock_node is not None:
            self.radix.unlock(group.lock_node)
            group.lock_node = None

    def finish_prefill(self, group: Group, page_table: list[int]) -> None:
        """After the prompt's KV is written to page_table: cache its whole pages, hold
        them (and the partial tail page) for the group's samples."""
        ps = self.page_size
        n_full = group.prompt_len // ps
        full, tail = page_table[:n_full], page_table[n_full:]
        canonical, node = self.radix.insert(group.prompt_ids[:n_full * ps], full)
        # Pages matched at admission: the group takes a reference now. New pages: the
        # allocation reference becomes the group's, unless another group cached the same
        # prefix first, in which case ours are duplicates and go back.
        matched = group.num_cached_tokens // ps
        self.allocator.incref(canonical[:matched])
        for mine, canon in zip(full[matched:], canonical[matched:]):
            if mine != canon:
                self.allocator.incref([canon])
                self.allocator.decref([mine])
        self.radix.lock(node)
        self.unlock(group)
        group.lock_node = node
        group.shared_pages = canonical
        group.tail_page = tail[0] if tail else None
        group.prefilled = True

    def release_group(self, group: Group) -> None:
        """All samples finished: drop the group's references and lock."""
        self.allocator.decref(group.shared_pages)
        group.shared_pages = []
        self.release_tail(group)
        self.unlock(group)

    def release_tail(self, group: Group) -> None:
        if group.tail_page is not None:
            self.allocator.decref([group.tail_page])
            group.tail_page = None

    # -- samples -------------------------------------------------------------------------
    def fork(self, seq: Sequence) -> None:
        """Gives a new sample the shared prompt pages and a page for its own copy of the
        tail page; `copy_forked_tails` copies the tails of a step's forks in one go."""
        group = seq.group
        seq.page_table = list(group.shared_pages)
        if group.tail_page is not None:
            (page,) = self.alloc(1)
            self._tail_copies.append((group.tail_page, page))
            seq.page_table.append(page)
        seq.num_cached = group.prompt_len

    def copy_forked_tails(self) -> None:
        """Copies the tail pages of the samples forked since the last call (before their
        first decode and before any tail is released)."""
        if self._tail_copies:
            src, dst = zip(*self._tail_copies)
            self._tail_copies = []
            self.kv.copy_pages(list(src), list(dst))

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Makes the page table cover num_tokens KV tokens. False (nothing taken) if the
        pool is out of pages."""
        need = pages_for(num_tokens, self.page_size) - len(seq.page_table)
        if need <= 0:
            return True
        try:
            seq.page_table.extend(self.alloc(need))
        except OutOfPages:
            return False
        return True

    def share_full_page(self, pairs: list[tuple[Sequence, Sequence, int]]) -> int:
        """For each (src, dst, j): dst drops its page j and holds src's page j instead.
        Both pages must be full and hold the same tokens' KV (merged samples), so neither
        is written again. Returns the pages freed."""
        keep, drop = [], []
        for src, dst, j in pairs:
            if dst.page_table[j] != src.page_table[j]:
                keep.append(src.page_table[j])
                drop.append(dst.page_table[j])
                dst.page_table[j] = src.page_table[j]
        if keep:
            self.allocator.incref(keep)
            self.allocator.decref(drop)
        return len(drop)

    def free_private(self, seq: Sequence) -> None:
        """Frees the sample's private pages; keeps the shared prompt pages."""
        self.allocator.decref(seq.private_pages)
        seq.page_table = list(seq.group.shared_pages)
        seq.num_cached = seq.group.shared_len

    def flush(self) -> None:
        self.radix.flush()

    def check_integrity(self, groups: list[Group]) -> None:
        """Every page reference is accounted for by exactly one holder."""
        self.radix.check_integrity()
        holders = self.radix.page_holders()
        for g in groups:
            holders.update(g.shared_pages)
            if g.tail_page is not None:
                holders[g.tail_page] += 1
            for s in g.samples:
                s.check()
                holders.update(s.private_pages)
        self.allocator.check_integrity(Counter(holders))
