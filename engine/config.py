"""Frozen configuration of the engine: the model (translated once from Hugging Face's
config.json) and the engine itself. Runtime measurements (pages that fit, say) live in
runtime objects, never here."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: base `theta`, scaling `type` and its parameters."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn
    mscale: float | None = None  # yarn (deepseek-style)
    mscale_all_dim: float | None = None  # yarn (deepseek-style)
    truncate: bool = True  # yarn

    def __post_init__(self) -> None:
        if self.type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope scaling type {self.type!r}; "
                             f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        if self.theta <= 0 or self.factor <= 0:
            raise ValueError(f"rope theta and factor must be positive, got {self.theta}, "
                             f"{self.factor}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> RopeConfig:
        """Reads transformers-5 `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
        params = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or {}
        params = {**scaling, **params}
        theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = params.pop("rope_type", params.pop("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:  # before its parameters: name the type
            raise ValueError(f"unsupported rope scaling type {rope_type!r}; "
                             f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        partial = params.pop("partial_rotary_factor", 1.0)
        if partial != 1.0:
            raise ValueError(f"partial rotary embeddings (partial_rotary_factor={partial}) "
                             "are not supported")
        if rope_type == "yarn" and params.get("factor") is None:
            # as transformers: the context extension the two lengths describe
            original = params.get("original_max_position_embeddings")
            if not original:
                raise ValueError("yarn rope without a factor needs "
                                 "original_max_position_embeddings")
            params["factor"] = hf.get("max_position_embeddings", 2048) / original
        known = {f for f in cls.__dataclass_fields__ if f not in ("theta", "type")}
        unknown = sorted(k for k in params if k not in known)
        if unknown:
            raise ValueError(f"unsupported rope parameters {unknown} for rope type {rope_type!r}")
        return cls(theta=float(theta), type=rope_type, **params)


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only transformer of the Llama/Qwen2/Qwen3 families."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unknown model type {self.model_type!r}; supported: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"model config {name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def gqa_ratio(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, element_size: int) -> int:
        """Bytes of K and V cache that one token occupies over all layers."""
        return 2 * self.num_layers * self.kv_size * element_size

    @classmethod
    def from_hf(cls, hf: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
        """Translates a Hugging Face config.json dict (and generation_config.json)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unknown model type {model_type!r} in config.json; supported: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}: only 'silu' (SwiGLU) models")
        if hf.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not supported (use_sliding_window=true)")
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        eos = eos_token_ids(hf, generation)
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope=RopeConfig.from_hf(hf),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=attention_bias if model_type in ("llama", "qwen3") else False,
            mlp_bias=bool(hf.get("mlp_bias", False)) if model_type == "llama" else False,
            qk_norm=model_type == "qwen3",
            eos_token_ids=eos,
        )

    @classmethod
    def from_dir(cls, path: str) -> ModelConfig:
        """Reads config.json (and generation_config.json when present) from a checkpoint."""
        return cls.from_hf(*read_hf_configs(path))


def read_hf_configs(path: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A checkpoint's config.json and its generation_config.json (None when absent)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json in checkpoint directory {path!r}")
    with open(cfg_path) as f:
        hf = json.load(f)
    gen_path = os.path.join(path, "generation_config.json")
    generation = None
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            generation = json.load(f)
    return hf, generation


def eos_token_ids(hf: dict[str, Any], generation: dict[str, Any] | None) -> tuple[int, ...]:
    """The EOS ids of config.json and generation_config.json, in order, once each."""
    eos: list[int] = []
    for src in (hf, generation or {}):
        ids = src.get("eos_token_id")
        for i in ids if isinstance(ids, list) else [ids]:
            if i is not None and i not in eos:
                eos.append(int(i))
    return tuple(eos)


def with_tokenizer_eos(eos: tuple[int, ...], tokenizer) -> tuple[int, ...]:
    """The configs' EOS ids and then the tokenizer's EOS, as vLLM stops on it too: a
    checkpoint whose configs name none (or another one) still ends at its tokenizer's."""
    extra = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    return eos if extra is None or extra in eos else (*eos, int(extra))


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs. `max_kv_tokens=None` sizes the KV pool from free memory."""

    model: str
    device: str = "cpu"
    dtype: str = "float32"
    page_size: int = 16
    max_kv_tokens: int | None = None
    max_batch_size: int | None = None
    max_prefill_tokens: int = 8192
    attention_backend: str = "auto"
    # dense layers: "auto" (onednn on CPU for float32/bfloat16, else torch), "torch", "onednn"
    linear_backend: str = "auto"
    cascade_decode: bool = True
    # Decode runs the model once for the samples of one prompt whose tokens so far are
    # identical (a peaked policy at large N repeats itself); the others get copies of that
    # row's new KV and logits and still draw their own next token.
    merge_identical_samples: bool = True
    # Fraction of each running sample's remaining max_tokens whose pages are reserved at
    # admission. 1.0 never preempts; lower values admit more samples when most stop early
    # and rely on preemption (free + recompute) when the pool still runs out.
    reserve_ratio: float = 1.0
    kv_memory_fraction: float = 0.3
    seed: int | None = None
    debug_integrity: bool = False  # check radix cache + page accounting after every step

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.max_kv_tokens is not None and self.max_kv_tokens < self.page_size:
            raise ValueError(f"max_kv_tokens ({self.max_kv_tokens}) must hold at least one "
                             f"page of {self.page_size} tokens")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if not 0.0 <= self.reserve_ratio <= 1.0:
            raise ValueError(f"reserve_ratio must be in [0, 1], got {self.reserve_ratio}")
        if not 0.0 < self.kv_memory_fraction < 1.0:
            raise ValueError(f"kv_memory_fraction must be in (0, 1), got "
                             f"{self.kv_memory_fraction}")
