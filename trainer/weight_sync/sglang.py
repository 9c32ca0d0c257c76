"""The trainer's end of SGLang's distributed weight update (engine/backends/sglang.py is the
engine's end): `SGLangSender` is rank 0 of the torch process group SGLang joins in
`init_weights_update_group`, and broadcasts every tensor, one by one in manifest order,
while SGLang's `update_weights_from_distributed` receives them.

SGLang's protocol, as its ModelRunner runs it: the group is built by torch's rendezvous at
tcp://host:port (rank 0, the trainer, hosts the store), the store prefixed with the group's
name, then torch's `_new_process_group_helper`; an engine's tensor-parallel ranks are
rank_offset + tp_rank. For an update SGLang allocates each tensor from the (names, dtypes,
shapes) lists, posts one broadcast from rank 0 per tensor, waits for all of them, then
loads them into its model. SGLang checks no name or shape before it receives: a failed load
may leave it partly updated (sync again or rebuild it).

Both SGLang calls block until the trainer has done its part, so this sender runs them in
threads while it joins and broadcasts. It watches those threads while it waits: an engine
that answers with a failure ends the sync at once with SGLang's message, not at the timeout.
A sync that failed before every broadcast completed leaves the group out of step; the
sender then refuses further syncs (close it and build a new one: its group has a new name).
The trainer's tensors are only read.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
from collections import deque
from datetime import timedelta

import torch

from trainer.weight_sync.channel import free_port
from trainer.weight_sync.protocol import WeightSyncError, dtype_of, named_list, plan_buckets
from trainer.weight_sync.sync import DEFAULT_BUCKET_BYTES

log = logging.getLogger("brorl")
BACKENDS = ("nccl", "gloo")
_POLL_S = 0.002


def join_group(host: str, port: int, rank: int, world_size: int, group_name: str,
               backend: str, timeout_s: float):
    """A torch process group built as SGLang builds its end (see the module docstring), so
    the two ends meet; no default process group is needed or made. Blocks until every
    rank has joined."""
    from torch.distributed import distributed_c10d as c10d

    timeout = timedelta(seconds=timeout_s)
    address = f"[{host}]" if ":" in host else host
    store, rank, world_size = next(c10d.rendezvous(f"tcp://{address}:{port}", rank,
                                                   world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    # torch renamed pg_options to backend_options (2.6); pass whichever this torch has
    params = inspect.signature(c10d._new_process_group_helper).parameters
    options = {"backend_options": None} if "backend_options" in params else {"pg_options": None}
    group, _ = c10d._new_process_group_helper(world_size, rank, [], c10d.Backend(backend),
                                              store, group_name=group_name, timeout=timeout,
                                              **options)
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


class _Call:
    """One blocking call in a daemon thread; `error` once it raised, `done` once it ended."""

    def __init__(self, what: str, fn, *args) -> None:
        self.what, self.error, self.result = what, None, None
        self._thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self._thread.start()

    def _run(self, fn, *args) -> None:
        try:
            self.result = fn(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
            self.error = err

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()


class SGLangSender:
    """Rank 0 of SGLang's weight-update group for `engines` (SGLangEngine objects, or
    anything with their `init_weight_sync` and `apply_manifest`). Building it joins the
    group: every engine's join runs beside ours and it returns once all have joined.

    `tp_sizes`: each engine's tensor-parallel size (its number of ranks; default 1 each).
    `backend`: "nccl" (GPU tensors; SGLang's default) or "gloo" (CPU). `dtype` (e.g.
    "bfloat16") casts each tensor as it is sent, so float32 master weights travel at the
    engine's precision. `max_inflight_bytes` bounds the tensors cast or copied for sending
    that are held at once. `timeout_s` bounds each wait (the join, each broadcast, each
    engine's answer)."""

    def __init__(self, engines, *, host: str = "127.0.0.1", port: int = 0,
                 tp_sizes: list[int] | None = None, backend: str = "nccl",
                 group_name: str | None = None, timeout_s: float = 300.0,
                 dtype: str | None = None, device=None,
                 max_inflight_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.engines = list(engines)
        if not self.engines:
            raise ValueError("SGLangSender needs at least one engine")
        tp_sizes = [1] * len(self.engines) if tp_sizes is None else list(tp_sizes)
        if len(tp_sizes) != len(self.engines) or any(
                not isinstance(t, int) or isinstance(t, bool) or t < 1 for t in tp_sizes):
            raise ValueError(f"tp_sizes must be one positive int per engine "
                             f"({len(self.engines)}), got {tp_sizes}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; supported: {', '.join(BACKENDS)}")
        if timeout_s <= 0 or max_inflight_bytes <= 0:
            raise ValueError(f"timeout_s and max_inflight_bytes must be > 0, got "
                             f"{timeout_s} and {max_inflight_bytes}")
        if dtype is not None:
            dtype_of(dtype)
        self.dtype, self.timeout_s, self.max_inflight_bytes = dtype, timeout_s, max_inflight_bytes
        self.device = torch.device(device or ("cuda" if backend == "nccl" else "cpu"))
        self.port = port or free_port(host)
        # SGLang keeps a group's name once joined: a fresh name per sender lets a new
        # sender replace one whose group fell out of step
        self.group_name = group_name or f"brorl-sglang-{os.getpid()}-{self.port}"
        self.world_size = 1 + sum(tp_sizes)
        self.rank_offsets = [1 + sum(tp_sizes[:i]) for i in range(len(tp_sizes))]
        self._broken: str | None = None
        self._group = None
        calls = [_Call(f"engine {i} (ranks {off}..{off + tp - 1}) init_weight_sync",
                       e.init_weight_sync, host, self.port, off, self.world_size,
                       self.group_name, backend)
                 for i, (e, off, tp) in enumerate(zip(self.engines, self.rank_offsets,
                                                      tp_sizes))]
        own = _Call("the trainer's join", join_group, host, self.port, 0, self.world_size,
                    self.group_name, backend, timeout_s)
        try:
            self._finish([own, *calls], f"joining SGLang's group {self.group_name!r} at "
                                        f"{host}:{self.port}")
        finally:
            self._group = own.result  # None unless our end joined
            if any(c.error is not None for c in calls):
                self.close()

    def send(self, named, version: int) -> dict:
        """One sync of `named` (a mapping or (name, tensor) pairs) as policy `version`:
        every engine receives every tensor and loads them; returns once all have answered.
        Raises WeightSyncError naming the engine and SGLang's message, or the transport's
        error (an engine gone or stalled past the timeout)."""
        if self._group is None or self._broken:
            raise WeightSyncError(f"this SGLangSender cannot sync: {self._broken or 'closed'}"
                                  "; close it and build a new SGLangSender")
        start = time.perf_counter()
        items = [(n, t.detach()) for n, t in named_list(named)]
        sizes = [(n, torch.empty(t.shape, device="meta",
                                 dtype=t.dtype if self.dtype is None else dtype_of(self.dtype)))
                 for n, t in items]
        manifest = plan_buckets(sizes, 1 << 62, version)  # SGLang's order: manifest order
        tensors = dict(items)
        calls = [_Call(f"engine {i} apply_manifest", e.apply_manifest, manifest)
                 for i, e in enumerate(self.engines)]
        pending: deque = deque()
        inflight = 0
        try:
            for entry, dtype in manifest.entries():
                t = tensors[entry.name].to(self.device, dtype_of(dtype)).contiguous()
                work = torch.distributed.broadcast(t, src=0, group=self._group, async_op=True)
                pending.append((work, t, entry.name))
                inflight += t.numel() * t.element_size()
                while pending and inflight > self.max_inflight_bytes:
                    inflight -= self._wait(pending.popleft(), calls)
            while pending:
                self._wait(pending.popleft(), calls)
        except BaseException as err:
            self._broken = f"a sync failed before every broadcast completed ({err})"
            if isinstance(err, WeightSyncError):
                raise
            raise WeightSyncError(f"SGLang weight sync (version {version}): {err}") from err
        # every tensor reached every rank: the group stays in step even if a load fails
        self._finish(calls, f"SGLang's update to version {version}")
        return {"bytes": manifest.num_bytes, "tensors": len(tensors),
                "seconds": time.perf_counter() - start}

    def _wait(self, item, calls: list[_Call]) -> int:
        """Waits for one broadcast, failing early when an engine has answered with an
        error; returns the bytes it held."""
        work, t, name = item
        deadline = time.monotonic() + self.timeout_s
        while not work.is_completed():
            _raise_failed(calls)
            if time.monotonic() > deadline:
                raise WeightSyncError(f"broadcast of {name!r} did not complete in "
                                      f"{self.timeout_s:g} s: an SGLang rank is stalled")
            time.sleep(_POLL_S)
        try:
            work.wait()
        except RuntimeError as err:
            _raise_failed(calls)
            raise WeightSyncError(f"broadcast of {name!r} failed: an SGLang rank is gone "
                                  f"({err})") from err
        return t.numel() * t.element_size()

    def _finish(self, calls: list[_Call], what: str) -> None:
        """Waits for every call, raising the first failure (SGLang's message) at once."""
        deadline = time.monotonic() + self.timeout_s
        while not all(c.done for c in calls):
            _raise_failed(calls, what)
            if time.monotonic() > deadline:
                late = ", ".join(c.what for c in calls if not c.done)
                raise WeightSyncError(f"{what}: no answer in {self.timeout_s:g} s from {late}")
            time.sleep(_POLL_S)
        _raise_failed(calls, what)

    def close(self) -> None:
        """Leaves the group (SGLang keeps its end until it is rebuilt). Idempotent."""
        if self._group is not None:
            try:
                torch.distributed.destroy_process_group(self._group)
            except (RuntimeError, ValueError) as err:  # a group that already failed
                log.warning("SGLang weight sync: closing the group: %s", err)
            self._group = None


def _raise_failed(calls: list[_Call], what: str = "SGLang weight sync") -> None:
    for c in calls:
        if c.error is not None:
            raise WeightSyncError(f"{what}: {c.what} failed: {c.error}") from c.error
