"""Hugging Face parameter names -> slices of the engine's fused parameters, checkpoint
loading from safetensors, and validation of named tensors before any change is made."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from brorl.engine.config import ModelConfig

# Buffers some checkpoints carry that the engine recomputes itself.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class ParamSlot:
    """Where one HF tensor lives: rows [start, start + rows) of fused parameter `name`."""

    name: str
    start: int
    rows: int
    shape: tuple[int, ...]
    required: bool = True


def hf_param_slots(cfg: ModelConfig) -> dict[str, ParamSlot]:
    """Every HF parameter name the model expects, with its place in the fused tensors."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.q_size, cfg.kv_size
    slots: dict[str, ParamSlot] = {}

    def add(hf: str, name: str, start: int, shape: tuple[int, ...]) -> None:
        slots[hf] = ParamSlot(name, start, shape[0], shape)

    add("model.embed_tokens.weight", "embed", 0, (cfg.vocab_size, H))
    add("model.norm.weight", "norm", 0, (H,))
    if cfg.tie_word_embeddings:  # an alias of the embedding; state_dict() carries both
        slots["lm_head.weight"] = ParamSlot("embed", 0, cfg.vocab_size, (cfg.vocab_size, H),
                                            required=False)
    else:
        add("lm_head.weight", "lm_head", 0, (cfg.vocab_size, H))
    for i in range(cfg.num_layers):
        p, f = f"model.layers.{i}.", f"layers.{i}."
        for proj, start, rows in (("q", 0, q), ("k", q, kv), ("v", q + kv, kv)):
            add(f"{p}self_attn.{proj}_proj.weight", f + "qkv_w", start, (rows, H))
            if cfg.qkv_bias:
                add(f"{p}self_attn.{proj}_proj.bias", f + "qkv_b", start, (rows,))
        add(f"{p}self_attn.o_proj.weight", f + "o_w", 0, (H, q))
        if cfg.o_bias:
            add(f"{p}self_attn.o_proj.bias", f + "o_b", 0, (H,))
        if cfg.qk_norm:
            add(f"{p}self_attn.q_norm.weight", f + "q_norm", 0, (cfg.head_dim,))
            add(f"{p}self_attn.k_norm.weight", f + "k_norm", 0, (cfg.head_dim,))
        add(f"{p}mlp.gate_proj.weight", f + "gate_up_w", 0, (I, H))
        add(f"{p}mlp.up_proj.weight", f + "gate_up_w", I, (I, H))
        add(f"{p}mlp.down_proj.weight", f + "down_w", 0, (H, I))
        if cfg.mlp_bias:
            add(f"{p}mlp.gate_proj.bias", f + "gate_up_b", 0, (I,))
            add(f"{p}mlp.up_proj.bias", f + "gate_up_b", I, (I,))
            add(f"{p}mlp.down_proj.bias", f + "down_b", 0, (H,))
        add(f"{p}input_layernorm.weight", f + "in_norm", 0, (H,))
        add(f"{p}post_attention_layernorm.weight", f + "post_norm", 0, (H,))
    return slots


def fused_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every fused parameter, derived from the HF slots."""
    shapes: dict[str, tuple[int, ...]] = {}
    for slot in hf_param_slots(cfg).values():
        rows = max(shapes.get(slot.name, (0,))[0], slot.start + slot.rows)
        shapes[slot.name] = (rows, *slot.shape[1:])
    return shapes


def matrix_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """The fused [out, in] matrices the forward multiplies by (per layer qkv_w, o_w,
    gate_up_w, down_w, then lm_head, which is the embedding when tied)."""
    shapes = {name: s for name, s in fused_shapes(cfg).items() if name.endswith("_w")}
    shapes["lm_head"] = (cfg.vocab_size, cfg.hidden_size)
    return shapes


def validate_named_tensors(slots: dict[str, ParamSlot],
                           named: Iterable[tuple[str, torch.Tensor]],
                           require_all: bool) -> list[tuple[ParamSlot, torch.Tensor]]:
    """Checks names, shapes and dtypes of every tensor; raises ValueError naming the first
    problem found. Returns (slot, tensor) pairs; nothing is changed."""
    checked: list[tuple[ParamSlot, torch.Tensor]] = []
    seen: set[str] = set()
    for name, t in named:
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name not in slots:
            raise ValueError(f"unknown parameter name {name!r} for this model")
        if name in seen:
            raise ValueError(f"parameter {name!r} given twice")
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"parameter {name!r} must be a floating-point tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != slots[name].shape:
            raise ValueError(f"parameter {name!r} has shape {tuple(t.shape)}, expected "
                             f"{slots[name].shape}")
        seen.add(name)
        checked.append((slots[name], t))
    if require_all:
        missing = sorted(n for n, s in slots.items() if s.required and n not in seen)
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ValueError(f"checkpoint is missing parameters: {missing[:5]}{more}")
    return checked


def _checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return ["model.safetensors"]
    raise FileNotFoundError(f"no model.safetensors (or index) in checkpoint {path!r}")


def checkpoint_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape in a safetensors checkpoint, from the file headers
    alone (nothing is loaded)."""
    from safetensors import safe_open

    out = {}
    for fname in _checkpoint_files(path):
        with safe_open(os.path.join(path, fname), framework="pt") as f:
            for name in f.keys():
                out[name] = tuple(f.get_slice(name).get_shape())
    return out


def iter_checkpoint(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs from model.safetensors or a sharded safetensors index."""
    from safetensors import safe_open

    for fname in _checkpoint_files(path):
        with safe_open(os.path.join(path, fname), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
