"""Weight sync from the trainer to rollout engines: one protocol (manifest, then buckets of
packed tensors; see protocol.py), three transports chosen by name:

- "inprocess": the engine lives in the trainer's process; `Engine.update_weights` directly.
- "gloo": torch ProcessGroupGloo between CPU processes.
- "nccl": NCCL broadcast through cupy between GPU processes.

    sender = make_sender("gloo", host=..., port=..., world_size=1 + workers)
    receiver = make_receiver("gloo", engine, host=..., port=..., rank=i, world_size=...)
    sender.send(named_weights(model), version=step)   # while each worker calls receive()
"""

from __future__ import annotations

from trainer.weight_sync.protocol import Manifest, WeightSyncError
from trainer.weight_sync.sync import (
    DEFAULT_BUCKET_BYTES,
    InProcessSender,
    ManifestRefused,
    WeightReceiver,
    WeightSender,
)

TRANSPORTS = ("inprocess", "gloo", "nccl")


def _channel(transport: str, host: str, port: int, rank: int, world_size: int,
             timeout_s: float, device):
    from trainer.weight_sync.channel import GlooChannel, NcclChannel

    if transport == "gloo":
        return GlooChannel(host, port, rank, world_size, timeout_s)
    return NcclChannel(host, port, rank, world_size, timeout_s, device or "cuda")


def _check(transport: str) -> None:
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown weight-sync transport {transport!r}; supported: "
                         f"{', '.join(TRANSPORTS)}")


def make_sender(transport: str, engine=None, *, host: str = "127.0.0.1", port: int = 0,
                world_size: int = 2, timeout_s: float = 300.0,
                bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype: str | None = None,
                device=None):
    """The trainer's end: InProcessSender(engine) for "inprocess", else a WeightSender as
    rank 0 of a new group at host:port (blocks until every receiver has joined)."""
    _check(transport)
    if transport == "inprocess":
        if engine is None:
            raise ValueError('the "inprocess" transport needs the engine')
        return InProcessSender(engine)
    ch = _channel(transport, host, port, 0, world_size, timeout_s, device)
    return WeightSender(ch, bucket_bytes, dtype)


def make_receiver(transport: str, engine, *, host: str, port: int, rank: int,
                  world_size: int, timeout_s: float = 300.0):
    """A rollout worker's end (rank >= 1) of the group at host:port; buffers live on the
    engine's device for nccl, on the CPU for gloo."""
    _check(transport)
    if transport == "inprocess":
        raise ValueError('the "inprocess" transport has no receiver: the sender calls the '
                         'engine directly')
    ch = _channel(transport, host, port, rank, world_size, timeout_s, engine.device)
    return WeightReceiver(ch, engine)


__all__ = ["TRANSPORTS", "make_sender", "make_receiver", "WeightSender", "WeightReceiver",
           "InProcessSender", "Manifest", "ManifestRefused", "WeightSyncError",
           "DEFAULT_BUCKET_BYTES"]
