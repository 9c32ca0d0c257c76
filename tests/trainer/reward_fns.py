"""Rewards for trainer tests, named "module:function" like any user verifier."""

from brorl.trainer.verifiers import VerifyItem


def digit_fraction(item: VerifyItem) -> float:
    """Fraction of the response's characters that are digits: graded, so groups of a
    random tiny model are rarely all equal (dynamic sampling keeps them)."""
    text = item.response
    return sum(c.isdigit() for c in text) / max(1, len(text))


def char_hash(item: VerifyItem) -> float:
    """A score in [0, 1) that differs between almost any two responses (tests that compare
    scores must see a spread)."""
    return (sum(ord(c) * (i + 1) for i, c in enumerate(item.response)) % 997) / 997


def ends_with_equals(item: VerifyItem) -> float:
    """1 when the response text ends with '=' (a stop string the test sets)."""
    return float(item.response.endswith("="))


def constant_half(item: VerifyItem) -> float:
    """0.5 for every response: every group's rewards are equal (none is kept)."""
    return 0.5
