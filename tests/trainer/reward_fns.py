"""Rewards for trainer tests, named "module:function" like any user verifier."""

from trainer.verifiers import VerifyItem


def digit_fraction(item: VerifyItem) -> float:
    """Fraction of the response's characters that are digits: graded, so groups of a
    random tiny model are rarely all equal (dynamic sampling keeps them)."""
    text = item.response
    return sum(c.isdigit() for c in text) / max(1, len(text))
