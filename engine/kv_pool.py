"""The paged KV pool: per layer K and V tensors [num_pages, page_size, kv_heads, head_dim],
and how many pages fit."""

from __future__ import annotations

import math
import os
import weakref

import numpy as np
import torch

from brorl.engine.config import EngineConfig, ModelConfig
from brorl.kernels.transfer import upload


class KVPool:
    def __init__(self, cfg: ModelConfig, num_pages: int, page_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        shape = (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        # zeros: padded gathers read unused pages, which must hold finite values.
        self.k = _zeros(shape, dtype, device)
        self.v = _zeros(shape, dtype, device)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores k, v [T, kv_heads, head_dim] at flat slots [T] (page * page_size + offset)."""
        kl = self.k[layer].view(-1, *self.k.shape[3:])
        vl = self.v[layer].view(-1, *self.v.shape[3:])
        kl.index_copy_(0, slots, k)
        vl.index_copy_(0, slots, v)

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copies the K and V of flat slots src[i] -> dst[i] in every layer."""
        flat = (self.k.shape[0], -1, *self.k.shape[3:])
        for cache in (self.k, self.v):
            view = cache.view(flat)
            view[:, dst] = view[:, src]

    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        """Copies whole pages src[i] -> dst[i] in every layer."""
        s, d = upload([np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)],
                      self.k.device)
        self.k[:, d] = self.k[:, s]
        self.v[:, d] = self.v[:, s]


def _zeros(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros; on CPU from calloc'd memory (numpy's zeros), whose pages the OS maps,
    zeroed, on first touch. A pool sized for a share of free memory then costs neither the
    seconds to clear it (about 1 s per 2 GB here) nor resident memory for pages no request
    reaches."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    raw = torch.from_numpy(np.zeros(nbytes + 64, dtype=np.uint8))
    start = -raw.data_ptr() % 64  # the 64-byte alignment of torch's own allocator
    out = raw[start:start + nbytes].view(dtype).view(shape)
    _lazy_pool_bytes[0] += nbytes
    weakref.finalize(out, _release, nbytes)
    return out


# Bytes of this process's live CPU pools. Free memory does not show the pages they have not
# touched yet, so sizing another pool counts them as taken (all of them: conservative where
# some are already mapped, never more than the memory exists for). Other processes on the
# machine cannot be seen: give each its rollout.max_kv_tokens there.
_lazy_pool_bytes = [0]


def _release(nbytes: int) -> None:
    _lazy_pool_bytes[0] -= nbytes


def num_pages_that_fit(model: ModelConfig, config: EngineConfig, dtype: torch.dtype,
                       device: torch.device) -> int:
    """Pages for `max_kv_tokens`, or for a fraction of the memory free now."""
    if config.max_kv_tokens is not None:
        return config.max_kv_tokens // config.page_size
    per_page = model.kv_bytes_per_token(torch.finfo(dtype).bits // 8) * config.page_size
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = max(0, os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
                   - _lazy_pool_bytes[0])
    pages = int(free * config.kv_memory_fraction) // per_page
    if pages < 1:
        raise ValueError(f"not enough free memory for one KV page ({per_page} bytes)")
    return pages
