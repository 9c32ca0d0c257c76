"""Weight sync from the trainer to rollout engines: one protocol (manifest, then buckets of
packed tensors; see protocol.py), three transports chosen by name:

- "inprocess": the engine lives in the trainer's process; `Engine.update_weights` directly.
- "gloo": torch ProcessGroupGloo between CPU processes; on one machine the buckets go
  through shared memory (/dev/shm) and gloo carries only control messages.
- "nccl": NCCL broadcast through cupy between GPU processes.

    sender = make_sender("gloo", host=..., port=..., world_size=1 + workers)
    receiver = make_receiver("gloo", engine, host=..., port=..., rank=i, world_size=...)
    sender.send(model.named_parameters(), version=step)  # while each worker calls receive()
"""

from __future__ import annotations

from brorl.trainer.weight_sync.protocol import Manifest, WeightSyncError
from brorl.trainer.weight_sync.sync import (
    DEFAULT_BUCKET_BYTES,
    InProcessSender,
    ManifestRefused,
    WeightReceiver,
    WeightSender,
)

TRANSPORTS = ("inprocess", "gloo", "nccl")


def _channel(transport: str, host: str, port: int, rank: int, world_size: int,
             timeout_s: float, device, shared_memory: bool, shm_dir: str | None):
    from brorl.trainer.weight_sync.channel import GlooChannel, NcclChannel
    from brorl.trainer.weight_sync.shm import DEFAULT_SHM_DIR

    if transport == "gloo":
        return GlooChannel(host, port, rank, world_size, timeout_s,
                           shared_memory=shared_memory, shm_dir=shm_dir or DEFAULT_SHM_DIR)
    return NcclChannel(host, port, rank, world_size, timeout_s, device or "cuda")


def _check(transport: str) -> None:
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown weight-sync transport {transport!r}; supported: "
                         f"{', '.join(TRANSPORTS)}")


def make_sender(transport: str, engine=None, *, host: str = "127.0.0.1", port: int = 0,
                world_size: int = 2, timeout_s: float = 300.0,
                bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype: str | None = None,
                device=None, shared_memory: bool = True, shm_dir: str | None = None):
    """The trainer's end: InProcessSender(engine) for "inprocess", else a WeightSender as
    rank 0 of a new group at host:port (blocks until every receiver has joined).
    `shared_memory` / `shm_dir` (gloo): stage buckets in shared memory when every rank can
    map it (default /dev/shm); False always sends the bytes over TCP."""
    _check(transport)
    if transport == "inprocess":
        if engine is None:
            raise ValueError('the "inprocess" transport needs the engine')
        return InProcessSender(engine)
    ch = _channel(transport, host, port, 0, world_size, timeout_s, device, shared_memory,
                  shm_dir)
    return WeightSender(ch, bucket_bytes, dtype)


def make_receiver(transport: str, engine, *, host: str, port: int, rank: int,
                  world_size: int, timeout_s: float = 300.0, shared_memory: bool = True,
                  shm_dir: str | None = None):
    """A rollout worker's end (rank >= 1) of the group at host:port; buffers live on the
    engine's device for nccl, on the CPU (shared with the sender when it can) for gloo."""
    _check(transport)
    if transport == "inprocess":
        raise ValueError('the "inprocess" transport has no receiver: the sender calls the '
                         'engine directly')
    ch = _channel(transport, host, port, rank, world_size, timeout_s, engine.device,
                  shared_memory, shm_dir)
    return WeightReceiver(ch, engine)


__all__ = ["TRANSPORTS", "make_sender", "make_receiver", "WeightSender", "WeightReceiver",
           "InProcessSender", "Manifest", "ManifestRefused", "WeightSyncError",
           "DEFAULT_BUCKET_BYTES"]
