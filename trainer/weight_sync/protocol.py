"""The weight-sync protocol, independent of the transport.

One sync is: the sender (rank 0, the trainer) broadcasts a manifest (every tensor's name,
shape and dtype, the bucket layout and the policy version) as JSON bytes; every receiver
checks the whole manifest (its layout, that its version does not go back, every tensor
against its engine's model; a manifest it cannot even read is refused too) and the group
agrees on the verdict (one MAX all-reduce of a status flag; a refusal's reason is
broadcast by the lowest refusing rank); then the buckets follow, each a contiguous byte
buffer holding tensors of one dtype packed back to back (never pickled). A receiver
applies the tensors only after every bucket has arrived, through `Engine.update_weights`
(which flushes the prefix cache and sets the version), so an interrupted sync leaves its
engine unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from brorl.engine.models.weights import validate_named_tensors

MANIFEST_FORMAT = 1
_REASON_BYTES = 1024
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64)}


class WeightSyncError(RuntimeError):
    """A sync failed: a peer timed out or disappeared, or a receiver refused the manifest."""


@dataclass(frozen=True)
class Entry:
    """One tensor inside a bucket: `numel` elements from element `offset` of the bucket."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


@dataclass(frozen=True)
class Bucket:
    dtype: str
    numel: int
    entries: tuple[Entry, ...]

    @property
    def num_bytes(self) -> int:
        return self.numel * _DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class Manifest:
    """What a sync carries, sent before any weight."""

    version: int
    buckets: tuple[Bucket, ...]

    @property
    def num_bytes(self) -> int:
        return sum(b.num_bytes for b in self.buckets)

    def entries(self) -> list[tuple[Entry, str]]:
        return [(e, b.dtype) for b in self.buckets for e in b.entries]

    def to_bytes(self) -> bytes:
        return json.dumps({"format": MANIFEST_FORMAT, "version": self.version, "buckets": [
            {"dtype": b.dtype, "numel": b.numel,
             "entries": [[e.name, list(e.shape), e.offset, e.numel] for e in b.entries]}
            for b in self.buckets]}).encode()

    @staticmethod
    def from_bytes(data: bytes) -> Manifest:
        tree = json.loads(data.decode())
        if tree.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"weight-sync manifest format {tree.get('format')!r}, expected "
                             f"{MANIFEST_FORMAT} (sender and receiver run different versions)")
        return Manifest(int(tree["version"]), tuple(
            Bucket(b["dtype"], int(b["numel"]),
                   tuple(Entry(n, tuple(s), int(o), int(k)) for n, s, o, k in b["entries"]))
            for b in tree["buckets"]))


def plan_buckets(named: list[tuple[str, torch.Tensor]], bucket_bytes: int,
                 version: int) -> Manifest:
    """Groups tensors by dtype (in first-seen order) and cuts each group into buckets of at
    most `bucket_bytes` (a tensor larger than that gets a bucket of its own)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    by_dtype: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, t in named:
        key = str(t.dtype).removeprefix("torch.")
        if key not in _DTYPES:
            raise TypeError(f"parameter {name!r} has dtype {t.dtype}; weight sync sends "
                            f"floating-point tensors only ({', '.join(_DTYPES)})")
        by_dtype.setdefault(key, []).append((name, t))
    buckets = []
    for dtype, items in by_dtype.items():
        size, entries = _DTYPES[dtype].itemsize, []
        numel = 0
        for name, t in items:
            if entries and (numel + t.numel()) * size > bucket_bytes:
                buckets.append(Bucket(dtype, numel, tuple(entries)))
                entries, numel = [], 0
            entries.append(Entry(name, tuple(t.shape), numel, t.numel()))
            numel += t.numel()
        if entries:
            buckets.append(Bucket(dtype, numel, tuple(entries)))
    return Manifest(int(version), tuple(buckets))


def pack(bucket: Bucket, tensors: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Copies the bucket's tensors into `out` (a flat buffer of at least bucket.numel
    elements of the bucket's dtype); returns the filled part as bytes (uint8)."""
    flat = out[:bucket.numel]
    for e in bucket.entries:
        flat[e.offset:e.offset + e.numel].copy_(tensors[e.name].reshape(-1))
    return flat.view(torch.uint8)


def unpack(bucket: Bucket, data: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Views of each tensor inside a received bucket (uint8 bytes -> typed, shaped)."""
    flat = data.view(_DTYPES[bucket.dtype])
    return [(e.name, flat[e.offset:e.offset + e.numel].view(e.shape)) for e in bucket.entries]


def check_manifest(engine, manifest: Manifest) -> None:
    """Raises ValueError unless the manifest is well formed (known dtypes, every entry
    inside its bucket, entries disjoint), its version does not go back from the engine's,
    and every tensor matches the engine's model (names, shapes, floating dtypes) with every
    parameter it needs present. Uses the engine's own validation on meta tensors: nothing
    is allocated or changed."""
    current = getattr(engine, "policy_version", None)
    if isinstance(current, int) and manifest.version < current:
        raise ValueError(f"manifest version {manifest.version} is older than the engine's "
                         f"policy version {current} (a stale sender?)")
    for b in manifest.buckets:
        dtype_of(b.dtype)
        end = 0
        for e in sorted(b.entries, key=lambda e: (e.offset, e.numel)):
            if any(s < 0 for s in e.shape) or e.numel != _numel(e.shape):
                raise ValueError(f"manifest entry {e.name!r}: {e.numel} elements for shape "
                                 f"{e.shape}")
            if e.offset < end or e.offset + e.numel > b.numel:
                raise ValueError(f"manifest entry {e.name!r}: elements [{e.offset}, "
                                 f"{e.offset + e.numel}) overlap another entry or leave "
                                 f"its {b.numel}-element bucket")
            end = e.offset + e.numel
    named = [(e.name, torch.empty(e.shape, dtype=_DTYPES[d], device="meta"))
             for e, d in manifest.entries()]
    validate_named_tensors(engine.model.slots, named, require_all=True)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def dtype_of(name: str) -> torch.dtype:
    """torch dtype of a manifest dtype string ("bfloat16")."""
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def encode_reason(text: str, device) -> torch.Tensor:
    data = text.encode()[:_REASON_BYTES]
    out = torch.zeros(_REASON_BYTES + 8, dtype=torch.uint8, device=device)
    out[:8] = torch.tensor(list(len(data).to_bytes(8, "little")), dtype=torch.uint8)
    if data:
        out[8:8 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    return out


def decode_reason(buf: torch.Tensor) -> str:
    raw = bytes(buf.cpu().tolist())
    n = int.from_bytes(raw[:8], "little")
    return raw[8:8 + n].decode(errors="replace")


def named_list(named: Iterable) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs from a mapping or an iterable of pairs."""
    return list(named.items()) if hasattr(named, "items") else list(named)

