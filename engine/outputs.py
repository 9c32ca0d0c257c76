"""Results of `Engine.generate`, shaped like vLLM's."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    logprobs: list[float] | None  # behaviour logprob of each token (see SamplingParams)
    # "stop" (a stop/EOS token, included in token_ids, or a stop string) or "length"
    finish_reason: str
    # decoded when the checkpoint has a tokenizer; cut at a stop string (before it, or
    # after it with include_stop_str_in_output), while token_ids keep the token that
    # completed it; without the text of a stop token it ended on unless
    # include_stop_str_in_output (as vLLM; EOS and other special tokens decode to nothing)
    text: str | None = None
    # vLLM's: the stop string or the token of stop_token_ids the sample stopped on; None
    # when it stopped on an EOS token of the model (listed in stop_token_ids or not, unless
    # ignore_eos) or at max_tokens
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0  # prompt tokens reused from the prefix cache
