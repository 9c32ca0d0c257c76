"""Transports of the weight-sync group: a dedicated group between the trainer (rank 0) and
the rollout workers (ranks 1..W), separate from any data-parallel group the trainer has.

Each channel offers the two collectives the protocol needs: an in-place `broadcast` of a
byte/int tensor from a root, and an in-place MAX `allreduce` of a small int64 tensor; a
channel whose ranks share memory also offers `shared_buffers` + `notify`, so buckets are
packed once into memory every rank sees instead of being sent.
`GlooChannel` uses torch's ProcessGroupGloo over its own TCPStore (no init_process_group, so
it never collides with a default group), with a shared-memory data plane when its ranks run
on one machine (shm.py); `NcclChannel` uses cupy's NCCL bindings with the
unique id passed through a TCPStore. Both turn a peer that is gone or late into a
`WeightSyncError` that names the group's peers and the timeout."""

from __future__ import annotations

import logging
import socket
import time
from abc import ABC, abstractmethod
from datetime import timedelta

import torch

from brorl.trainer.weight_sync import shm
from brorl.trainer.weight_sync.protocol import WeightSyncError

log = logging.getLogger("brorl")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for the group's store)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Channel(ABC):
    """Base class: rank, world size, the device its buffers live on, and two collectives."""

    name = "base"
    device = torch.device("cpu")

    def __init__(self, rank: int, world_size: int, timeout_s: float) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a group of world size {world_size}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s

    @abstractmethod
    def broadcast(self, t: torch.Tensor, src: int) -> None:
        """Overwrites `t` on every rank with rank `src`'s `t` (in place)."""

    @abstractmethod
    def allreduce_max(self, t: torch.Tensor) -> None:
        """Overwrites int64 `t` with its element-wise maximum over the ranks (in place)."""

    def shared_buffers(self, sizes: list[int]) -> list[torch.Tensor] | None:
        """Collective (every rank calls it with the same sizes): uint8 buffers of `sizes`
        bytes that are the same memory on every rank, valid until the next call; or None
        when the ranks share no memory (then the caller broadcasts the bytes)."""
        return None

    def notify(self, index: int) -> None:
        """Collective: rank 0 says shared buffer `index` is written; the other ranks return
        once it is (and raise if the group is out of step). Only valid after
        `shared_buffers` returned buffers, which this base channel never does."""
        raise RuntimeError(f"notify({index}) on the {self.name} channel, which shares no "
                           "memory: broadcast the bucket instead")

    def close(self) -> None:  # noqa: B027 - optional hook; a channel may hold nothing
        """Releases the group's resources."""

    def peers(self) -> str:
        """The other ranks, for error messages: "trainer rank 0" and/or "rollout worker
        rank(s) 1, 2"."""
        workers = ", ".join(str(r) for r in range(1, self.world_size) if r != self.rank)
        parts = ["trainer rank 0"] if self.rank else []
        return ", ".join(parts + ([f"rollout worker rank(s) {workers}"] if workers else []))

    def _fail(self, what: str, start: float, err: BaseException) -> WeightSyncError:
        return WeightSyncError(
            f"weight sync ({self.name}, rank {self.rank} of {self.world_size}): {what} with "
            f"{self.peers()} failed after {time.monotonic() - start:.1f} s (timeout "
            f"{self.timeout_s:g} s); the peer is gone or stalled: {err}")


class GlooChannel(Channel):
    """torch ProcessGroupGloo between CPU processes (loopback or TCP). With
    `shared_memory` (the default) and every rank on one machine, buckets travel through a
    shared-memory segment in `shm_dir` and gloo carries only the small control messages;
    otherwise gloo broadcasts the bytes."""

    name = "gloo"

    def __init__(self, host: str, port: int, rank: int, world_size: int,
                 timeout_s: float = 300.0, prefix: str = "brorl_weight_sync",
                 shared_memory: bool = True, shm_dir: str = shm.DEFAULT_SHM_DIR) -> None:
        super().__init__(rank, world_size, timeout_s)
        import torch.distributed as dist

        self._dist = dist
        timeout = timedelta(seconds=timeout_s)
        start = time.monotonic()
        try:
            self._store = dist.TCPStore(host, port, world_size, rank == 0, timeout,
                                        wait_for_workers=False)
            self._pg = dist.ProcessGroupGloo(dist.PrefixStore(prefix, self._store), rank,
                                             world_size, timeout)
        except RuntimeError as err:
            raise self._fail(f"joining the group at {host}:{port}", start, err) from err
        self.shared_memory, self.shm_dir = shared_memory, shm_dir
        self._segment: shm.Segment | None = None
        self._shm_token: str | None = None
        self._shm_off = False  # rank 0: a peer could not map a segment; use TCP from now on
        self._generation = 0  # rank 0: segments created so far (names never repeat)
        self._room_warned = False
        if rank == 0:
            self._shm_token = shm.new_token()
            self._store.set(f"{prefix}/shm_token", self._shm_token)
        self._prefix = prefix

    def _run(self, work, what: str, start: float) -> None:
        try:
            work.wait()
        except RuntimeError as err:
            raise self._fail(what, start, err) from err

    def broadcast(self, t: torch.Tensor, src: int) -> None:
        opts = self._dist.BroadcastOptions()
        opts.rootRank = src
        start = time.monotonic()
        self._run(self._pg.broadcast([t], opts), f"broadcast of {t.numel()} elements", start)

    def allreduce_max(self, t: torch.Tensor) -> None:
        opts = self._dist.AllreduceOptions()
        opts.reduceOp = self._dist.ReduceOp.MAX
        start = time.monotonic()
        self._run(self._pg.allreduce([t], opts), "all-reduce", start)

    def shared_buffers(self, sizes: list[int]) -> list[torch.Tensor] | None:
        """Rank 0 (re)creates the segment when it is missing or too small, every other rank
        maps it, and rank 0 unlinks its name once all have; a rank that cannot map it turns
        the group to TCP for good."""
        if self.world_size == 1:
            return None
        _, total = shm.aligned_offsets(sizes)
        header = torch.zeros(2, dtype=torch.int64)  # [generation (0: no segment), capacity]
        if self.rank == 0:
            seg = self._sender_segment(total)
            if seg is not None:
                header[:] = torch.tensor([seg.generation, seg.capacity])
        failed = torch.zeros(1, dtype=torch.int64)
        try:
            self.broadcast(header, src=0)
            generation, capacity = (int(v) for v in header)
            if generation == 0:
                self._segment = None
                return None
            if self.rank and not self._attach(generation, capacity):
                failed[0] = 1
            self.allreduce_max(failed)
        except BaseException:  # a peer gone before it mapped the segment: drop it now
            if self.rank == 0 and self._segment is not None:
                self._segment.unlink()
                self._segment = None
            raise
        if self.rank == 0:
            self._segment.unlink()
        if int(failed[0]):
            if self.rank == 0:
                log.warning("weight sync: a rollout worker cannot map shared memory in %s (on "
                            "another machine?); sending weights over gloo TCP", self.shm_dir)
                self._shm_off = True
            self._segment = None
            return None
        return self._segment.views(sizes)

    def _sender_segment(self, total: int) -> shm.Segment | None:
        seg = self._segment
        if not self.shared_memory or self._shm_off:
            return None
        if seg is not None and seg.capacity >= total:
            return seg
        self._segment = None  # drop the small one before mapping a larger one
        if not shm.fits(self.shm_dir, total):
            if not self._room_warned:
                log.warning("weight sync: %s has no room for %.0f MB of shared buckets; "
                            "sending weights over gloo TCP", self.shm_dir, total / 1e6)
                self._room_warned = True
            return None
        self._generation += 1
        try:
            self._segment = shm.Segment.create(self.shm_dir, self._shm_token,
                                               self._generation, max(total, shm.ALIGN))
        except (OSError, RuntimeError) as err:
            log.warning("weight sync: no shared-memory segment in %s (%s); sending weights "
                        "over gloo TCP", self.shm_dir, err)
            return None
        return self._segment

    def _attach(self, generation: int, capacity: int) -> bool:
        seg = self._segment
        if seg is not None and seg.generation == generation and seg.capacity == capacity:
            return True
        self._segment = None
        if not self.shared_memory:
            return False
        try:
            if self._shm_token is None:
                self._shm_token = self._store.get(f"{self._prefix}/shm_token").decode()
            self._segment = shm.Segment.attach(self.shm_dir, self._shm_token, generation,
                                               capacity)
        except (OSError, RuntimeError) as err:
            log.info("weight sync: cannot map rank 0's shared memory (%s)", err)
            return False
        return True

    def notify(self, index: int) -> None:
        t = torch.tensor([index], dtype=torch.int64)
        self.broadcast(t, src=0)
        if int(t[0]) != index:
            raise WeightSyncError(f"weight sync (gloo, rank {self.rank}): rank 0 wrote shared "
                                  f"bucket {int(t[0])} while this rank waits for {index}")

    def close(self) -> None:
        if self._segment is not None:
            if self.rank == 0:
                self._segment.unlink()
            self._segment = None
        self._pg = None
        self._store = None


class NcclChannel(Channel):
    """NCCL through `cupy.cuda.nccl` between GPU processes; tensors are torch CUDA tensors
    on `device`, launched on its current stream and waited for with a deadline."""

    name = "nccl"

    def __init__(self, host: str, port: int, rank: int, world_size: int,
                 timeout_s: float = 300.0, device: str | torch.device = "cuda") -> None:
        super().__init__(rank, world_size, timeout_s)
        try:
            from cupy.cuda import nccl
        except ImportError as err:
            raise ImportError("the nccl weight-sync transport needs cupy with NCCL "
                              "(pip install cupy-cuda12x or cupy-cuda13x)") from err
        import cupy
        import torch.distributed as dist

        self._nccl = nccl
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"NcclChannel needs a CUDA device, got {self.device}")
        index = self.device.index if self.device.index is not None \
            else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        start = time.monotonic()
        try:
            store = dist.TCPStore(host, port, world_size, rank == 0,
                                  timedelta(seconds=timeout_s), wait_for_workers=False)
            if rank == 0:
                store.set("nccl_unique_id", _uid_to_bytes(nccl.get_unique_id()))
            uid = _uid_from_bytes(store.get("nccl_unique_id"))
            # NCCL's init has no timeout: a rank that never comes would block the others
            # in it for good, so every rank first checks in at the store, under the deadline
            store.set(f"nccl_ready/{rank}", b"1")
            try:
                store.wait([f"nccl_ready/{r}" for r in range(world_size)],
                           timedelta(seconds=max(timeout_s - (time.monotonic() - start), 0.1)))
            except RuntimeError as err:
                missing = [r for r in range(world_size) if not store.check([f"nccl_ready/{r}"])]
                raise RuntimeError(f"rank(s) {missing} did not join: {err}") from err
            with cupy.cuda.Device(index):
                self._comm = nccl.NcclCommunicator(world_size, uid, rank)
        except RuntimeError as err:
            raise self._fail(f"joining the group at {host}:{port}", start, err) from err
        self._store = store  # rank 0 serves the store; keep it alive with the group

    def _wait(self, what: str, start: float) -> None:
        stream = torch.cuda.current_stream(self.device)
        while not stream.query():
            if time.monotonic() - start > self.timeout_s:
                self._comm.abort()
                raise self._fail(what, start, TimeoutError("NCCL operation did not finish"))
            time.sleep(0.0005)
        self._comm.check_async_error()

    def broadcast(self, t: torch.Tensor, src: int) -> None:
        start = time.monotonic()
        data = t.view(torch.uint8)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        self._comm.bcast(data.data_ptr(), data.numel(), self._nccl.NCCL_UINT8, src, stream)
        self._wait(f"broadcast of {t.numel()} elements", start)

    def allreduce_max(self, t: torch.Tensor) -> None:
        if t.dtype != torch.int64:
            raise TypeError(f"allreduce_max takes int64 tensors, got {t.dtype}")
        start = time.monotonic()
        stream = torch.cuda.current_stream(self.device).cuda_stream
        self._comm.allReduce(t.data_ptr(), t.data_ptr(), t.numel(), self._nccl.NCCL_INT64,
                             self._nccl.NCCL_MAX, stream)
        self._wait("all-reduce", start)

    def close(self) -> None:
        if getattr(self, "_comm", None) is not None:
            self._comm.destroy()
            self._comm = None


def _uid_to_bytes(uid) -> bytes:
    """cupy returns the NCCL unique id as bytes (cupy >= 13) or a tuple of ints (older)."""
    if isinstance(uid, bytes):
        return b"b" + uid
    return b"t" + bytes(v % 256 for v in uid)


def _uid_from_bytes(data: bytes):
    if data[:1] == b"b":
        return bytes(data[1:])
    return tuple(v - 256 if v > 127 else v for v in data[1:])  # signed chars
