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
Before anything is sent, each engine checks the names and shapes against its checkpoint
(`SGLangEngine.check_manifest`): many SGLang loaders skip an unknown name and answer
success. A sync goes as one SGLang call per bucket of at most `bucket_bytes`, since SGLang
allocates all of a call's tensors before it loads any; the last call flushes its cache.
The trainer's tensors are only read.

A sync that failed before every broadcast completed leaves the group out of step; the
sender then refuses further syncs. Over gloo, close it and build a new one (its group has a
new name). Over NCCL the SGLang ranks are then stuck in their receives until NCCL's own
timeout: restart the engines. NCCL also needs the trainer and each SGLang rank on
different GPUs (SGLang's `base_gpu_id`), and SGLang's own test of this update sets
NCCL_CUMEM_ENABLE=0 and NCCL_NVLS_ENABLE=0 in the trainer. SGLang waits for its running
requests before it receives, so send when no generate is in flight (the trainer's loop
does): the timeout counts from each broadcast.
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

from brorl.trainer.weight_sync.channel import free_port
from brorl.trainer.weight_sync.protocol import (
    Manifest,
    WeightSyncError,
    dtype_of,
    named_list,
    plan_buckets,
)
from brorl.trainer.weight_sync.sync import DEFAULT_BUCKET_BYTES, ManifestRefused

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

    `tp_sizes`: each engine's number of ranks (default: its `num_sync_ranks()`, SGLang's
    tensor-parallel size). `backend`: "nccl" (GPU tensors; SGLang's default) or "gloo"
    (CPU). `dtype` (e.g. "bfloat16") casts each tensor as it is sent, so float32 master
    weights travel, and are held by SGLang while it receives, at the engine's precision.
    `bucket_bytes` bounds one SGLang call's tensors (and what this side holds cast for
    sending). `timeout_s` bounds each wait (the join, each broadcast, each answer)."""

    def __init__(self, engines, *, host: str = "127.0.0.1", port: int = 0,
                 tp_sizes: list[int] | None = None, backend: str = "nccl",
                 group_name: str | None = None, timeout_s: float = 300.0,
                 dtype: str | None = None, device=None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.engines = list(engines)
        if not self.engines:
            raise ValueError("SGLangSender needs at least one engine")
        tp_sizes = [e.num_sync_ranks() if hasattr(e, "num_sync_ranks") else 1
                    for e in self.engines] if tp_sizes is None else list(tp_sizes)
        if len(tp_sizes) != len(self.engines) or any(
                not isinstance(t, int) or isinstance(t, bool) or t < 1 for t in tp_sizes):
            raise ValueError(f"tp_sizes must be one positive int per engine "
                             f"({len(self.engines)}), got {tp_sizes}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; supported: {', '.join(BACKENDS)}")
        if timeout_s <= 0 or bucket_bytes <= 0:
            raise ValueError(f"timeout_s and bucket_bytes must be > 0, got {timeout_s} and "
                             f"{bucket_bytes}")
        if dtype is not None:
            dtype_of(dtype)
        self.dtype, self.timeout_s, self.bucket_bytes = dtype, timeout_s, int(bucket_bytes)
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
        Raises ManifestRefused before anything is sent when an engine's checkpoint has no
        such tensor or shape; WeightSyncError naming the engine and SGLang's message, or
        the transport's error (an engine gone or stalled past the timeout)."""
        if self._group is None or self._broken:
            raise WeightSyncError(f"this SGLangSender cannot sync: {self._broken or 'closed'}"
                                  "; close it and build a new SGLangSender")
        start = time.perf_counter()
        items = [(n, t.detach()) for n, t in named_list(named)]
        sizes = [(n, torch.empty(t.shape, device="meta",
                                 dtype=t.dtype if self.dtype is None else dtype_of(self.dtype)))
                 for n, t in items]
        manifest = plan_buckets(sizes, self.bucket_bytes, version)
        for i, e in enumerate(self.engines):
            try:
                if hasattr(e, "check_manifest"):
                    e.check_manifest(manifest)
            except ValueError as err:
                raise ManifestRefused(f"SGLang engine {i} refused the weights before any "
                                      f"was sent: {err}") from err
        tensors = dict(items)
        for k, bucket in enumerate(manifest.buckets):
            last = k == len(manifest.buckets) - 1
            self._send_call(Manifest(version, (bucket,)), tensors, last)
        return {"bytes": manifest.num_bytes, "tensors": len(tensors),
                "calls": len(manifest.buckets), "seconds": time.perf_counter() - start}

    def _send_call(self, part: Manifest, tensors: dict, last: bool) -> None:
        """One SGLang call per engine for the tensors of `part`, while this side
        broadcasts them in its order."""
        calls = [_Call(f"engine {i} apply_manifest", e.apply_manifest, part, last)
                 for i, e in enumerate(self.engines)]
        pending: deque = deque()
        try:
            for entry, dtype in part.entries():
                t = tensors[entry.name].to(self.device, dtype_of(dtype)).contiguous()
                work = torch.distributed.broadcast(t, src=0, group=self._group, async_op=True)
                pending.append((work, t, entry.name))
            while pending:
                self._wait(pending.popleft(), calls)
        except BaseException as err:
            self._broken = f"a sync failed before every broadcast completed ({err})"
            if isinstance(err, WeightSyncError):
                raise
            raise WeightSyncError(f"SGLang weight sync (version {part.version}): "
                                  f"{err}") from err
        # every tensor reached every rank: the group stays in step even if a load fails
        self._finish(calls, f"SGLang's update to version {part.version}")

    def _wait(self, item, calls: list[_Call]) -> None:
        """Waits for one broadcast, failing early when an engine has answered with an
        error."""
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
        """Has each engine drop its end of the group (where its SGLang can; not after a
        failed sync, whose engines may be stuck receiving) and leaves it. Idempotent."""
        if self._group is not None and not self._broken:
            calls = [_Call(f"engine {i} close_weight_sync", e.close_weight_sync)
                     for i, e in enumerate(self.engines) if hasattr(e, "close_weight_sync")]
            try:
                self._finish(calls, "closing SGLang's weight-update group")
            except WeightSyncError as err:
                log.warning("%s", err)
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
