"""Stop strings (`SamplingParams.stop`): the token at which a sample stops, and its text.

A sample with completion tokens out stops at the first k > min_tokens for which its
decoded completion F_k = decode(out[:k]) (the completion only, special tokens skipped,
as its text is decoded) contains a stop string. Decoding out[:k] every step would cost
O(k) per token; `completes_stop` decodes the whole completion once, at the first checked
token (k = min_tokens + 1), and from then on a tail window w = out[a:k] of it.

Why the window is exact. From the second check on, F_{k-1} holds no stop string (the
sample would have stopped), so the sample stops at k iff F_k holds one, and any it holds
is new with the last token. Two properties of decoders make a tail window enough:
(1) decoding a window that starts on a token boundary gives the matching tail of the
full text except in its first characters: replacement characters (U+FFFD) for bytes of
a character cut by the window's start (byte-level BPE: at most 3; SentencePiece's byte
fallback decodes a run of byte tokens as one, so every byte of the run inside the window),
and a dropped or added prefix (a stripped leading space, WordPiece's "##"), at most
_EDGE_CHARS characters; (2) the last token rewrites at most the last _EDGE_CHARS
characters of F_{k-1} (cleaned-up spaces) or its trailing replacement characters (the
bytes of a character it completes; with byte fallback, the whole pending byte run) before
adding its own. The window is grown until decode(w[:-1]) starts with at most _EDGE_CHARS
replacement characters (so its start is no longer inside a long byte run) and holds
len(longest) - 1 + 2 * _EDGE_CHARS characters besides its trailing replacement ones, or
is the whole completion. Then decode(w) without its first _EDGE_CHARS characters is a
substring of F_k that holds every occurrence new with the last token, and the sample
stops iff a stop string is in it. Genuine replacement characters in the text only make
the window longer (up to the whole completion); stop strings that contain U+FFFD are the
one exception to exactness. Everything is a function of the sample's own tokens, so
batching, preemption and merged decode rows cannot change where it stops.
"""

from __future__ import annotations

from collections.abc import Callable

from engine.request import Sequence
from engine.sampling_params import SamplingParams

_EDGE_CHARS = 4  # characters at either end of a decoded window that may differ
_FFFD = "\ufffd"  # the replacement character: bytes that do not make a whole character
_SLACK_TOKENS = 8  # window tokens beyond one per character, for tokens decoding to nothing


class StopChecker:
    """Which samples' last tokens complete a stop string (see the module docstring)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def stopped(self, seqs: list[Sequence]) -> list[bool]:
        """For samples whose groups set `stop` and that hold more than min_tokens
        completion tokens: whether their text now contains a stop string."""
        decode = self.decoder({})  # merged samples share their windows
        return [completes_stop(decode, s.token_ids, s.group.prompt_len,
                               s.group.params.min_tokens, s.group.params.stop)
                for s in seqs]

    def decoder(self, texts: dict[tuple[int, ...], str]) -> Callable[[list[int]], str]:
        """decode(ids) as the outputs' texts are decoded, once per distinct ids in texts."""
        def decode(ids: list[int]) -> str:
            key = tuple(ids)
            text = texts.get(key)
            if text is None:
                text = texts[key] = self.tokenizer.decode(ids, skip_special_tokens=True)
            return text

        return decode

    def text(self, output_ids: list[int], params: SamplingParams, finish_reason: str,
             texts: dict[tuple[int, ...], str]) -> str:
        """A finished sample's text: its whole completion decoded (once per distinct
        completion in `texts`), cut at a stop string when it stopped on one."""
        text = self.decoder(texts)(output_ids)
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
        if start == begin:  # the whole completion: exact, nothing to cut
            text = decode(ids[begin:])
            return any(s in text for s in stop)
        before = decode(ids[start:-1])
        lead = len(before) - len(before.lstrip(_FFFD))
        trail = len(before) - len(before.rstrip(_FFFD))
        if lead <= _EDGE_CHARS and len(before) - trail >= need:
            break
        width *= 2
    text = decode(ids[start:])[_EDGE_CHARS:]
    return any(s in text for s in stop)


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
