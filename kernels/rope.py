"""Rotary position embedding in the "rotate half" layout of Hugging Face Llama/Qwen:
x * cos + rotate_half(x) * sin, with cos/sin [T, head_dim] looked up per position."""

from __future__ import annotations

import torch


def rope_cos_sin_table(inv_freq: torch.Tensor, max_positions: int,
                       attention_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 tables [max_positions, head_dim] of cos and sin (times attention_scaling)."""
    pos = torch.arange(max_positions, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos, sin [T, head_dim] already in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
