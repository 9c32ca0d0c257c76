"""CPU fast path of paged and cascade decode attention in C++ with OpenMP
(csrc/attention, built into `brorl.kernels._attention_ext` by `python setup.py build_ext
--inplace`). Same contracts as `paged_decode_ref` and `cascade_decode_ref` in
kernels/decode_attention.py; float32 or bfloat16 KV (accumulated in float32). The
extension is imported lazily: `attention_ext_built()` says whether it is there."""

from __future__ import annotations

import importlib
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def _ext():
    try:
        return importlib.import_module("brorl.kernels._attention_ext")
    except ImportError:
        return None


def attention_ext_built() -> bool:
    """True when the C++ attention extension is built and importable."""
    return _ext() is not None


def _require_ext():
    ext = _ext()
    if ext is None:
        raise ImportError("brorl.kernels._attention_ext is not built; run `python setup.py "
                          "build_ext --inplace` (needs a C++ compiler and pybind11)")
    return ext


def _check_cpu(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"C++ decode attention runs on CPU; {name} is on {t.device}")


def _kv_array(t: torch.Tensor, name: str):
    """float32 -> float32 array, bfloat16 -> its int16 bits (zero-copy when contiguous)."""
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy()
    if t.dtype == torch.float32:
        return t.contiguous().numpy()
    raise ValueError(f"C++ decode attention needs float32 or bfloat16 {name}, got {t.dtype}")


def _q_array(q: torch.Tensor):
    if not q.is_floating_point():
        raise ValueError(f"q must be a floating tensor, got {q.dtype}")
    return q.detach().to(torch.float32).contiguous().numpy()


def _index_array(t: torch.Tensor):
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"page tables and lengths must be integer tensors, got {t.dtype}")
    return t.to(torch.int64).contiguous().numpy()


def paged_decode_cpp(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     page_table: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out float32 [B, H, D], lse float32 [B, H]) as `paged_decode_ref` returns.
    Raises ValueError on bad shapes/dtypes/lengths and IndexError on page ids out of range."""
    _check_cpu(q=q, k_cache=k_cache, v_cache=v_cache, page_table=page_table,
               seq_lens=seq_lens)
    out, lse = _require_ext().paged_decode(
        _q_array(q), _kv_array(k_cache, "k_cache"), _kv_array(v_cache, "v_cache"),
        _index_array(page_table), _index_array(seq_lens), float(scale))
    return torch.from_numpy(out), torch.from_numpy(lse)


def cascade_decode_cpp(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       group_rows: torch.Tensor, prefix_pages: torch.Tensor,
                       prefix_lens: torch.Tensor, suffix_pages: torch.Tensor,
                       suffix_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """out float32 [B, H, D] as `cascade_decode_ref` returns: shared prefix per group (one
    blocked matrix product per group and KV head), private suffix per row, LSE merge, in
    one call. A row may appear in at most one group."""
    _check_cpu(q=q, k_cache=k_cache, v_cache=v_cache, group_rows=group_rows,
               prefix_pages=prefix_pages, prefix_lens=prefix_lens, suffix_pages=suffix_pages,
               suffix_lens=suffix_lens)
    out = _require_ext().cascade_decode(
        _q_array(q), _kv_array(k_cache, "k_cache"), _kv_array(v_cache, "v_cache"),
        _index_array(group_rows), _index_array(prefix_pages), _index_array(prefix_lens),
        _index_array(suffix_pages), _index_array(suffix_lens), float(scale))
    return torch.from_numpy(out)
