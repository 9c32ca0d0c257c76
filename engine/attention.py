"""Attention backends. A backend owns the KV writes and the attention math of one step;
the model runner describes the step with `DecodeMeta` or `ExtendMeta`. Backends are chosen
by name from `BACKENDS`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from brorl.engine.kv_pool import KVPool
from brorl.kernels.decode_attention import cascade_decode_ref, paged_decode_ref
from brorl.kernels.extend_attention import extend_attention_ref
from brorl.kernels.triton_common import interpreted


@dataclass
class DecodeMeta:
    """One query per row. Rows of a group are described twice: for cascade decode
    (group_rows/prefix_* + suffix_*) and for plain paged decode (page_table/seq_lens)."""

    slots: torch.Tensor  # [B] flat KV slot of each row's new token
    page_table: torch.Tensor | None  # [B, P] all pages of each row (paged decode)
    seq_lens: torch.Tensor | None  # [B]
    group_rows: torch.Tensor | None  # [G, Nmax] rows per group with a shared prefix, -1 pad
    prefix_pages: torch.Tensor | None  # [G, Pp]
    prefix_lens: torch.Tensor | None  # [G]
    suffix_pages: torch.Tensor | None  # [B, Ps] private pages of each row
    suffix_lens: torch.Tensor | None  # [B]
    # whether some group_rows entry is -1 padding, known on the host when the runner
    # builds the metadata; backends that need it then skip a device check (one sync)
    group_padded: bool | None = None


@dataclass
class ExtendMeta:
    slots: torch.Tensor  # [T] flat KV slot of each new token
    page_tables: list[torch.Tensor]  # per sequence
    prefix_lens: list[int]
    extend_lens: list[int]


class TorchBackend:
    """Plain-torch reference attention (kernels/*_ref)."""

    name = "torch"

    @staticmethod
    def paged(q, k_cache, v_cache, page_table, seq_lens, scale):
        return paged_decode_ref(q, k_cache, v_cache, page_table, seq_lens, scale)

    def __init__(self, kv: KVPool, scale: float, cascade: bool) -> None:
        self.kv = kv
        self.scale = scale
        self.cascade = cascade
        self.meta: DecodeMeta | ExtendMeta | None = None

    def begin(self, meta: DecodeMeta | ExtendMeta) -> None:
        self.meta = meta

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
        """Writes the step's K/V, then runs extend, cascade or paged attention. Fast
        backends override `paged`, `cascade_decode` and `extend`, not this dispatch."""
        m = self.meta
        self.kv.write(layer, m.slots, k, v)
        kc, vc = self.kv.k[layer], self.kv.v[layer]
        if isinstance(m, ExtendMeta):
            return self.extend(q, kc, vc, m)
        if self.cascade:
            out = self.cascade_decode(q, kc, vc, m)
        else:
            out, _ = self.paged(q, kc, vc, m.page_table, m.seq_lens, self.scale)
        return out.to(q.dtype)

    def extend(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
               m: ExtendMeta) -> torch.Tensor:
        """Prefill attention of one layer -> [T, num_heads, head_dim] in q's dtype."""
        return extend_attention_ref(q, kc, vc, m.page_tables, m.prefix_lens, m.extend_lens,
                                    self.scale)

    def cascade_decode(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                       m: DecodeMeta) -> torch.Tensor:
        """Shared-prefix decode of one layer -> float32 [B, num_heads, head_dim]."""
        return cascade_decode_ref(q, kc, vc, m.group_rows, m.prefix_pages, m.prefix_lens,
                                  m.suffix_pages, m.suffix_lens, self.scale,
                                  paged_fn=self.paged)


class NumbaBackend(TorchBackend):
    """CPU float32: the per-row (paged / suffix) stage runs as a fused numba kernel that
    reads pages in place; the shared-prefix stage stays a torch matrix product."""

    name = "numba"

    @staticmethod
    def paged(q, k_cache, v_cache, page_table, seq_lens, scale):
        from brorl.kernels.decode_attention_numba import paged_decode_numba

        return paged_decode_numba(q, k_cache, v_cache, page_table, seq_lens, scale)


BACKENDS = {"torch": TorchBackend, "numba": NumbaBackend}
# Backends whose modules import optional packages (triton, the C++ extension) are named
# here as "module:Class" and imported only when chosen.
LAZY_BACKENDS: dict[str, str] = {"triton": "brorl.engine.attention_triton:TritonBackend",
                                 "cpp": "brorl.engine.attention_cpp:CppBackend"}


def default_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    """The backend "auto" picks for a KV pool of `dtype` on `device` (`brorl info` asks)."""
    device = torch.device(device)
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
        from brorl.kernels.decode_attention_cpp import attention_ext_built

        if attention_ext_built():
            return "cpp"
    if device.type == "cpu" and dtype == torch.float32:
        try:
            import numba  # noqa: F401
        except ImportError:
            return "torch"
        return "numba"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"
    return "torch"


def _auto(kv: KVPool, device: torch.device) -> str:
    return default_backend(device, kv.k.dtype)


def _resolve(name: str):
    if name in BACKENDS:
        return BACKENDS[name]
    if name in LAZY_BACKENDS:
        import importlib

        module, cls = LAZY_BACKENDS[name].split(":")
        try:
            return getattr(importlib.import_module(module), cls)
        except ImportError as exc:
            raise ValueError(f"attention backend {name!r} cannot be used here: {exc}") from exc
    raise ValueError(f"attention backend {name!r} is not available; available: "
                     f"{', '.join(['auto', *BACKENDS, *LAZY_BACKENDS])}")


def make_backend(name: str, kv: KVPool, scale: float, cascade: bool, device: torch.device):
    """Resolves "auto" for the device and dtype, and builds the backend."""
    if name == "auto":
        name = _auto(kv, device)
    if name == "numba" and (device.type != "cpu" or kv.k.dtype != torch.float32):
        raise ValueError("the numba attention backend runs float32 on CPU only")
    if name == "triton" and device.type != "cuda" and not interpreted():
        raise ValueError(f"the triton attention backend needs a CUDA device, got {device} "
                         "(on CPU only under TRITON_INTERPRET=1, for tests)")
    return _resolve(name)(kv, scale, cascade)
