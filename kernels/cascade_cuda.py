"""CUDA cascade decode and LSE merge (csrc/cuda, built into `brorl.kernels._cuda_ext` only when
nvcc and a CUDA build of torch exist). Launchers with the contracts of
`cascade_decode_ref`, `paged_decode_ref` and `merge_states_ref` in
kernels/decode_attention.py, on CUDA tensors: float32 or bfloat16 KV, float32 outputs.
They check devices, dtypes, shapes and index ranges (one device sync for the ranges) and
pass raw pointers to the extension, which is imported lazily."""

from __future__ import annotations

import importlib
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def _ext():
    try:
        return importlib.import_module("brorl.kernels._cuda_ext")
    except ImportError:
        return None


def cuda_ext_built() -> bool:
    """True when the CUDA extension is built and importable."""
    return _ext() is not None


def _require_ext():
    if _ext() is None:
        raise ImportError("brorl.kernels._cuda_ext is not built (needs nvcc and a CUDA build of "
                          "torch at `python setup.py build_ext --inplace`)")
    return _ext()


def _on(device: torch.device, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != device or device.type != "cuda":
            raise ValueError(f"{name} is on {t.device}; all inputs must be on one CUDA "
                             f"device ({device})")


def _kv(k_cache: torch.Tensor, v_cache: torch.Tensor, q: torch.Tensor):
    if k_cache.dtype not in (torch.float32, torch.bfloat16) or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"KV must be float32 or bfloat16 (both alike), got {k_cache.dtype} "
                         f"and {v_cache.dtype}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} "
                         "must both be [num_pages, page_size, num_kv_heads, head_dim]")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if q.dim() != 3 or q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not fit k_cache {tuple(k_cache.shape)}")


def _index(t: torch.Tensor, name: str, rows: int, lo: int, hi: int) -> torch.Tensor:
    t = t.to(torch.int64).contiguous()
    if t.dim() != 2 or t.shape[0] != rows:
        raise ValueError(f"{name} must be [{rows}, *], got {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < lo or int(t.max()) >= hi):
        raise IndexError(f"{name} holds entries outside [{lo}, {hi})")
    return t


def _lens(t: torch.Tensor, name: str, n: int, max_len: int) -> torch.Tensor:
    t = t.to(torch.int64).contiguous()
    if t.shape != (n,):
        raise ValueError(f"{name} must be [{n}], got {tuple(t.shape)}")
    if n and (int(t.min()) < 0 or int(t.max()) > max_len):
        raise ValueError(f"{name} must lie in [0, pages * page_size = {max_len}]")
    return t


def _kv_args(q, k_cache, v_cache):
    num_pages, page_size, hkv, d = k_cache.shape
    return (k_cache.data_ptr(), v_cache.data_ptr(), k_cache.dtype == torch.bfloat16,
            page_size, hkv, d, q.shape[0], q.shape[1])


def cascade_decode_cuda(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        group_rows: torch.Tensor, prefix_pages: torch.Tensor,
                        prefix_lens: torch.Tensor, suffix_pages: torch.Tensor,
                        suffix_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """out float32 [B, H, D] as `cascade_decode_ref` returns (a row in at most one group)."""
    _on(q.device, q=q, k_cache=k_cache, v_cache=v_cache, group_rows=group_rows,
        prefix_pages=prefix_pages, prefix_lens=prefix_lens, suffix_pages=suffix_pages,
        suffix_lens=suffix_lens)
    _kv(k_cache, v_cache, q)
    B, H, D = q.shape
    num_pages, ps = k_cache.shape[:2]
    groups = group_rows.shape[0]
    gr = _index(group_rows, "group_rows", groups, -1, B)
    valid = gr[gr >= 0]
    if valid.numel() != valid.unique().numel():
        raise ValueError("a row appears in group_rows twice")
    pp = _index(prefix_pages, "prefix_pages", groups, 0, num_pages)
    pl = _lens(prefix_lens, "prefix_lens", groups, pp.shape[1] * ps)
    sp = _index(suffix_pages, "suffix_pages", B, 0, num_pages)
    sl = _lens(suffix_lens, "suffix_lens", B, sp.shape[1] * ps)
    qf = q.detach().to(torch.float32).contiguous()
    o_p = torch.zeros(B, H, D, dtype=torch.float32, device=q.device)
    l_p = torch.full((B, H), float("-inf"), dtype=torch.float32, device=q.device)
    o_s, l_s, out = torch.empty_like(o_p), torch.empty_like(l_p), torch.empty_like(o_p)
    with torch.cuda.device(q.device):
        _require_ext().cascade_decode(
            qf.data_ptr(), *_kv_args(q, k_cache, v_cache), gr.data_ptr(), groups,
            gr.shape[1], pp.data_ptr(), pp.shape[1], pl.data_ptr(), sp.data_ptr(),
            sp.shape[1], sl.data_ptr(), float(scale), o_p.data_ptr(), l_p.data_ptr(),
            o_s.data_ptr(), l_s.data_ptr(), out.data_ptr(),
            torch.cuda.current_stream().cuda_stream)
    return out


def paged_decode_cuda(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      page_table: torch.Tensor, seq_lens: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out float32 [B, H, D], lse float32 [B, H]) as `paged_decode_ref` returns."""
    _on(q.device, q=q, k_cache=k_cache, v_cache=v_cache, page_table=page_table, seq_lens=seq_lens)
    _kv(k_cache, v_cache, q)
    B, H, D = q.shape
    pt = _index(page_table, "page_table", B, 0, k_cache.shape[0])
    sl = _lens(seq_lens, "seq_lens", B, pt.shape[1] * k_cache.shape[1])
    qf = q.detach().to(torch.float32).contiguous()
    out = torch.empty(B, H, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, dtype=torch.float32, device=q.device)
    with torch.cuda.device(q.device):
        _require_ext().paged_decode(qf.data_ptr(), *_kv_args(q, k_cache, v_cache),
                                    pt.data_ptr(), pt.shape[1], sl.data_ptr(), float(scale),
                                    out.data_ptr(), lse.data_ptr(),
                                    torch.cuda.current_stream().cuda_stream)
    return out, lse


def merge_states_cuda(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor,
                      lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) as `merge_states_ref` returns; float32 o [..., D] and lse [...]."""
    _on(o_a.device, o_a=o_a, lse_a=lse_a, o_b=o_b, lse_b=lse_b)
    if o_a.shape != o_b.shape or lse_a.shape != lse_b.shape or o_a.shape[:-1] != lse_a.shape:
        raise ValueError(f"shapes do not match: o {tuple(o_a.shape)}, {tuple(o_b.shape)}; "
                         f"lse {tuple(lse_a.shape)}, {tuple(lse_b.shape)}")
    if any(t.dtype != torch.float32 for t in (o_a, lse_a, o_b, lse_b)):
        raise ValueError("merge_states_cuda takes float32 partial results")
    o_a, lse_a, o_b, lse_b = (t.contiguous() for t in (o_a, lse_a, o_b, lse_b))
    out, lse = torch.empty_like(o_a), torch.empty_like(lse_a)
    with torch.cuda.device(o_a.device):
        _require_ext().merge_states(o_a.data_ptr(), lse_a.data_ptr(), o_b.data_ptr(),
                                    lse_b.data_ptr(), lse_a.numel(), o_a.shape[-1],
                                    out.data_ptr(), lse.data_ptr(),
                                    torch.cuda.current_stream().cuda_stream)
    return out, lse
