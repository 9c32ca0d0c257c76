"""The two ends of a sync: `WeightSender` on the trainer (rank 0) and `WeightReceiver` on
each rollout worker, over any `Channel`; `InProcessSender` for the embedded launch, where
the engine lives in the trainer's process. See protocol.py for the message order."""

from __future__ import annotations

import logging
import time

import torch

from brorl.trainer.weight_sync.channel import Channel
from brorl.trainer.weight_sync.protocol import (
    Manifest,
    WeightSyncError,
    check_manifest,
    decode_reason,
    dtype_of,
    encode_reason,
    named_list,
    pack,
    plan_buckets,
    unpack,
)

log = logging.getLogger("brorl")
DEFAULT_BUCKET_BYTES = 512 << 20


class ManifestRefused(WeightSyncError, ValueError):
    """A receiver refused the sync: the manifest does not fit its model, or it could not
    read it (nothing was changed), or applying the weights failed (e.g. out of memory;
    the engine may then hold part of them, so sync again or rebuild it)."""


class InProcessSender:
    """Today's direct path: `Engine.update_weights` in the same process, after the same
    check a receiver makes of a manifest (so a partial state is refused here too, where
    `Engine.update_weights` alone would apply it)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def send(self, named, version: int) -> dict:
        """Checks the tensors as a manifest (ManifestRefused, nothing changed), applies them
        to the engine; returns sync statistics."""
        start = time.perf_counter()
        items = named_list(named)
        try:
            check_manifest(self.engine, plan_buckets(
                [(n, torch.empty(t.shape, dtype=t.dtype, device="meta")) for n, t in items],
                1 << 62, version))
        except (TypeError, ValueError) as err:
            raise ManifestRefused(f"the engine refused the weights (manifest): {err}") from err
        self.engine.update_weights(items, version=version)
        return {"bytes": sum(t.numel() * t.element_size() for _, t in items),
                "seconds": time.perf_counter() - start}

    def close(self) -> None:
        """Nothing to release."""


class WeightSender:
    """Rank 0 of a weight-sync group. `dtype` (e.g. "bfloat16") casts while packing, so
    float32 master weights travel at the engine's precision."""

    def __init__(self, channel: Channel, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 dtype: str | None = None) -> None:
        if channel.rank != 0:
            raise ValueError(f"the sender must be rank 0 of the group, not {channel.rank}")
        self.channel = channel
        self.bucket_bytes = int(bucket_bytes)
        self.dtype = dtype
        self._buffers: dict[str, torch.Tensor] = {}

    def send(self, named, version: int) -> dict:
        """Sends manifest then buckets to every receiver; returns once all of them applied
        the weights. Raises ManifestRefused (nothing changed anywhere) or WeightSyncError
        (a receiver vanished or stalled past the channel's timeout)."""
        start = time.perf_counter()
        items = [(n, t.detach()) for n, t in named_list(named)]
        sizes = items if self.dtype is None else \
            [(n, torch.empty(t.shape, dtype=dtype_of(self.dtype), device="meta"))
             for n, t in items]
        manifest = plan_buckets(sizes, self.bucket_bytes, version)
        ch = self.channel
        _send_bytes(ch, manifest.to_bytes())
        _agree(ch, None, "manifest")
        tensors = dict(items)
        shared = ch.shared_buffers([b.num_bytes for b in manifest.buckets])
        for i, bucket in enumerate(manifest.buckets):
            if shared is not None:  # pack straight into memory the receivers map
                pack(bucket, tensors, shared[i].view(dtype_of(bucket.dtype)))
                ch.notify(i)
            else:
                buf = self._buffer(bucket.dtype, bucket.numel)
                ch.broadcast(pack(bucket, tensors, buf), src=0)
        _agree(ch, None, "apply")
        return {"bytes": manifest.num_bytes, "buckets": len(manifest.buckets),
                "shared_memory": shared is not None, "seconds": time.perf_counter() - start}

    def _buffer(self, dtype: str, numel: int) -> torch.Tensor:
        """One reusable flat buffer per dtype on the channel's device (grown on demand)."""
        buf = self._buffers.get(dtype)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype_of(dtype), device=self.channel.device)
            self._buffers[dtype] = buf
        return buf

    def close(self) -> None:
        """Closes the channel and drops the packing buffers."""
        self._buffers.clear()
        self.channel.close()


class WeightReceiver:
    """Ranks 1..W of a weight-sync group: one engine each. Buckets are staged (in the
    channel's shared buffers, or in buffers of its own) and applied only once all arrived;
    the engine copies them into its parameters, so the staging memory is free to reuse."""

    def __init__(self, channel: Channel, engine) -> None:
        if channel.rank == 0:
            raise ValueError("rank 0 of a weight-sync group is the sender")
        self.channel = channel
        self.engine = engine
        self._buffers: list[torch.Tensor] = []  # kept between syncs: no fresh page faults

    def receive(self) -> int:
        """Waits for one sync and applies it; returns the new policy version. On a refused
        manifest (one that does not fit the engine, or that this side cannot read or check
        for any reason) raises ManifestRefused on every rank with the engine untouched; on
        an apply that fails, ManifestRefused too (the sender never waits out its timeout
        for a receiver that is still there); on a lost sender raises
        WeightSyncError, also with the engine untouched (buckets apply only at the end)."""
        ch = self.channel
        data = _recv_bytes(ch)
        problem = None
        try:  # any failure here is a refusal the sender hears of, not a hang until timeout
            manifest = Manifest.from_bytes(data)
            check_manifest(self.engine, manifest)
        except Exception as err:  # noqa: BLE001 - agreed on, then raised on every rank
            problem = _reason(err)
        _agree(ch, problem, "manifest")
        named: list[tuple[str, torch.Tensor]] = []
        shared = ch.shared_buffers([b.num_bytes for b in manifest.buckets])
        if shared is not None:
            self._buffers.clear()  # the shared segment stages the buckets now
        for i, bucket in enumerate(manifest.buckets):
            if shared is not None:
                ch.notify(i)
                data = shared[i]
            else:
                data = self._buffer(i, bucket.num_bytes)
                ch.broadcast(data, src=0)
            named += unpack(bucket, data)
        problem = None
        try:
            self.engine.update_weights(named, version=manifest.version)
        except Exception as err:  # noqa: BLE001 - validated above; so a sender never hangs
            problem = f"applying the weights failed: {_reason(err)}"
        _agree(ch, problem, "apply")
        return manifest.version

    def _buffer(self, i: int, num_bytes: int) -> torch.Tensor:
        """Bucket i's receive buffer, reused across syncs (grown when a bucket grows)."""
        if i == len(self._buffers):
            self._buffers.append(torch.empty(0, dtype=torch.uint8, device=self.channel.device))
        if self._buffers[i].numel() < num_bytes:
            self._buffers[i] = torch.empty(num_bytes, dtype=torch.uint8,
                                           device=self.channel.device)
        return self._buffers[i][:num_bytes]

    def close(self) -> None:
        self.channel.close()


def _send_bytes(ch: Channel, data: bytes) -> None:
    ch.broadcast(torch.tensor([len(data)], dtype=torch.int64, device=ch.device), src=0)
    ch.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(ch.device), src=0)


def _recv_bytes(ch: Channel) -> bytes:
    n = torch.zeros(1, dtype=torch.int64, device=ch.device)
    ch.broadcast(n, src=0)
    buf = torch.empty(int(n.item()), dtype=torch.uint8, device=ch.device)
    ch.broadcast(buf, src=0)
    return bytes(buf.cpu().numpy().tobytes())


def _reason(err: BaseException) -> str:
    """An exception as a refusal's reason: its type when that says more than the text."""
    text = str(err)
    return text if isinstance(err, ValueError) and text else f"{type(err).__name__}: {text}"


def _agree(ch: Channel, problem: str | None, phase: str) -> None:
    """Every rank learns whether any rank had a problem in `phase` (None: none; any
    string, even empty, is one); if so the lowest such rank's reason is broadcast and
    every rank raises ManifestRefused with it."""
    flag = torch.tensor([0 if problem is None else ch.world_size - ch.rank], dtype=torch.int64,
                        device=ch.device)
    ch.allreduce_max(flag)
    if not int(flag.item()):
        return
    culprit = ch.world_size - int(flag.item())
    reason = encode_reason(problem or "", ch.device)  # "" on the ranks that had none
    ch.broadcast(reason, src=culprit)
    text = f"rollout worker rank {culprit} refused the weights ({phase}): " \
           f"{decode_reason(reason)}"
    if ch.rank == 0:
        log.error("weight sync: %s", text)
    raise ManifestRefused(text)
