"""The same-host data plane of the gloo transport: one shared-memory segment that the
trainer packs its buckets into and every rollout worker reads them from, so a sync costs
one copy (the packing) instead of pack + TCP send + receive.

The segment is a file in a tmpfs directory (/dev/shm), created by rank 0 and mapped
MAP_SHARED by every rank; its name is unlinked as soon as every rank has mapped it, so a
crash never leaves it behind (the memory goes back when the last mapping closes). When a
peer cannot map it (another machine, another container's /dev/shm, no space) the group
falls back to broadcasting the bytes over gloo, and says so once in the log.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets

import torch

log = logging.getLogger("brorl")

DEFAULT_SHM_DIR = "/dev/shm"
ALIGN = 64  # bytes: every bucket starts on a cache line, so any dtype view is aligned
# Leave this much of the directory's free space to others (Ray's object store lives there).
HEADROOM_BYTES = 256 << 20


def aligned_offsets(sizes: list[int]) -> tuple[list[int], int]:
    """Start offset of each of `sizes` (bytes) laid out back to back on ALIGN boundaries,
    and the total length."""
    offsets, end = [], 0
    for n in sizes:
        if n < 0:
            raise ValueError(f"bucket sizes must be >= 0, got {n}")
        offsets.append(end)
        end += -(-n // ALIGN) * ALIGN
    return offsets, end


class Segment:
    """One mapped shared-memory file: `data` is a uint8 tensor over all of it.

    `create` (rank 0) makes the file and maps it; `attach` (the other ranks) maps an
    existing one by name; `unlink` removes the name (mappings stay valid)."""

    def __init__(self, path: str, capacity: int, generation: int, data: torch.Tensor) -> None:
        self.path, self.capacity, self.generation, self.data = path, capacity, generation, data

    @staticmethod
    def name(directory: str, token: str, generation: int) -> str:
        return os.path.join(directory, f"brorl-weight-sync-{token}-{generation}")

    @classmethod
    def create(cls, directory: str, token: str, generation: int, capacity: int) -> Segment:
        path = cls.name(directory, token, generation)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                _reserve(fd, capacity)
            finally:
                os.close(fd)
            data = torch.from_file(path, shared=True, size=capacity, dtype=torch.uint8)
        except BaseException:  # the name must not outlive a failed create either
            os.unlink(path)
            raise
        return cls(path, capacity, generation, data)

    @classmethod
    def attach(cls, directory: str, token: str, generation: int, capacity: int) -> Segment:
        """Maps rank 0's segment; OSError/RuntimeError when it is not there (another host)
        or shorter than `capacity`."""
        path = cls.name(directory, token, generation)
        if os.path.getsize(path) < capacity:
            raise OSError(f"{path} is shorter than {capacity} bytes")
        data = torch.from_file(path, shared=True, size=capacity, dtype=torch.uint8)
        return cls(path, capacity, generation, data)

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def views(self, sizes: list[int]) -> list[torch.Tensor]:
        """uint8 views of `sizes` bytes each, laid out by `aligned_offsets`."""
        offsets, total = aligned_offsets(sizes)
        if total > self.capacity:
            raise ValueError(f"{total} bytes of buckets do not fit a {self.capacity}-byte "
                             "segment")
        return [self.data[o:o + n] for o, n in zip(offsets, sizes)]


def _reserve(fd: int, capacity: int) -> None:
    """Sizes the file to `capacity` bytes with its memory reserved now: a sparse tmpfs
    file would take its pages only as buckets are packed, and if the directory filled up
    meanwhile (Ray's object store shares it) that write would kill the trainer with SIGBUS
    instead of raising here, where the group falls back to TCP. Filesystems without
    fallocate get a sparse file."""
    try:
        os.posix_fallocate(fd, 0, capacity)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        os.ftruncate(fd, capacity)


def new_token() -> str:
    """A name part no other group (on any machine) will pick."""
    return f"{os.getpid()}-{secrets.token_hex(8)}"


def free_bytes(directory: str) -> int:
    """Free space of the filesystem holding `directory`; 0 when it does not exist."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def fits(directory: str, capacity: int) -> bool:
    return free_bytes(directory) >= capacity + HEADROOM_BYTES
