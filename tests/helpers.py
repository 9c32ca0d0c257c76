"""Tiny random Hugging Face checkpoints saved to disk, for loading through the real code."""

from __future__ import annotations

import torch

FAMILIES = ("qwen2", "qwen3", "llama")


def hf_config(family: str, **overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rms_norm_eps=1e-6, eos_token_id=2, bos_token_id=1, tie_word_embeddings=False)
    if family == "qwen3":
        base["head_dim"] = 16
    base.update(overrides)
    cls = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig}[family]
    return cls(**base)


def make_checkpoint(path, family: str = "qwen2", seed: int = 0, **overrides):
    """Saves a random model (with non-trivial norm weights and biases) to path; returns
    the transformers model in float32 eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **overrides),
                                             dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))  # default init would hide mistakes
            elif p.dim() == 2:
                p.normal_(0, 0.25 / p.shape[1] ** 0.5 * 4)
    model.eval()
    model.save_pretrained(str(path))
    return model
