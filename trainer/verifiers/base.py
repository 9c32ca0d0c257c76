"""The verifier contract: items, results, the registry and answer extraction.

A verifier is a plain function `(item: VerifyItem) -> float` returning a reward in [0, 1]
(or raising). Built-in verifiers register themselves by name with `@register_verifier`;
a user verifier is named as `"package.module:function"` and imported on first use.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

STATUSES = ("ok", "timeout", "error")


@dataclass(frozen=True)
class VerifyItem:
    """One sample to score. `answer` is the gold answer (None where the verifier needs none,
    e.g. code with tests); `verifier` a registry name or `"module:function"`; `metadata`
    what the verifier needs beyond that (a reasoning-gym entry, a code problem's tests)."""

    response: str
    answer: str | None
    verifier: str
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class VerifyResult:
    """A reward in [0, 1] and how it was obtained; `status` is one of STATUSES and
    `detail` says why for "timeout" and "error" (whose score is always 0)."""

    score: float
    status: str = "ok"
    detail: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


Verifier = Callable[[VerifyItem], float]
VERIFIERS: dict[str, Verifier] = {}


def register_verifier(name: str) -> Callable[[Verifier], Verifier]:
    """Decorator: add `fn(item) -> float in [0, 1]` to the registry under `name`."""

    def add(fn: Verifier) -> Verifier:
        if name in VERIFIERS and VERIFIERS[name] is not fn:
            raise ValueError(f"verifier {name!r} is already registered")
        VERIFIERS[name] = fn
        return fn

    return add


def get_verifier(name: str) -> Verifier:
    """The verifier registered as `name`, or the function a `"module:function"` spec names.
    Raises ValueError naming the supported verifiers for an unknown name."""
    if ":" in name:
        return load_user_verifier(name)
    if name not in VERIFIERS:
        raise ValueError(f"unknown verifier {name!r}; supported: {sorted(VERIFIERS)} "
                         "or a user function as 'module:function'")
    return VERIFIERS[name]


@functools.cache
def load_user_verifier(spec: str) -> Verifier:
    """Imports `"package.module:function"` and returns the function (cached per process).
    Raises ValueError naming the spec when it is malformed, the module does not import or
    the attribute is missing or not callable."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr or ":" in attr:
        raise ValueError(f"user verifier {spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"user verifier {spec!r}: cannot import {module_name!r}: {e}") from e
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"user verifier {spec!r}: {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise ValueError(f"user verifier {spec!r} is not callable")
    return fn


# from an <answer> to the first </answer> after it, as reasoning-gym's extract_answer
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_OPEN_TAG = re.compile(r"<answer>", re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_answer(text: str) -> str | None:
    """The stripped content of the last `<answer>...</answer>` (after its last `<answer>`:
    of "I'll write <answer> tags. <answer>42</answer>" it is 42), else of the last balanced
    `\\boxed{...}` (or `\\fbox{...}`), else None. An empty answer counts as none."""
    tags = ANSWER_TAG.findall(text)
    if tags:
        content = _OPEN_TAG.split(tags[-1])[-1].strip()
        return content or None
    return last_boxed(text)


def last_boxed(text: str) -> str | None:
    """The stripped content of the last `\\boxed{...}` whose braces balance, else None."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                content = text[start:i].strip()
                if content:
                    return content
                break
    return None
