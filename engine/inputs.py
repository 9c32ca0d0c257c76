"""Normalising and validating `generate` inputs before anything runs, so that a bad
request raises a ValueError naming the problem and leaves the engine untouched."""

from __future__ import annotations

import numbers
from collections.abc import Sequence as Seq

from brorl.engine.config import ModelConfig
from brorl.engine.request import min_pool_pages
from brorl.engine.sampling_params import SamplingParams


def normalize_prompts(prompts) -> list:
    """A single prompt (string or token-id list) or a list of them -> list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Seq):
        raise ValueError(f"prompts must be a string, a token-id list or a list of those, "
                         f"got {type(prompts).__name__}")
    if len(prompts) and all(_is_token(t) for t in prompts):
        return [list(prompts)]
    return list(prompts)


def normalize_params(params, num_prompts: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * num_prompts
    if isinstance(params, SamplingParams):
        return [params] * num_prompts
    if isinstance(params, (dict, str)) or not hasattr(params, "__iter__"):
        raise ValueError("sampling_params must be a SamplingParams or a list of them, got "
                         f"{type(params).__name__}")
    params = list(params)
    if len(params) != num_prompts:
        raise ValueError(f"got {len(params)} SamplingParams for {num_prompts} prompts")
    for p in params:
        if not isinstance(p, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(p).__name__}")
    return params


def tokenize(prompts: list, tokenizer) -> list[list[int]]:
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError(f"prompt {i} is a string but the checkpoint has no tokenizer; "
                                 f"pass token ids")
            p = tokenizer(p)["input_ids"]
        elif not isinstance(p, Seq) or not all(_is_token(t) for t in p):
            raise ValueError(f"prompt {i} must be a string or a list of int token ids")
        out.append([int(t) for t in p])
    return out


def _is_token(t) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def validate(prompt_ids: list[list[int]], params: list[SamplingParams], cfg: ModelConfig,
             page_size: int, num_pages: int, has_tokenizer: bool = True) -> None:
    """Raises ValueError for the first bad prompt or parameter (has_tokenizer: whether
    stop strings can be decoded)."""
    V = cfg.vocab_size
    for i, (ids, p) in enumerate(zip(prompt_ids, params)):
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary "
                             f"[0, {V})")
        total = len(ids) + p.max_tokens
        if total > cfg.max_position_embeddings:
            raise ValueError(f"prompt {i}: {len(ids)} prompt tokens + max_tokens {p.max_tokens}"
                             f" = {total} exceeds the model's context of "
                             f"{cfg.max_position_embeddings} tokens")
        bad = [t for t in p.stop_token_ids or () if not 0 <= t < V]
        if bad:
            raise ValueError(f"stop token id {bad[0]} is outside the vocabulary [0, {V})")
        if p.stop and not has_tokenizer:
            raise ValueError(f"prompt {i} sets stop strings {list(p.stop)!r} but the "
                             "checkpoint has no tokenizer to decode with; use "
                             "stop_token_ids")
        need = min_pool_pages(len(ids), p.max_tokens, page_size)
        if need > num_pages:
            raise ValueError(f"prompt {i} needs {need} KV pages for one sample of "
                             f"{p.max_tokens} tokens but the pool has {num_pages} pages of "
                             f"{page_size} tokens; raise max_kv_tokens")
