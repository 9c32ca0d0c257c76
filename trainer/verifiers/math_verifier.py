"""The "math" verifier: symbolic equivalence of the extracted answer with the gold answer,
by math-verify.

math-verify bounds its own work with `signal.alarm`, which only works on a process's main
thread; we switch that off (`parsing_timeout=None`, `timeout_seconds=None`) and rely on the
VerifierPool, whose worker processes are killed when an item runs past its timeout.
"""

from __future__ import annotations

import functools

from brorl.trainer.verifiers.base import VerifyItem, extract_answer, register_verifier

_DELIMITERS = ("$", "\\boxed", "\\(", "\\[")


@register_verifier("math")
def verify_math(item: VerifyItem) -> float:
    """1.0 when the response's answer (last `<answer>` tag, else last `\\boxed{}`) equals
    `item.answer` up to mathematical equivalence ("1/2" = "0.5" = "\\frac{1}{2}",
    "2x+1" = "1+2x"), else 0.0; a response without an answer scores 0. Raises ValueError
    when the gold answer is missing or does not parse."""
    if item.answer is None:
        raise ValueError("the math verifier needs a gold answer")
    gold = parse_math(str(item.answer))
    if not gold:
        raise ValueError(f"could not parse the gold answer {item.answer!r}")
    predicted = extract_answer(item.response)
    if predicted is None:
        return 0.0
    pred = parse_math(predicted)
    if not pred:
        return 0.0
    _, verify = _math_verify()
    return 1.0 if verify(gold, pred, timeout_seconds=None) else 0.0


def parse_math(text: str) -> list:
    """math-verify's parse of a bare answer, [] when nothing parses. A bare answer ("2x+1",
    "\\frac12") is read as LaTeX between `$`s first: math-verify's plain-text parse stops at
    the first number it finds ("2x+1" -> 2)."""
    parse, _ = _math_verify()
    text = text.strip()
    if any(d in text for d in _DELIMITERS):
        candidates = (text, f"${text}$")
    else:
        candidates = (f"${text}$", text, f"\\boxed{{{text}}}")
    for candidate in candidates:
        parsed = parse(candidate, parsing_timeout=None)
        if parsed:
            return parsed
    return []


@functools.lru_cache(maxsize=1)
def _math_verify():
    """(parse, verify), imported on first use: math-verify pulls in sympy (~0.5 s)."""
    import math_verify.grader
    import math_verify.parser

    # Both modules warn once that their alarm-based timeout is off; that is deliberate here
    # (see the module docstring), so mark the warning as shown.
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    return math_verify.parse, math_verify.verify
