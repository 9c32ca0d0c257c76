"""The "cpp" attention backend: decode attention (cascade or paged) through the C++/OpenMP
kernels of kernels/decode_attention_cpp.py on CPU, float32 or bfloat16 KV; extend (prefill)
stays the torch reference. Imported only when chosen (LAZY_BACKENDS)."""

from __future__ import annotations

import torch

from brorl.engine.attention import DecodeMeta, TorchBackend
from brorl.engine.kv_pool import KVPool
from brorl.kernels.decode_attention_cpp import (
    attention_ext_built,
    cascade_decode_cpp,
    paged_decode_cpp,
)


class CppBackend(TorchBackend):
    """C++ decode attention on CPU: the paged stage and the whole cascade (prefix tile,
    suffix, merge) in one call per layer."""

    name = "cpp"
    paged = staticmethod(paged_decode_cpp)

    def __init__(self, kv: KVPool, scale: float, cascade: bool) -> None:
        if not attention_ext_built():
            raise ValueError("the cpp attention backend needs brorl.kernels._attention_ext; build "
                             "it with `python setup.py build_ext --inplace`")
        if kv.k.device.type != "cpu" or kv.k.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the cpp attention backend runs float32 or bfloat16 KV on CPU, "
                             f"got {kv.k.dtype} on {kv.k.device}")
        super().__init__(kv, scale, cascade)

    def cascade_decode(self, q, kc, vc, m: DecodeMeta) -> torch.Tensor:
        return cascade_decode_cpp(q, kc, vc, m.group_rows, m.prefix_pages, m.prefix_lens,
                                  m.suffix_pages, m.suffix_lens, self.scale)
