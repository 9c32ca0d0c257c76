"""Scheduling policy: which samples start, which prompts and preempted samples are
(re)computed, which samples decode, and who is preempted when pages run out.

Admission reserves pages: every started sample keeps `reserve_ratio` of the pages it may
still need (up to max_tokens) set aside, and new work is admitted only if it fits beside
those reservations. With reserve_ratio 1 nothing is ever preempted; lower ratios admit
more samples and preempt (free private pages, recompute later) when the pool runs dry.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from brorl.engine.cache_manager import CacheManager
from brorl.engine.config import EngineConfig
from brorl.engine.request import Group, Sequence, Status, pages_for


@dataclass
class ExtendItem:
    """Compute KV (and last-position logits) for token_ids at positions start.. of a
    group's prompt or a preempted sample, into page_table."""

    target: Group | Sequence
    token_ids: list[int]
    start: int
    page_table: list[int]


@dataclass
class Plan:
    start: list[Sequence] = field(default_factory=list)  # fork + draw first token, no forward
    extend: list[ExtendItem] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.start or self.extend or self.decode)


class Scheduler:
    def __init__(self, config: EngineConfig, cache: CacheManager, max_batch_size: int) -> None:
        self.config = config
        self.max_batch_size = max_batch_size
        self.cache = cache
        self.page_size = config.page_size
        self.waiting: deque[Group] = deque()  # prompts not yet computed
        self.pending: deque[Sequence] = deque()  # samples to start or to resume
        self.running: list[Sequence] = []  # in start order (latest last)
        self.active: list[Group] = []  # computed groups with unfinished samples
        self.num_preemptions = 0

    def add(self, group: Group) -> None:
        self.waiting.append(group)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.pending or self.running)

    # -- reservations ----------------------------------------------------------------
    def _future_pages(self, seq: Sequence, private_now: int) -> int:
        remaining = max(0, seq.group.max_private_pages - private_now)
        return math.ceil(self.config.reserve_ratio * remaining)

    def _pinned_pages(self) -> int:
        """Pages held by groups that are computed and not finished."""
        return sum(len(g.shared_pages) + (g.tail_page is not None) for g in self.active)

    def _reserved(self) -> int:
        ratio, total = self.config.reserve_ratio, 0
        for s in self.running:  # _future_pages inlined: this runs over every sample, each step
            g = s.group
            remaining = g.max_private_pages - len(s.page_table) + len(g.shared_pages)
            if remaining > 0:
                total += remaining if ratio == 1.0 else math.ceil(ratio * remaining)
        return total

    def _batch_full(self, extra: int) -> bool:
        return len(self.running) + extra >= self.max_batch_size

    # -- planning ----------------------------------------------------------------------
    def schedule(self) -> Plan:
        """Decides one step. The caller must carry out the whole plan."""
        plan = Plan()
        budget = self.cache.available_pages - self._reserved()
        budget = self._admit_pending(plan, budget)
        if not self.pending:
            self._admit_groups(plan, budget)
        if not plan.extend:
            plan.decode = self._decode_batch()
        return plan

    def _admit_pending(self, plan: Plan, budget: int) -> int:
        tokens = 0
        while self.pending and not self._batch_full(len(plan.start) + len(plan.extend)):
            seq = self.pending[0]
            group = seq.group
            if not seq.started:  # fork: copy the tail page, sample from the prompt logits
                now = 1 if group.tail_page is not None else 0
                need = now + self._future_pages(seq, now)
                if need > budget:
                    break
                self.cache.fork(seq)
                plan.start.append(seq)
            else:  # resume a preempted sample: recompute its private tokens
                todo = len(seq.token_ids) - group.shared_len
                now = pages_for(todo, self.page_size)
                need = now + self._future_pages(seq, now)
                too_big = plan.extend and tokens + todo > self.config.max_prefill_tokens
                if need > budget or too_big:
                    break
                if not self.cache.grow(seq, len(seq.token_ids)):
                    break
                plan.extend.append(ExtendItem(seq, seq.token_ids[group.shared_len:],
                                              group.shared_len, seq.page_table))
                tokens += todo
            budget -= need
            self.pending.popleft()
        return budget

    def _admit_groups(self, plan: Plan, budget: int) -> None:
        tokens, deferred, seen, pinned_now = 0, [], set(), 0
        # the most private pages one sample of a computed group may need
        widest = max((g.max_private_pages for g in self.active), default=0)
        while self.waiting and not self._batch_full(len(plan.start) + len(plan.extend)):
            group = self.waiting.popleft()
            before = self.cache.available_pages
            cached = self.cache.match_and_lock(group)
            budget -= before - self.cache.available_pages  # matched pages are now locked
            start = len(cached) * self.page_size
            keys = _page_prefix_keys(group.prompt_ids, self.page_size)
            todo = group.prompt_len - start
            now = pages_for(todo, self.page_size)
            first = min(1, group.max_private_pages)  # max_tokens 1 on whole pages: none
            one_sample = first + self._future_pages(group.samples[0], first)
            too_big = plan.extend and tokens + todo > self.config.max_prefill_tokens
            # Liveness: whatever is preempted, any one sample (of this group or of one
            # computed before) must be able to reach max_tokens beside every pinned prompt.
            pinned = self._pinned_pages() + pinned_now + len(cached) + now
            live = (pinned + max(widest, group.max_private_pages)
                    <= self.cache.kv.num_pages)
            if now + one_sample > budget or too_big or not live:
                self.cache.unlock(group)
                self.waiting.appendleft(group)
                break
            if keys[len(cached):len(cached) + 1] and keys[len(cached)] in seen:
                # Another prompt in this batch computes the same page: wait for its cache.
                self.cache.unlock(group)
                deferred.append(group)
                continue
            seen.update(keys[len(cached):])
            page_table = cached + self.cache.alloc(now)
            group.num_cached_tokens = start
            plan.extend.append(ExtendItem(group, group.prompt_ids[start:], start, page_table))
            tokens += todo
            budget -= now
            pinned_now += len(cached) + now
            widest = max(widest, group.max_private_pages)
        self.waiting.extendleft(reversed(deferred))

    def _decode_batch(self) -> list[Sequence]:
        """Running samples, each with a page for its next token; preempts the latest
        started samples while the pool cannot provide one."""
        batch: list[Sequence] = []
        ps, i = self.page_size, 0
        while i < len(self.running):
            seq = self.running[i]
            # its page has room, or it gets one
            if (seq.num_cached < len(seq.page_table) * ps
                    or self.cache.grow(seq, seq.num_cached + 1)):
                batch.append(seq)
                i += 1
            else:  # the victim is never in batch yet; if it is seq, the loop ends
                self.preempt(self.running[-1])
        return batch

    def preempt(self, seq: Sequence) -> None:
        """Frees the sample's private pages and queues it to be recomputed first."""
        self.cache.free_private(seq)
        self.running.remove(seq)
        seq.status = Status.WAITING
        self.pending.appendleft(seq)
        self.num_preemptions += 1

    def remove_finished(self) -> None:
        self.running = [s for s in self.running if s.status is Status.RUNNING]


def _page_prefix_keys(ids: list[int], page_size: int) -> list[int]:
    """A rolling hash per whole page of ids, identifying the prefix up to that page."""
    keys, h = [], 0
    for j in range(len(ids) // page_size):
        h = hash((h, tuple(ids[j * page_size:(j + 1) * page_size])))
        keys.append(h)
    return keys
