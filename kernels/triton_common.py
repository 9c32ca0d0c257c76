"""Input checks and launch heuristics shared by the Triton kernels (kernels/*_triton.py).
Imports triton only under TRITON_INTERPRET=1, to mend its interpreter where needed
(`_mend_interpreter_index`)."""

from __future__ import annotations

import functools
import os

import torch

LOG2E = 1.4426950408889634
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreted() -> bool:
    """Whether Triton runs under its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _mend_interpreter_index() -> bool:
    """Triton's interpreter (3.6 and older) turns a scalar tensor into a Python int (a loop
    bound: `range(start, end, BLOCK)`) with `int(data)` on a 1-element 1-d array, which
    numpy 2.5 refuses (TypeError); later Triton squeezes first. Where the installed pair
    refuses, the interpreter's tensor patch gets the squeezing `__index__`. Checked by
    behaviour, not by version; True when it mended."""
    try:
        import numpy as np
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    scope_cls = getattr(interpreter, "_LangPatchScope", None)
    if patch is None or scope_cls is None or getattr(patch, "_brorl_mended", False):
        return False

    class Probe:
        pass

    scope = scope_cls()
    try:
        patch(Probe, scope)
        index = Probe.__dict__.get("__index__")
        probe = Probe()
        probe.handle = type("Handle", (), {"data": np.array([3], dtype=np.int32)})()
        if index is None or index(probe) == 3:
            return False
    except TypeError:
        pass
    except Exception:  # noqa: BLE001 - an interpreter of another shape: leave it alone
        return False
    finally:
        scope.restore()

    def mended(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    mended._brorl_mended = True
    interpreter._patch_lang_tensor = mended
    return True


if interpreted():
    _mend_interpreter_index()


def check_device(name: str, t: torch.Tensor) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter."""
    if t.device.type != "cuda" and not (t.device.type == "cpu" and interpreted()):
        raise ValueError(f"{name} is on {t.device}: Triton kernels need CUDA tensors "
                         f"(or CPU tensors with TRITON_INTERPRET=1)")


def check_float(name: str, t: torch.Tensor, dims: int) -> None:
    """A float16/bfloat16/float32 tensor of `dims` dims with a unit last stride."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, strides {t.stride()}")
    check_device(name, t)


def check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                q_dims: int) -> None:
    """q [..., num_heads, head_dim] against k/v caches [pages, page_size, kv_heads, d]."""
    check_float("q", q, q_dims)
    check_float("k_cache", k_cache, 4)
    check_float("v_cache", v_cache, 4)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache "
                         f"{tuple(v_cache.shape)} differ")
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(f"dtypes differ: q {q.dtype}, k_cache {k_cache.dtype}, v_cache "
                         f"{v_cache.dtype}")
    if not q.device == k_cache.device == v_cache.device:
        raise ValueError(f"devices differ: q {q.device}, k_cache {k_cache.device}")
    if q.shape[-1] != k_cache.shape[3]:
        raise ValueError(f"head_dim of q ({q.shape[-1]}) != of the cache ({k_cache.shape[3]})")
    if q.shape[-2] % k_cache.shape[2]:
        raise ValueError(f"{q.shape[-2]} query heads do not group over {k_cache.shape[2]} "
                         f"KV heads")


def check_int(name: str, t: torch.Tensor, dims: int, device: torch.device,
              rows: int | None = None) -> None:
    """An int32/int64 tensor of `dims` dims on `device`, contiguous in its last dim."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(t.shape)}")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} has {t.shape[0]} rows, expected {rows}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if t.numel() > 1 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, strides {t.stride()}")


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get exact (IEEE) products; fp16/bf16 use the tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(work: int, max_tokens: int, device: torch.device,
               min_split_tokens: int = 256, max_splits: int = 32) -> int:
    """KV splits so that `work` programs per split fill the GPU about twice over, each
    split covering at least `min_split_tokens` keys. One split on CPU."""
    if device.type != "cuda":
        return 1
    want = -(-2 * _num_sms(device.index or 0) // max(work, 1))
    return max(1, min(want, -(-max_tokens // min_split_tokens), max_splits))
