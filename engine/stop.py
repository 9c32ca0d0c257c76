"""Stop strings (`SamplingParams.stop`): the token at which a sample stops, and its text.

A sample with completion tokens out stops at the first k > min_tokens for which its
decoded completion F_k = decode(out[:k]) (the completion only, special tokens skipped,
as its text is decoded) contains a stop string. Decoding out[:k] every step would cost
O(k) per token; `StopChecker` decodes the whole completion once, at the first checked
token (k = min_tokens + 1), and from then on a tail window of it, with and without the
last token.

Why the window is exact. From the second check on, F_{k-1} contains no stop string (the
sample would have stopped), so a stop string s is in F_k iff an occurrence of it is new
with the last token. Decoding is local (byte-level BPE, SentencePiece and WordPiece
decoders are): (1) the last token changes at most the last _EDGE_CHARS characters of
F_{k-1} (a replacement character for an incomplete UTF-8 sequence becomes the character)
before adding its own, so a new occurrence starts at most len(s) - 1 + _EDGE_CHARS
characters before the end of F_{k-1}; (2) decoding a tail window w = out[a:k] gives the
tail of F_k that w produced except in its first _EDGE_CHARS characters (replacement
characters for continuation bytes whose lead byte lies before the window, a dropped
leading space), which do not depend on w's last token and never add a stop string
(stop strings with U+FFFD aside). The window is grown until decode(w[:-1]) holds at least
len(longest) - 1 + 2 * _EDGE_CHARS characters (tokens that decode to nothing, such as
special tokens or lone UTF-8 bytes, may make it long in tokens), or is the whole
completion; then the new occurrences of F_k all lie in decode(w), and s is new iff s is
in decode(w) and not in decode(w[:-1]). Everything is a function of the sample's own
tokens, so batching, preemption and merged decode rows cannot change where it stops.
"""

from __future__ import annotations

from collections.abc import Callable

from engine.request import Sequence
from engine.sampling_params import SamplingParams

_EDGE_CHARS = 4  # characters at either end of a decoded window that may differ
_SLACK_TOKENS = 8  # window tokens beyond one per character, for tokens decoding to nothing


class StopChecker:
    """Which samples' last tokens complete a stop string (see the module docstring)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def stopped(self, seqs: list[Sequence]) -> list[bool]:
        """For samples whose groups set `stop` and that hold more than min_tokens
        completion tokens: whether their text now contains a stop string."""
        texts: dict[tuple[int, ...], str] = {}  # merged samples share their windows

        def decode(ids: list[int]) -> str:
            key = tuple(ids)
            text = texts.get(key)
            if text is None:
                text = texts[key] = self.tokenizer.decode(ids, skip_special_tokens=True)
            return text

        return [completes_stop(decode, s.token_ids, s.group.prompt_len,
                               s.group.params.min_tokens, s.group.params.stop)
                for s in seqs]

    def text(self, output_ids: list[int], params: SamplingParams, finish_reason: str,
             texts: dict[tuple[int, ...], str]) -> str:
        """A finished sample's text: its whole completion decoded (once per distinct
        completion in `texts`), cut at a stop string when it stopped on one."""
        key = tuple(output_ids)
        if key not in texts:
            texts[key] = self.tokenizer.decode(output_ids, skip_special_tokens=True)
        text = texts[key]
        if params.stop and finish_reason == "stop":
            text = cut_text(text, params.stop, params.include_stop_str_in_output)
        return text


def completes_stop(decode: Callable[[list[int]], str], ids: list[int], begin: int,
                   min_tokens: int, stop: tuple[str, ...]) -> bool:
    """Whether the completion ids[begin:] (len(ids) - begin > min_tokens tokens) contains
    a stop string, given that it did not one token earlier unless this is the first
    check (min_tokens + 1 tokens). Decodes a bounded window but at the first check."""
    if len(ids) - begin == min_tokens + 1:
        text = decode(ids[begin:])
        return any(s in text for s in stop)
    need = max(map(len, stop)) - 1 + 2 * _EDGE_CHARS
    width = need + 1 + _SLACK_TOKENS
    while True:
        start = max(begin, len(ids) - width)
        before = decode(ids[start:-1])
        if len(before) >= need or start == begin:
            break
        width *= 2
    after = decode(ids[start:])
    return any(s in after and s not in before for s in stop)


def cut_text(text: str, stop: tuple[str, ...], include: bool) -> str:
    """The text of a sample that stopped: cut before the stop string occurrence that ends
    first (at equal ends, the longer), or after it with include; as it is when none
    occurs (it stopped on a stop token)."""
    best = None
    for s in stop:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < best):
            best = (i + len(s), i)
    if best is None:
        return text
    return text[:best[0]] if include else text[:best[1]]
