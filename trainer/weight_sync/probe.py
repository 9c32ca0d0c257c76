"""The probe check: after a sync, the engine's logits and the trainer's on one fixed prompt
should agree (to float rounding; ~1e-6 in float32, ~1e-2 in bfloat16). A larger difference
means weights were lost, mis-mapped or applied to the wrong version."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("brorl")

PROBE_TEXT = "Probe: 12 + 30 = 42. The quick brown fox jumps over the lazy dog."


def probe_ids(tokenizer, vocab_size: int, length: int = 16) -> list[int]:
    """The fixed probe prompt's token ids (a fixed text when there is a tokenizer, else
    fixed ids), at most `length` tokens."""
    if tokenizer is not None:
        ids = tokenizer(PROBE_TEXT)["input_ids"]
        if ids:
            return list(ids)[:length]
    return [(7 * i + 3) % vocab_size for i in range(length)]


class _DenseCausal:
    """Plain causal GQA attention over one sequence (no KV cache): the probe's reference
    path through the engine's own fused weights."""

    def __init__(self, num_heads: int, num_kv_heads: int, scale: float) -> None:
        self.group = num_heads // num_kv_heads
        self.scale = scale

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
        k = k.repeat_interleave(self.group, dim=1)
        v = v.repeat_interleave(self.group, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                             v.transpose(0, 1), is_causal=True,
                                             scale=self.scale)
        return out.transpose(0, 1)


@torch.inference_mode()
def engine_logits(engine, ids: list[int]) -> torch.Tensor:
    """float32 logits [T, vocab] of the engine's current weights at every position of
    `ids` (the engine's decoder with dense attention; the KV cache is not touched)."""
    model = engine.model
    cfg = model.cfg
    tokens = torch.tensor(ids, dtype=torch.int64, device=model.device)
    positions = torch.arange(len(ids), device=model.device)
    hidden = model.forward(tokens, positions,
                           _DenseCausal(cfg.num_heads, cfg.num_kv_heads, model.scale))
    return model.logits(hidden).float().cpu()


@torch.no_grad()
def trainer_logits(model, ids: list[int]) -> torch.Tensor:
    """float32 logits [T, vocab] of the trainer's HF model (eval mode for the call)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        out = model(input_ids=torch.tensor([ids], device=device)).logits[0]
    finally:
        model.train(was_training)
    return out.float().cpu()


def default_threshold(dtype: str) -> float:
    """Warning threshold by engine dtype: float32 engines match to ~1e-5."""
    return 1e-3 if dtype in ("float32", "float64") else 0.1


def probe_check(engine, model, dtype: str, threshold: float | None = None) -> float:
    """Runs the probe prompt through the engine(s) and the trainer's model; returns the max
    abs logits difference (warning past `threshold`, None: by dtype). An engine object with
    a `probe_logits(ids)` method (the Ray launcher's workers) answers for all its engines
    with [W, T, vocab]."""
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = probe_ids(engine.tokenizer, vocab)
    engine_side = engine.probe_logits(ids) if hasattr(engine, "probe_logits") \
        else engine_logits(engine, ids)
    return probe_diff(engine_side, trainer_logits(model, ids),
                      default_threshold(dtype) if threshold is None else threshold)


def probe_diff(engine_side: torch.Tensor, trainer_side: torch.Tensor,
               threshold: float) -> float:
    """max |engine - trainer| over the probe's logits ([T, vocab], or [W, T, vocab] for W
    engines); logs a warning past `threshold`."""
    if engine_side.shape[-2:] != trainer_side.shape:
        raise ValueError(f"probe logits shapes differ: engine {tuple(engine_side.shape)}, "
                         f"trainer {tuple(trainer_side.shape)}")
    diff = float((engine_side - trainer_side).abs().max())
    if not diff <= threshold:  # also catches NaN
        log.warning("weight sync probe: engine and trainer logits differ by %.3g (threshold "
                    "%.3g): the engine may be running other weights than the trainer",
                    diff, threshold)
    return diff
