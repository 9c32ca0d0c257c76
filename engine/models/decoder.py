"""Inference definition of the Llama / Qwen2 / Qwen3 decoder families: GQA attention with
RoPE (optional q/k RMSNorm, optional biases), SwiGLU MLP, RMSNorm, tied or untied LM head.
q/k/v and gate/up projections are fused into one matrix each; `hf_param_slots` maps the
Hugging Face names onto them. Attention itself is delegated to a backend that owns the KV
cache and the batch metadata."""

from __future__ import annotations

import functools
from typing import Protocol

import torch
import torch.nn.functional as F

from brorl.engine.config import ModelConfig
from brorl.engine.models.rope import rope_inv_freq
from brorl.engine.models.weights import (
    ParamSlot,
    fused_shapes,
    hf_param_slots,
    iter_checkpoint,
    matrix_shapes,
    validate_named_tensors,
)
from brorl.kernels.linear import make_linear
from brorl.kernels.norm import rms_norm_ref
from brorl.kernels.rope import apply_rope_ref, rope_cos_sin_table


@functools.lru_cache(maxsize=1)
def _triton_kernels():
    """(rms_norm, apply_rope) Triton kernels, or None when triton is not installed."""
    try:
        from brorl.kernels.norm_triton import rms_norm_triton
        from brorl.kernels.rope_triton import apply_rope_triton
    except ImportError:
        return None
    return rms_norm_triton, apply_rope_triton


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm: the Triton kernel on CUDA when triton imports, else the torch reference."""
    fast = _triton_kernels() if x.is_cuda else None
    return fast[0](x, weight, eps) if fast else rms_norm_ref(x, weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE: the Triton kernel on CUDA when triton imports, else the torch reference."""
    fast = _triton_kernels() if x.is_cuda else None
    return fast[1](x, cos, sin) if fast else apply_rope_ref(x, cos, sin)


class Attention(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
        """q [T, num_heads, d], k/v [T, num_kv_heads, d] -> out [T, num_heads, d]."""


class DecoderLM:
    """Holds the fused weights and runs the forward pass for flattened token batches."""

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                 linear_backend: str = "auto") -> None:
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.linear = make_linear(linear_backend, device, dtype)
        self.slots: dict[str, ParamSlot] = hf_param_slots(cfg)
        self.params: dict[str, torch.Tensor] = {
            name: torch.empty(shape, device=device, dtype=dtype)
            for name, shape in fused_shapes(cfg).items()
        }
        if cfg.tie_word_embeddings:
            self.params["lm_head"] = self.params["embed"]
        inv_freq, scaling = rope_inv_freq(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
        cos, sin = rope_cos_sin_table(inv_freq, cfg.max_position_embeddings, scaling)
        self.cos, self.sin = cos.to(device, dtype), sin.to(device, dtype)
        self.scale = cfg.head_dim ** -0.5
        # matrices in the linear backend's form (oneDNN layout on CPU), kept in step with
        # self.params by _apply
        self.packed: dict[str, torch.Tensor] = {}
        self._matrices = set(matrix_shapes(cfg))

    # -- weights ---------------------------------------------------------------------
    def load_checkpoint(self, path: str) -> None:
        """Loads every parameter from a HF safetensors checkpoint directory."""
        checked = validate_named_tensors(self.slots, iter_checkpoint(path), require_all=True)
        self._apply(checked)

    def update(self, named_tensors) -> int:
        """Validates all tensors first (ValueError, nothing changed), then copies them in.
        Returns the number of tensors applied."""
        checked = validate_named_tensors(self.slots, named_tensors, require_all=False)
        self._apply(checked)
        return len(checked)

    @torch.no_grad()
    def _apply(self, checked: list[tuple[ParamSlot, torch.Tensor]]) -> None:
        for slot, t in checked:
            self.params[slot.name][slot.start:slot.start + slot.rows].copy_(t)
        changed = {slot.name for slot, _ in checked}
        if "embed" in changed and self.cfg.tie_word_embeddings:
            changed.add("lm_head")
        for name in sorted(changed & self._matrices):
            self.packed[name] = self.linear.pack(self.params[name])

    def _lin(self, x: torch.Tensor, name: str, bias: str | None = None) -> torch.Tensor:
        return self.linear(x, self.packed[name], self.params.get(bias) if bias else None)

    # -- forward ---------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attention: Attention) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden] (before the norm)."""
        cfg, p = self.cfg, self.params
        x = F.embedding(input_ids, p["embed"])
        cos, sin = self.cos[positions], self.sin[positions]
        T = x.shape[0]
        for i in range(cfg.num_layers):
            f = f"layers.{i}."
            h = rms_norm(x, p[f + "in_norm"], cfg.rms_norm_eps)
            qkv = self._lin(h, f + "qkv_w", f + "qkv_b")
            q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            q = q.view(T, cfg.num_heads, cfg.head_dim)
            k = k.view(T, cfg.num_kv_heads, cfg.head_dim)
            v = v.view(T, cfg.num_kv_heads, cfg.head_dim)
            if cfg.qk_norm:
                q = rms_norm(q, p[f + "q_norm"], cfg.rms_norm_eps)
                k = rms_norm(k, p[f + "k_norm"], cfg.rms_norm_eps)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            o = attention(i, q, k, v).reshape(T, cfg.q_size)
            x = x + self._lin(o, f + "o_w", f + "o_b")
            h = rms_norm(x, p[f + "post_norm"], cfg.rms_norm_eps)
            gate, up = self._lin(h, f + "gate_up_w", f + "gate_up_b").chunk(2, dim=-1)
            x = x + self._lin(F.silu(gate) * up, f + "down_w", f + "down_b")
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head for the selected rows -> float32 [R, vocab]."""
        h = rms_norm(hidden, self.params["norm"], self.cfg.rms_norm_eps)
        return self._lin(h, "lm_head").float()
