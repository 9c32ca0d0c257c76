"""Request state. A `Group` is one prompt with its n samples; a `Sequence` is one sample.

KV layout of a sample: page_table[:num_shared_pages] are the group's whole prompt pages
(shared by reference, cached in the radix tree); the rest are the sample's private pages,
starting with its own copy of the group's partial last prompt page (the "tail").

Invariants while a sample runs: num_cached == len(token_ids) - 1 (the last sampled token
has no KV yet) and the page table covers num_cached tokens.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from brorl.engine.radix_cache import RadixNode
from brorl.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # not started, or preempted
    RUNNING = "running"
    FINISHED = "finished"


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


def private_pages_at_max(prompt_len: int, max_tokens: int, page_size: int) -> int:
    """Private pages one sample holds at max_tokens: its whole prompt pages are shared, the
    partial last one is its own copy (the last sampled token has no KV)."""
    return pages_for(prompt_len + max_tokens - 1, page_size) - prompt_len // page_size


def min_pool_pages(prompt_len: int, max_tokens: int, page_size: int) -> int:
    """The smallest pool one such request runs in: its prompt pinned (the partial last page
    too, while the samples copy it) beside one sample's private pages at max_tokens."""
    return pages_for(prompt_len, page_size) + private_pages_at_max(prompt_len, max_tokens,
                                                                   page_size)


@dataclass(eq=False)
class Group:
    index: int  # request index within its generate() call: part of the noise key
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    stop_ids: frozenset[int]
    page_size: int
    samples: list[Sequence] = field(default_factory=list)
    shared_pages: list[int] = field(default_factory=list)  # held: one reference each
    tail_page: int | None = None  # held until every sample has copied it
    lock_node: RadixNode | None = None
    first_logits: torch.Tensor | None = None  # logits at the last prompt position
    prefilled: bool = False
    num_cached_tokens: int = 0  # prompt tokens reused from the radix cache
    num_finished: int = 0  # samples finished (the engine counts them as they finish)
    # read per sample and step, so kept rather than recounted
    prompt_len: int = field(init=False)
    max_len: int = field(init=False)  # prompt + max_tokens: a sample this long is done
    # shorter than this, a sample's stop tokens are banned (min_tokens)
    ban_below: int = field(init=False)
    # longer than this, a sample's text is searched for stop strings (never without them)
    stop_from: int = field(init=False)
    max_private_pages: int = field(init=False)  # private_pages_at_max of a sample

    def __post_init__(self) -> None:
        self.prompt_len = len(self.prompt_ids)
        self.max_len = self.prompt_len + self.params.max_tokens
        self.ban_below = self.prompt_len + self.params.min_tokens if self.stop_ids else 0
        self.stop_from = (self.prompt_len + self.params.min_tokens if self.params.stop
                          else self.max_len)
        self.max_private_pages = private_pages_at_max(self.prompt_len, self.params.max_tokens,
                                                      self.page_size)

    @property
    def shared_len(self) -> int:
        return len(self.shared_pages) * self.page_size

    @property
    def done(self) -> bool:
        return self.num_finished == len(self.samples)


@dataclass(eq=False)
class Sequence:
    group: Group
    index: int  # sample index within the group: part of the noise key
    token_ids: list[int]
    page_table: list[int] = field(default_factory=list)
    num_cached: int = 0
    logprobs: list[float] = field(default_factory=list)
    status: Status = Status.WAITING
    started: bool = False  # has drawn its first token (preempted samples stay started)
    finish_reason: str | None = None
    # The samples whose contexts (tokens so far) were identical at their last step share
    # this: the group when they drew their first token together, then the decode row they
    # were merged into. None once the context is known to be unlike every other's (it had
    # a row alone, or it was recomputed after preemption): contexts that differ differ
    # forever, so such a sample is never compared again.
    merged_with: object | None = None

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.group.prompt_len:]

    @property
    def private_pages(self) -> list[int]:
        return self.page_table[len(self.group.shared_pages):]

    def check(self) -> None:
        ps = self.group.page_size
        if self.status is Status.FINISHED or not self.started:
            assert not self.page_table, "a finished or unstarted sample holds pages"
            return
        assert self.page_table[:len(self.group.shared_pages)] == self.group.shared_pages
        if self.status is Status.RUNNING:
            assert self.num_cached == len(self.token_ids) - 1, "running: KV lags one token"
            assert len(self.page_table) * ps >= self.num_cached, "page table too short"
            assert len(self.page_table) <= (self.num_cached + ps) // ps, "page table too long"
