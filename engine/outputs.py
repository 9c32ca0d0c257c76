"""Results of `Engine.generate`, shaped like vLLM's."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    logprobs: list[float] | None  # behaviour logprob of each token (see SamplingParams)
    finish_reason: str  # "stop" (a stop/EOS token, included in token_ids) or "length"
    text: str | None = None  # decoded when the checkpoint has a tokenizer


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0  # prompt tokens reused from the prefix cache
