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

Cost. A window starts a multiple of _ALIGN_TOKENS tokens into the completion (any start
that meets the conditions above is exact), so a sample's consecutive checks mostly share
it and this check's decode(w[:-1]) is the last one's decode(w): `StopChecker` keeps the
last call's texts, keyed by their token ids, and decodes one window per sample and step
but every _ALIGN_TOKENS-th. The windows it still needs it decodes in one call to the
fast tokenizer's Rust backend where that is provably the same as `tokenizer.decode`.

Byte-level tokenizers (GPT-2's, Qwen's, Llama 3's: a ByteLevel decoder, whose text is the
tokens' bytes decoded as UTF-8 with replacement) skip most checks. Appending a token's
bytes to the completion changes only its undecodable tail, so every character new with the
token ends in one of the token's bytes, but a U+FFFD (that may stand for old bytes alone);
a stop string new with the token ends in a new character; so unless it ends in U+FFFD (such
stop sets are not filtered) the token's bytes hold its last byte. From the second check on, a
sample whose last token holds none of those bytes cannot have stopped, and is not decoded
(`byte_filter`: an index of which ids hold each byte, built once per tokenizer, gives a
table over the vocabulary per set of stop strings; special tokens decode to nothing and
hold no bytes).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from brorl.engine.request import Sequence
from brorl.engine.sampling_params import SamplingParams

_EDGE_CHARS = 4  # characters at either end of a decoded window that may differ
_FFFD = "\ufffd"  # the replacement character: bytes that do not make a whole character
_SLACK_TOKENS = 8  # window tokens beyond one per character, for tokens decoding to nothing
_ALIGN_TOKENS = 8  # window starts are multiples of this past the completion's start


class StopChecker:
    """Which samples' last tokens complete a stop string (see the module docstring).

    batch: decode each step's first windows in one call to the fast tokenizer's Rust
    backend where that provably equals `tokenizer.decode` (see `batch_decoder`); False
    decodes them one by one. filter: skip the samples a byte-level tokenizer's last token
    rules out (see `byte_filter`). Both off is the reference the fast paths are tested
    against."""

    def __init__(self, tokenizer, batch: bool = True, filter: bool = True) -> None:
        self.tokenizer = tokenizer
        self.batch = batch
        self.filter = filter
        # The last stopped() call's windows (ids -> text): this call's decode(w[:-1]) is
        # mostly the last one's decode(w). Keyed by the exact ids, so it cannot change a
        # decision; it assumes the tokenizer does not change under the checker.
        self._last: dict[tuple[int, ...], str] = {}
        self._bytes: _TokenBytes | None = None  # the byte filter's index of the vocabulary
        self._special: frozenset[int] | None = None  # ids that decode to nothing

    def stopped(self, seqs: list[Sequence]) -> list[bool]:
        """For samples whose groups set `stop` and that hold more than min_tokens
        completion tokens: whether their text now contains a stop string."""
        hits = [False] * len(seqs)
        live = self._could_stop(seqs) if self.filter else range(len(seqs))
        seqs = [seqs[i] for i in live]
        firsts = [first_windows(s.token_ids, s.group.prompt_len, s.group.params.min_tokens,
                                s.group.params.stop) for s in seqs]
        texts: dict[tuple[int, ...], str] = {}  # merged samples share their windows
        missing = []
        last = self._last
        for key in dict.fromkeys(w for ws in firsts for w in ws):
            text = last.get(key)
            if text is None:
                missing.append(key)
            else:
                texts[key] = text
        decode_batch = batch_decoder(self.tokenizer) if self.batch else None
        if decode_batch is not None:
            texts.update(zip(missing, decode_batch(missing)))
        decode = self.decoder(texts)  # what is still missing, one by one
        for i, s, first in zip(live, seqs, firsts):
            hits[i] = completes_stop(decode, s.token_ids, s.group.prompt_len,
                                     s.group.params.min_tokens, s.group.params.stop, first)
        self._last = texts
        return hits

    def _could_stop(self, seqs: list[Sequence]) -> list[int]:
        """The indices of the samples whose check cannot be skipped: every one but those
        past their first check whose last token the byte-level filter rules out."""
        live, filters = [], {}
        for i, s in enumerate(seqs):
            g = s.group
            ids = s.token_ids
            if len(ids) - g.prompt_len > g.params.min_tokens + 1:
                stop = g.params.stop
                if stop not in filters:
                    filters[stop] = self.byte_filter(stop)
                table = filters[stop]
                if table is not None and ids[-1] < len(table) and not table[ids[-1]]:
                    continue
            live.append(i)
        return live

    def byte_filter(self, stop: tuple[str, ...]) -> bytes | None:
        """For a byte-level tokenizer (see the module docstring): per token id, 1 when its
        bytes hold the last byte of one of the stop strings (or the id has no token), else
        0; ids past the table may complete anything. None for other tokenizers, and for
        stop strings that end in U+FFFD (any token can complete those)."""
        backend = plain_fast_backend(self.tokenizer)
        if (backend is None or type(backend.decoder).__name__ != "ByteLevel"
                or any(s.endswith(_FFFD) for s in stop)):
            return None
        size = backend.get_vocab_size(with_added_tokens=True)
        if self._bytes is None or self._bytes.backend is not backend or self._bytes.size != size:
            self._bytes = _TokenBytes(backend, size)
        return self._bytes.table(stop)

    def decoder(self, texts: dict[tuple[int, ...], str]
                ) -> Callable[[list[int] | tuple[int, ...]], str]:
        """decode(ids) as the outputs' texts are decoded, once per distinct ids in texts."""
        def decode(ids: list[int] | tuple[int, ...]) -> str:
            key = tuple(ids)  # a tuple is its own key, not a copy
            text = texts.get(key)
            if text is None:
                text = texts[key] = self.tokenizer.decode(list(ids), skip_special_tokens=True)
            return text

        return decode

    def text(self, output_ids: list[int], params: SamplingParams, stopped: bool,
             texts: dict[tuple[int, ...], str], on_token: bool = False
             ) -> tuple[str, str | None]:
        """A finished sample's text: its whole completion decoded (once per distinct
        completion in `texts`), cut at a stop string when it `stopped` on one (not on a
        stop token); and that stop string, else None. A sample that ended `on_token` (a
        stop or EOS token) leaves that token's text out unless include_stop_str_in_output,
        as vLLM does (special tokens decode to nothing anyway)."""
        if (on_token and not params.include_stop_str_in_output
                and output_ids[-1] not in self._special_ids()):
            output_ids = output_ids[:-1]
        text = self.decoder(texts)(output_ids)
        hit = find_stop(text, params.stop) if stopped and params.stop else None
        if hit is None:
            return text, None
        stop, start = hit
        end = start + len(stop) if params.include_stop_str_in_output else start
        return text[:end], stop

    def _special_ids(self) -> frozenset[int]:
        if self._special is None:
            self._special = frozenset(getattr(self.tokenizer, "all_special_ids", ()))
        return self._special


def plain_fast_backend(tokenizer):
    """The Rust backend of a fast tokenizer whose decode(ids, skip_special_tokens=True) is
    exactly the backend's: its class and instance keep transformers' own decode and
    _decode, which call the backend's decode and then `clean_up_tokenization` when
    clean_up_tokenization_spaces is set, except for a BPE model where the transformers
    release skips it (those that have the flag
    clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output, when it is
    False: Llama 3's tokenizer sets clean_up_tokenization_spaces); else None. Checked at
    every call: the attributes can change after construction."""
    from transformers import PreTrainedTokenizerFast

    cls = type(tokenizer)
    if (not isinstance(tokenizer, PreTrainedTokenizerFast)
            or cls.decode is not PreTrainedTokenizerFast.decode
            or cls._decode is not PreTrainedTokenizerFast._decode
            or "decode" in vars(tokenizer) or "_decode" in vars(tokenizer)):
        return None
    backend = tokenizer.backend_tokenizer
    forced = getattr(tokenizer, _BPE_CLEANUP_FLAG, None)
    if tokenizer.clean_up_tokenization_spaces and not (
            type(backend.model).__name__ == "BPE" and forced is False):
        return None
    return backend


_BPE_CLEANUP_FLAG = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"


def batch_decoder(tokenizer) -> Callable[[list[list[int]]], list[str]] | None:
    """The Rust backend's decode_batch where it gives, list by list, exactly
    tokenizer.decode(ids, skip_special_tokens=True) (`plain_fast_backend`), else None."""
    backend = plain_fast_backend(tokenizer)
    if backend is None:
        return None
    return lambda windows: backend.decode_batch(windows, skip_special_tokens=True)


def gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's byte -> character map, which byte-level BPE vocabularies are written in:
    printable bytes stand for themselves, the others for characters from U+0100 on."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    codes = dict(zip(keep, keep))
    for n, b in enumerate(b for b in range(256) if b not in codes):
        codes[b] = 256 + n
    return {b: chr(c) for b, c in codes.items()}


class _TokenBytes:
    """The bytes each token id of a ByteLevel-decoded vocabulary can add to a text: its
    characters through GPT-2's byte map, together with their UTF-8 bytes (the decoder
    takes those for a token with a character outside the map); none for special tokens
    (decode skips them). Per byte value, which ids hold it, built when first asked (at most
    256); per set of stop strings, the filter's table (the last few kept)."""

    _KEEP_TABLES = 64

    def __init__(self, backend, size: int) -> None:
        self.backend, self.size = backend, size
        char_byte = {c: b for b, c in gpt2_byte_chars().items()}
        special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        known = np.zeros(size, dtype=bool)
        pieces, owners = [], []
        for token, i in backend.get_vocab(with_added_tokens=True).items():
            if i < size:
                known[i] = True
                if i not in special:
                    b = bytes(char_byte[c] for c in token if c in char_byte) + token.encode()
                    pieces.append(b)
                    owners.append(np.full(len(b), i, dtype=np.int64))
        self._flat = np.frombuffer(b"".join(pieces), dtype=np.uint8)
        self._owner = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int64)
        self._unknown = ~known  # ids without a token: they may complete anything
        self._by_byte: dict[int, np.ndarray] = {}
        self._tables: dict[tuple[str, ...], bytes] = {}

    def table(self, stop: tuple[str, ...]) -> bytes:
        """Per id, 1 when it holds the last byte of a stop string (or has no token)."""
        table = self._tables.get(stop)
        if table is None:
            holds = self._unknown.copy()
            # surrogatepass: a lone surrogate never occurs in a text, any byte will do
            for last in {s.encode("utf-8", "surrogatepass")[-1] for s in stop}:
                if last not in self._by_byte:
                    mask = np.zeros_like(self._unknown)
                    mask[self._owner[self._flat == last]] = True
                    self._by_byte[last] = mask
                holds |= self._by_byte[last]
            if len(self._tables) >= self._KEEP_TABLES:
                self._tables.clear()
            table = self._tables[stop] = holds.tobytes()
        return table


@functools.cache
def _widths(stop: tuple[str, ...]) -> tuple[int, int]:
    """(characters a window must hold besides its edges, its first width in tokens)."""
    need = max(map(len, stop)) - 1 + 2 * _EDGE_CHARS
    return need, need + 1 + _SLACK_TOKENS


def _window_start(num_ids: int, begin: int, width: int) -> int:
    """The start of a window of at least `width` tokens that ends the ids: a multiple of
    _ALIGN_TOKENS past begin, so it moves once every _ALIGN_TOKENS tokens (begin: the
    whole completion, while it has fewer than width + _ALIGN_TOKENS tokens)."""
    room = num_ids - begin - width
    return begin if room < 0 else begin + room - room % _ALIGN_TOKENS


def first_windows(ids: list[int], begin: int, min_tokens: int,
                  stop: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """The windows `completes_stop` decodes when it need not grow its first one: the
    whole completion at the first check or while it is short, else (w[:-1], w)."""
    start = _window_start(len(ids), begin, _widths(stop)[1])
    if len(ids) - begin == min_tokens + 1 or start == begin:
        return (tuple(ids[begin:]),)
    w = tuple(ids[start:])
    return w[:-1], w


def completes_stop(decode: Callable[[list[int] | tuple[int, ...]], str], ids: list[int],
                   begin: int, min_tokens: int, stop: tuple[str, ...],
                   first: tuple[tuple[int, ...], ...] | None = None) -> bool:
    """Whether the completion ids[begin:] (len(ids) - begin > min_tokens tokens) contains
    a stop string, given that it did not one token earlier unless this is the first
    check (min_tokens + 1 tokens). Decodes a bounded window but at the first check.
    first: first_windows(ids, begin, min_tokens, stop) when the caller has it."""
    first = first or first_windows(ids, begin, min_tokens, stop)
    if len(first) == 1:  # the first check or the whole completion: exact, nothing to cut
        text = decode(first[0])
        return any(s in text for s in stop)
    need, width = _widths(stop)
    window, before = first[1], decode(first[0])
    while True:
        lead = len(before) - len(before.lstrip(_FFFD))
        trail = len(before) - len(before.rstrip(_FFFD))
        if lead <= _EDGE_CHARS and len(before) - trail >= need:
            break
        width *= 2
        start = _window_start(len(ids), begin, width)
        if start == begin:
            text = decode(ids[begin:])
            return any(s in text for s in stop)
        window, before = ids[start:], decode(ids[start:-1])
    text = decode(window)[_EDGE_CHARS:]
    return any(s in text for s in stop)


def find_stop(text: str, stop: tuple[str, ...]) -> tuple[str, int] | None:
    """The stop string whose first occurrence in text ends first (at equal ends, the
    longer) and where that occurrence starts, or None."""
    best, best_key = None, None
    for s in stop:
        i = text.find(s)
        if i >= 0 and (best_key is None or (i + len(s), i) < best_key):
            best, best_key = (s, i), (i + len(s), i)
    return best
