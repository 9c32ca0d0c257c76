"""The Triton attention backend (CUDA, or CPU under TRITON_INTERPRET=1): decode runs the
cascade kernels (shared prefix once per group, private suffix per row, one LSE merge) or
plain paged decode; extend runs the paged extend kernel. KV writes stay the pool's.
Imported only when chosen (brorl.engine.attention.LAZY_BACKENDS), so triton stays optional."""

from __future__ import annotations

import torch

from brorl.engine.attention import DecodeMeta, ExtendMeta, TorchBackend
from brorl.kernels.decode_attention_triton import cascade_decode_triton, paged_decode_triton
from brorl.kernels.extend_attention_triton import (
    ExtendPacked,
    extend_attention_packed,
    pack_extend_meta,
)


class TritonBackend(TorchBackend):
    """Triton kernels for every attention call; the metadata of an extend step is packed
    into tensors once in `begin`, not once per layer, and a decode step's group padding
    comes from the host (`DecodeMeta.group_padded`), so no layer waits on the device."""

    name = "triton"

    @staticmethod
    def paged(q, k_cache, v_cache, page_table, seq_lens, scale):
        return paged_decode_triton(q, k_cache, v_cache, page_table, seq_lens, scale)

    def begin(self, meta: DecodeMeta | ExtendMeta) -> None:
        self.meta = meta
        self.packed: ExtendPacked | None = None
        if isinstance(meta, ExtendMeta):
            self.packed = pack_extend_meta(meta.page_tables, meta.prefix_lens,
                                           meta.extend_lens, meta.slots.device)

    def extend(self, q, kc, vc, m: ExtendMeta) -> torch.Tensor:
        return extend_attention_packed(q, kc, vc, self.packed, self.scale)

    def cascade_decode(self, q, kc, vc, m: DecodeMeta) -> torch.Tensor:
        return cascade_decode_triton(q, kc, vc, m.group_rows, m.prefix_pages, m.prefix_lens,
                                     m.suffix_pages, m.suffix_lens, self.scale,
                                     padded=m.group_padded)
