"""Per-request sampling parameters (vLLM-style names)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

MIN_TEMPERATURE = 1e-5  # below it (but 0, greedy) logits / temperature may overflow


@dataclass(frozen=True)
class SamplingParams:
    """How to draw `n` samples from one prompt.

    temperature 0 means greedy (else at least MIN_TEMPERATURE). top_k=-1, top_p=1 and
    min_p=0 disable truncation. `seed=None` draws a fresh seed per call; with a seed, the
    samples depend only on (seed, request index, sample index, position), never on batching
    or preemption. The request index is the prompt's position in its `generate` call (as
    the noise of different prompts must differ), so the same prompt and seed at another
    position, or a copy of it in the same call, draw other samples (unlike vLLM's
    per-request seed).
    Behaviour logprobs are of the sampled token under softmax(logits / temperature) over
    the full vocabulary (before truncation); with temperature 0, under softmax(logits).

    `stop` (a string or a list of them; needs the checkpoint's tokenizer): a sample ends,
    with finish_reason "stop", at its first token k > min_tokens (as for stop tokens)
    after which its decoded completion contains one of them; one already in the text of
    its first min_tokens tokens stops it at token min_tokens + 1. Its token_ids and
    logprobs keep token k; its text is cut before the stop string, or after it with
    include_stop_str_in_output (see engine/stop.py).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int = 16
    min_tokens: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None
    ignore_eos: bool = False
    logprobs: bool = True
    stop: tuple[str, ...] | None = None
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        for name in ("n", "top_k", "max_tokens", "min_tokens", "seed"):
            value = getattr(self, name)
            if value is not None or name != "seed":
                object.__setattr__(self, name, _integer(name, value))
        for name in ("temperature", "top_p", "min_p"):
            object.__setattr__(self, name, _real(name, getattr(self, name)))
        if self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE:g}, got "
                             f"{self.temperature:g}: logits / temperature overflow float32 "
                             "(vLLM samples greedily below it)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)):
                raise ValueError("stop_token_ids must be a list of token ids, got "
                                 f"{self.stop_token_ids!r}")
            object.__setattr__(self, "stop_token_ids", tuple(
                _integer("stop_token_ids", t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop", _stop_strings(self.stop))
        if not isinstance(self.logprobs, bool):
            raise ValueError(f"logprobs must be a bool (True: each sampled token's logprob), "
                             f"got {self.logprobs!r}; vLLM's logprobs=k (the k most likely "
                             "tokens' logprobs at each position) is not supported")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _integer(name: str, value) -> int:
    """An int (numpy integers too); a bool, float or string is an error, not truncated."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(
            value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _stop_strings(value) -> tuple[str, ...] | None:
    """A string or a list/tuple of non-empty strings -> a tuple; None or empty -> None."""
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    elif not isinstance(value, (list, tuple)):
        raise ValueError("stop must be a string or a list of strings, got "
                         f"{type(value).__name__}")
    for s in value:
        if not isinstance(s, str):
            raise ValueError(f"stop strings must be strings, got {s!r}")
        if not s:
            raise ValueError("stop strings must be non-empty, got ''")
    return tuple(value) or None
