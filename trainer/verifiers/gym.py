"""The "reasoning_gym" verifier: each reasoning-gym dataset's own `score_answer`."""

from __future__ import annotations

import functools
from collections.abc import Callable

from brorl.trainer.verifiers.base import ANSWER_TAG, VerifyItem, register_verifier


@register_verifier("reasoning_gym")
def verify_reasoning_gym(item: VerifyItem) -> float:
    """The dataset's score of the extracted answer against the entry, in [0, 1]. Needs
    `item.metadata["dataset"]` (a registered reasoning-gym name) and `["entry"]` (the
    dataset entry: question, answer, metadata). A response without an answer scores 0."""
    name, entry = item.metadata.get("dataset"), item.metadata.get("entry")
    if not name or not isinstance(entry, dict):
        raise ValueError("the reasoning_gym verifier needs metadata 'dataset' (a name) and "
                         f"'entry' (a dict); got keys {sorted(item.metadata)}")
    answer = extract_gym_answer(item.response)
    if answer is None:
        return 0.0
    return float(_scorer(name)(answer=answer, entry=entry))


def extract_gym_answer(text: str) -> str | None:
    """The content of the last `<answer>...</answer>` (reasoning-gym's own prompt format),
    read as reasoning-gym's extract_answer reads it (a stray earlier `<answer>` stays in
    it, and scores as the dataset scores it), else the last non-empty line, stripped; None
    for an empty response."""
    tags = ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


@functools.cache
def _scorer(name: str) -> Callable[..., float]:
    """`score_answer(answer=, entry=)` of dataset `name`, built once per process (importing
    reasoning-gym takes ~1.4 s). Raises ValueError for an unknown dataset."""
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(name)
