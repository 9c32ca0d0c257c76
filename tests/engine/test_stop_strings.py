"""Stop strings (SamplingParams.stop): a sample stops at the first token after which its
decoded completion contains one, as a plain reference that decodes every prefix of the
unconstrained run finds; its text is cut there; the tail-window check agrees with that
reference on random token runs (split UTF-8 characters, special tokens that decode to
nothing), and the result does not depend on merging, preemption, batching or n."""

import random
from types import SimpleNamespace

import pytest
import torch

from brorl.engine import Engine, SamplingParams
from brorl.engine.stop import StopChecker, batch_decoder, completes_stop

PAGE = 4
SPECIAL = ["<pad>", "<s>", "</s>"] + [f"<x{i}>" for i in range(3, 8)]  # ids 0..7, eos 2
UTF8 = [b"\xc3", b"\xa9", "é".encode(), b"\xe2", b"\x82", b"\xac", "€".encode(),
        b"\xf0\x9f", b"\x98\x80", "😀".encode()]


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map, as the ByteLevel decoder undoes it."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = dict(zip(keep, keep))
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = 256 + n
    return {b: chr(c) for b, c in chars.items()}


def _pieces(vocab_size: int) -> list[bytes]:
    """Token byte strings: short texts over "abcd " (so strings recur), and UTF-8
    characters whole and split into lone bytes."""
    letters = "abcd "
    texts = list(letters) + [a + b for a in letters for b in letters] + [
        a + b + c for a in letters for b in letters for c in letters]
    out = UTF8 + [t.encode() for t in texts]
    return out[:vocab_size - len(SPECIAL)]


def save_byte_tokenizer(path, vocab_size: int = 128):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = _byte_chars()
    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for p in _pieces(vocab_size):
        vocab["".join(chars[b] for b in p)] = len(vocab)
    assert len(vocab) == vocab_size
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>",
                                   additional_special_tokens=SPECIAL[3:])
    fast.save_pretrained(str(path))
    return fast


def save_word_tokenizer(path, vocab_size: int = 128):
    """Words joined by spaces when decoded: a decoder whose window drops a space."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL + ["ab", "b", "ba", "a", "c", "abc", "cab"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=SPECIAL[3:])
    fast.save_pretrained(str(path))
    return fast, len(words)


FALLBACK_TEXT = ["a", "b", " a", " ab", "c", " ", "\n", "é", "中", "文", "答", "案", "😀", "€"]


def save_fallback_tokenizer(path):
    """SentencePiece-style BPE with byte fallback (Llama 2, Mistral): characters outside
    the vocabulary become <0xNN> byte tokens, and the decoder turns each run of them into
    text as a whole (any invalid byte in a run makes every byte of it U+FFFD)."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for w in ["a", "b", "c", "\u2581", "\u2581a", "\u2581b", "\u2581ab", "ab", "\n", "é"]:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, [("a", "b"), ("\u2581", "a"), ("\u2581a", "b"),
                                       ("\u2581", "b")], byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=SPECIAL[3:])
    fast.save_pretrained(str(path))
    return fast


def save_wordpiece_tokenizer(path, decoder_cleanup: bool = True):
    """WordPiece (BERT-style): a window that starts on a "##" piece keeps the "##".
    decoder_cleanup=False leaves " ." to transformers' clean_up_tokenization_spaces."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL + ["x", "y", "##y", "#", "##x", "a", "##a", ".", "##.", "ab"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.decoder = decoders.WordPiece(cleanup=decoder_cleanup)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=SPECIAL[3:])
    fast.save_pretrained(str(path))
    return fast, len(words)


def fallback_ids(rng, tok) -> list[int]:
    """About 90 tokens of text over FALLBACK_TEXT (CJK, emoji and "€" as byte runs),
    with runs of special tokens and, now and then, a lone byte token."""
    ids = []
    while len(ids) < 90:
        r = rng.random()
        if r < 0.08:
            ids += [rng.randrange(len(SPECIAL))] * rng.randrange(5, 40)
        elif r < 0.12:
            ids.append(len(SPECIAL) + rng.randrange(128, 256))  # an invalid lone byte
        else:
            text = "".join(rng.choice(FALLBACK_TEXT) for _ in range(rng.randrange(1, 6)))
            ids += tok(text, add_special_tokens=False)["input_ids"]
    return ids


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.helpers import make_checkpoint

    path = tmp_path_factory.mktemp("stop_strings")
    make_checkpoint(path, "qwen2", seed=3)
    return str(path), save_byte_tokenizer(path)


def decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=True)


def first_stop(tok, ids, stops, min_tokens: int) -> int | None:
    """The reference: the first k > min_tokens at which decode(ids[:k]) holds a stop."""
    for k in range(min_tokens + 1, len(ids) + 1):
        text = decode(tok, ids[:k])
        if any(s in text for s in stops):
            return k
    return None


def cut(text: str, stops, include: bool) -> tuple[str, str | None]:
    """The reference cut: at the first end position where the text ends in a stop string
    (the longest one ending there); and that stop string."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            hit = max(hits, key=len)
            return (text[:end] if include else text[:end - len(hit)]), hit
    return text, None


def generate(path, prompts, params, **kw):
    engine = Engine(path, page_size=PAGE, debug_integrity=True,
                    **{"max_kv_tokens": 8192, **kw})
    return engine, engine.generate(prompts, params)


def pick_stops(tok, outs, spans) -> list[str]:
    """Stop strings taken from the unconstrained texts: (request, sample, start, length)
    gives the first `length` characters from `start` on without a replacement character."""
    stops = []
    for r, j, start, length in spans:
        text = decode(tok, outs[r].outputs[j].token_ids)
        s = next(text[i:i + length] for i in range(start, len(text) - length)
                 if "\ufffd" not in text[i:i + length])
        stops.append(s)
    return stops


PROMPTS = [list(range(9, 30)), list(range(40, 46))]
BASE = dict(n=6, temperature=1.0, seed=11, ignore_eos=True)


def check_against_reference(tok, free, got, stops, max_tokens, min_tokens, include):
    """got (with stop, max_tokens) against the unconstrained run free; returns the stop
    positions k of the samples that stopped."""
    ks = []
    for fo, go in zip(free, got, strict=True):
        for fc, gc in zip(fo.outputs, go.outputs, strict=True):
            k = first_stop(tok, fc.token_ids[:max_tokens], stops, min_tokens)
            want = fc.token_ids[:k or max_tokens]
            assert gc.token_ids == want
            assert gc.finish_reason == ("stop" if k else "length")
            torch.testing.assert_close(torch.tensor(gc.logprobs),
                                       torch.tensor(fc.logprobs[:len(want)]), atol=1e-4,
                                       rtol=0)
            text = decode(tok, want)
            assert (gc.text, gc.stop_reason) == (cut(text, stops, include) if k
                                                  else (text, None))
            if k:
                ks.append(k)
    return ks


@pytest.mark.parametrize("include", [False, True])
def test_samples_stop_where_the_decoded_prefix_first_holds_a_stop_string(checkpoint,
                                                                         include):
    path, tok = checkpoint
    _, free = generate(path, PROMPTS, SamplingParams(max_tokens=64, **BASE))
    stops = pick_stops(tok, free, [(0, 0, 40, 6), (0, 3, 110, 5), (1, 2, 90, 6)])
    params = SamplingParams(max_tokens=56, stop=stops, include_stop_str_in_output=include,
                            **BASE)
    _, got = generate(path, PROMPTS, params)
    ks = check_against_reference(tok, free, got, stops, 56, 0, include)
    assert len(ks) >= 3 and max(ks) > 30  # past the first window of tokens
    stopped = [c for o in got for c in o.outputs if c.finish_reason == "stop"]
    for c in stopped:  # each stop string spans several tokens
        assert not any(s in decode(tok, c.token_ids[-1:]) for s in stops)
        assert any(s in c.text for s in stops) == include


def test_min_tokens_delays_the_check_but_an_earlier_stop_string_still_counts(checkpoint):
    """Not checked before min_tokens + 1 tokens; then the whole text so far counts, so a
    stop string from the first min_tokens tokens stops the sample at min_tokens + 1."""
    path, tok = checkpoint
    _, free = generate(path, PROMPTS, SamplingParams(max_tokens=64, **BASE))
    m = 30
    stops = pick_stops(tok, free, [(0, 1, 3, 4), (1, 4, 50, 5)])
    params = SamplingParams(max_tokens=60, min_tokens=m, stop=stops, **BASE)
    _, got = generate(path, PROMPTS, params)
    ks = check_against_reference(tok, free, got, stops, 60, m, False)
    assert min(ks) == m + 1 and max(ks) > m + 1
    assert first_stop(tok, free[0].outputs[1].token_ids, stops, 0) < m  # it was early


@pytest.mark.parametrize("kw", [dict(merge_identical_samples=False),
                                dict(max_kv_tokens=40 * PAGE, reserve_ratio=0.0),
                                dict(max_batch_size=5), dict(cascade_decode=False)],
                         ids=["unmerged", "preempting", "small-batches", "no-cascade"])
def test_stops_do_not_depend_on_merging_preemption_or_batching(checkpoint, kw):
    path, tok = checkpoint
    prompts = [list(range(9, 30)), list(range(50, 53)), list(range(60, 75))]
    common = dict(n=12, temperature=0.6, seed=5, ignore_eos=True, max_tokens=48)
    _, free = generate(path, prompts, SamplingParams(**common))
    stops = pick_stops(tok, free, [(0, 0, 20, 4), (1, 5, 30, 4), (2, 7, 25, 5)])
    params = SamplingParams(stop=stops, **common)
    merged_engine, merged = generate(path, prompts, params)
    other_engine, other = generate(path, prompts, params, **kw)
    check_against_reference(tok, free, merged, stops, 48, 0, False)
    check_against_reference(tok, free, other, stops, 48, 0, False)
    s = merged_engine.stats()
    assert s["decode_rows"] < s["decode_tokens"]  # samples were merged
    if "reserve_ratio" in kw:
        assert other_engine.stats()["preemptions"] > 0
    _, fewer = generate(path, prompts, SamplingParams(**{**common, "n": 3}, stop=stops))
    for o, f in zip(merged, fewer):  # a sample does not depend on its siblings
        assert [(c.token_ids, c.finish_reason, c.text) for c in o.outputs[:3]] == [
            (c.token_ids, c.finish_reason, c.text) for c in f.outputs]


def test_requests_without_stop_strings_never_decode_and_windows_stay_bounded(checkpoint):
    path, tok = checkpoint
    engine = Engine(path, page_size=PAGE, max_kv_tokens=8192)
    lengths = []
    real = engine.tokenizer.decode

    def counting(ids, **kw):
        lengths.append(len(ids))
        return real(ids, **kw)

    engine.tokenizer.decode = counting
    params = SamplingParams(n=3, max_tokens=150, seed=1, ignore_eos=True)
    engine.generate(PROMPTS, params)
    assert len(lengths) == 6  # the outputs' texts, nothing while generating
    lengths.clear()  # (a replaced decode turns the batched path and the filter off)
    out = engine.generate(PROMPTS, SamplingParams(n=3, max_tokens=150, seed=1,
                                                  ignore_eos=True, stop=["zzzz"]))
    assert {c.finish_reason for o in out for c in o.outputs} == {"length"}
    # one window per token (the last token's window without it is the one before's), and
    # a second when the window's start moves on (every 8 tokens)
    assert 6 * 140 < len(lengths) < 6 * 150 * 5 // 4
    assert sum(n > 100 for n in lengths) == 6  # only the outputs' texts decode it all


def test_the_byte_level_filter_skips_tokens_without_a_stop_strings_last_byte(checkpoint,
                                                                             monkeypatch):
    """No token of the test's byte-level vocabulary holds a "z" (its special tokens
    decode to nothing): after each sample's first check (its whole completion, min_tokens
    + 1 tokens) the filter rules every later token out; with "a" it rules out the tokens
    without one."""
    import brorl.engine.stop

    path, tok = checkpoint
    checked = []
    real = brorl.engine.stop.first_windows
    monkeypatch.setattr(brorl.engine.stop, "first_windows", lambda ids, *a: checked.append(
        len(ids)) or real(ids, *a))
    eng = Engine(path, page_size=PAGE, max_kv_tokens=8192)
    prompt_lens = {len(p) for p in PROMPTS}
    for m in (0, 7):
        checked.clear()
        eng.generate(PROMPTS, SamplingParams(n=3, max_tokens=150, seed=1, ignore_eos=True,
                                             min_tokens=m, stop=["zzzz"]))
        assert sorted(checked) == sorted(n + m + 1 for n in prompt_lens for _ in range(3))
    table = eng._stop.byte_filter(("xa",))
    assert table is not None and sum(table) < len(table) * 0.7
    assert all(table[i] == ("a" in tok.decode([i], skip_special_tokens=True))
               for i in range(len(table)))



def test_the_byte_level_filter_keeps_stop_strings_that_end_in_a_replacement_character(
        tmp_path):
    """A lone continuation byte (0xa9) after "a" decodes to "a\ufffd": the U+FFFD is new
    with that token although the token holds none of its bytes (EF BF BD), so a stop string
    ending in one is not ruled out by the last token's bytes. A stop string that is no
    UTF-8 (a lone surrogate) never matches, and does not break the filter."""
    from brorl.engine.stop import gpt2_byte_chars

    tok = save_byte_tokenizer(tmp_path)
    a = tok.backend_tokenizer.token_to_id("a")
    cont = tok.backend_tokenizer.token_to_id(gpt2_byte_chars()[0xa9])
    ids = [a, a, a, cont, a]
    assert decode(tok, ids[:4]) == "aaa\ufffd"
    for stop, want in (("a\ufffd", 4), ("\ufffd", 4), ("\ud800", None)):
        group = SimpleNamespace(prompt_len=0, params=SamplingParams(stop=stop))
        for checker in StopChecker(tok), StopChecker(tok, batch=False, filter=False):
            got = next((k for k in range(1, len(ids) + 1) if checker.stopped(
                [SimpleNamespace(token_ids=ids[:k], group=group)])[0]), None)
            assert got == want, (stop, checker.filter)

def random_ids(rng, vocab_size: int) -> list[int]:
    """90 or so tokens, with runs of special tokens (they decode to nothing)."""
    ids = []
    while len(ids) < 90:
        if rng.random() < 0.1:
            ids += [rng.randrange(len(SPECIAL))] * rng.randrange(5, 40)
        else:
            ids.append(rng.randrange(len(SPECIAL), vocab_size))
    return ids


KINDS = ["bytes", "words", "byte-fallback", "wordpiece"]


def make_tokenizer(path, kind: str):
    """(tokenizer, vocab size or None for byte fallback, whose ids come from text)."""
    return {"bytes": lambda: (save_byte_tokenizer(path), 128),
            "words": lambda: save_word_tokenizer(path),
            "byte-fallback": lambda: (save_fallback_tokenizer(path), None),
            "wordpiece": lambda: save_wordpiece_tokenizer(path),
            "wordpiece-cleanup": lambda: save_wordpiece_tokenizer(path, False)}[kind]()


def random_case(rng, tok, vocab_size) -> tuple[list[int], list[str], int]:
    """Token ids, stop strings taken from their text (possibly none), and min_tokens."""
    ids = fallback_ids(rng, tok) if vocab_size is None else random_ids(rng, vocab_size)
    full = decode(tok, ids)
    stops = []
    for _ in range(rng.randrange(1, 4)):
        n = rng.randrange(1, 9)
        i = rng.randrange(0, max(1, len(full) - n))
        s = full[i:i + n].replace("\ufffd", "")
        if s:
            stops.append(s)
    return ids, stops, rng.choice([0, 0, 5, 40])


@pytest.mark.parametrize("kind", KINDS)
def test_window_check_agrees_with_decoding_every_prefix(tmp_path, kind):
    tok, vocab_size = make_tokenizer(tmp_path, kind)
    rng = random.Random(0)
    stopped_late = 0
    for case in range(60):
        ids, stops, m = random_case(rng, tok, vocab_size)
        if not stops:
            continue
        want = first_stop(tok, ids, stops, m)
        got = next((k for k in range(m + 1, len(ids) + 1) if completes_stop(
            lambda w: decode(tok, w), ids[:k], 0, m, tuple(stops))), None)
        assert got == want, (case, stops, m)
        stopped_late += bool(want and want > m + 25)
    assert stopped_late >= 10


@pytest.mark.parametrize("kind", [*KINDS, "wordpiece-cleanup"])
def test_batched_and_one_by_one_checks_agree_step_by_step(tmp_path, kind):
    """StopChecker.stopped over a batch, one token per step as the engine calls it (its
    memo of the last step, merged samples, min_tokens): decoding the step's windows in
    one backend call and one by one give the same decisions and texts, those of the
    reference. With clean_up_tokenization_spaces (which changes WordPiece texts where
    the backend's decoder does not clean them) the batched path is refused, and the
    one-by-one texts are the cleaned ones."""
    tok, vocab_size = make_tokenizer(tmp_path, kind)
    cleanup = kind.endswith("-cleanup")
    tok.clean_up_tokenization_spaces = cleanup
    assert (batch_decoder(tok) is None) == cleanup
    rng = random.Random(2)
    cases = [c for c in (random_case(rng, tok, vocab_size) for _ in range(40)) if c[1]]
    cases += cases[:6]  # identical samples share their windows within a step
    prompt = [len(SPECIAL)] * 3
    if cleanup:
        raw = tok.backend_tokenizer.decode_batch([c[0] for c in cases],
                                                 skip_special_tokens=True)
        assert sum(r != decode(tok, c[0]) for r, c in zip(raw, cases)) >= 10
    checkers = StopChecker(tok), StopChecker(tok, batch=False, filter=False)
    assert (checkers[0].byte_filter(("a",)) is not None) == (kind == "bytes")
    params = [SamplingParams(max_tokens=400, stop=stops, min_tokens=m)
              for _, stops, m in cases]
    groups = [SimpleNamespace(prompt_len=len(prompt), params=p) for p in params]
    stopped_at = {}
    for k in range(1, max(len(c[0]) for c in cases) + 1):
        live = [i for i, (ids, _, m) in enumerate(cases)
                if i not in stopped_at and m < k <= len(ids)]
        seqs = [SimpleNamespace(token_ids=prompt + cases[i][0][:k], group=groups[i])
                for i in live]
        batched, single = (c.stopped(seqs) for c in checkers)
        assert batched == single, k
        stopped_at.update((i, k) for i, hit in zip(live, batched) if hit)
    assert len(stopped_at) >= len(cases) // 2
    for i, (ids, stops, m) in enumerate(cases):
        assert stopped_at.get(i) == first_stop(tok, ids, stops, m), i
        if i in stopped_at:
            out = ids[:stopped_at[i]]
            texts = [c.text(out, params[i], True, {}) for c in checkers]
            assert texts == [cut(decode(tok, out), stops, False)] * 2


def test_clean_up_tokenization_spaces_keeps_the_fast_paths_only_where_decode_skips_it(tmp_path):
    """Llama 3 sets clean_up_tokenization_spaces; transformers releases that skip the
    cleanup for BPE models keep the batched decode and the byte filter, and only where the
    tokenizer's decode then equals the backend's on a text the cleanup would change."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = _byte_chars()  # every byte a token, so "." and "," encode
    backend = Tokenizer(models.BPE({chars[b]: b for b in range(256)}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    tok.clean_up_tokenization_spaces = True
    ids = tok("a . b , c", add_special_tokens=False)["input_ids"]
    raw = tok.backend_tokenizer.decode(ids, skip_special_tokens=True)
    assert tok.clean_up_tokenization(raw) != raw  # the cleanup would change this text
    skipped = decode(tok, ids) == raw
    assert (batch_decoder(tok) is not None) == skipped
    assert (StopChecker(tok).byte_filter(("a",)) is not None) == skipped
    if hasattr(tok, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"):
        tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
        assert decode(tok, ids) != raw and batch_decoder(tok) is None


def test_the_batched_path_is_refused_when_decode_is_replaced(tmp_path):
    tok = save_byte_tokenizer(tmp_path)
    assert batch_decoder(tok) is not None
    tok.decode = lambda ids, **kw: "x"
    assert batch_decoder(tok) is None
    assert StopChecker(tok).decoder({})([9, 10]) == "x"


def test_a_window_that_starts_inside_a_split_character_still_finds_the_stop(tmp_path):
    """"€" as three one-byte tokens, then "a"s, tokens that decode to nothing and "c": at
    some of these lengths the window starts on the continuation bytes, which decode to
    replacement characters that must not count as the stop string's context."""
    tok = save_byte_tokenizer(tmp_path)
    chars, vocab = _byte_chars(), tok.get_vocab()
    e2, x82, xac, a, b, c = (vocab["".join(chars[x] for x in p)] for p in (
        b"\xe2", b"\x82", b"\xac", b"a", b"b", b"c"))
    for j in range(6):
        stop = "€" + "a" * j + "c"
        for x in range(30):
            for y in range(4):
                ids = [b] * 40 + [e2] + [3] * y + [x82, xac] + [a] * j + [3] * x + [c]
                got = [completes_stop(lambda w: decode(tok, w), ids[:k], 0, 0, (stop,))
                       for k in range(1, len(ids) + 1)]
                assert got == [False] * (len(ids) - 1) + [True], (j, x, y)


def test_a_window_that_starts_on_a_wordpiece_continuation_still_finds_the_stop(tmp_path):
    """A window starting on "##y" decodes as "##y..." (the decoder keeps the first
    piece's "##"), which holds "#" before the last token adds a real one."""
    tok, _ = save_wordpiece_tokenizer(tmp_path)
    v = tok.get_vocab()
    for n in range(1, 60):
        ids = [v["x"]] + [v["##y"]] * n + [v["#"]]
        got = [completes_stop(lambda w: decode(tok, w), ids[:k], 0, 0, ("#",))
               for k in range(1, len(ids) + 1)]
        assert got == [False] * (len(ids) - 1) + [True], n


@pytest.mark.parametrize("stop,want", [("ab", ("ab",)), (["a", "bc"], ("a", "bc")),
                                       (("x",), ("x",)), ([], None), (None, None)])
def test_stop_is_normalised_to_a_tuple(stop, want):
    assert SamplingParams(stop=stop).stop == want


@pytest.mark.parametrize("kwargs,match", [
    (dict(stop=""), "non-empty"), (dict(stop=["a", ""]), "non-empty"),
    (dict(stop=[1]), "must be strings, got 1"), (dict(stop=["a", None]), "got None"),
    (dict(stop={"a"}), "got set"), (dict(stop=b"ab"), "got bytes"),
    (dict(stop=7), "got int"), (dict(include_stop_str_in_output="yes"), "must be a bool"),
])
def test_bad_stop_values_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_stop_strings_without_a_tokenizer_are_refused_before_any_work(qwen2):
    path, _ = qwen2
    engine = Engine(path, page_size=PAGE, max_kv_tokens=64 * PAGE, debug_integrity=True)
    assert engine.tokenizer is None
    with pytest.raises(ValueError, match="prompt 1 sets stop strings .* no tokenizer"):
        engine.generate([[5, 6], [7, 8]], [SamplingParams(), SamplingParams(stop="x")])
    assert engine.stats()["prefill_tokens"] == 0
    out = engine.generate([[5, 6]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_token_keeps_the_text_before_it_and_names_itself(checkpoint, include):
    """With min_tokens, a stop string can appear before the check starts; a sample whose
    token min_tokens + 1 is a stop token stops on that token (checked first, as vLLM):
    its text is not cut at the earlier stop string, it holds every token before the stop
    token (and the stop token's own text with include_stop_str_in_output, as vLLM), and
    its stop_reason is the token."""
    path, tok = checkpoint
    m, stop_ids = 8, list(range(20, 70))
    common = dict(n=30, temperature=1.0, seed=4, ignore_eos=True, max_tokens=20,
                  min_tokens=m, stop_token_ids=stop_ids, include_stop_str_in_output=include)
    _, free = generate(path, PROMPTS[:1], SamplingParams(**common))
    on_token = [c for c in free[0].outputs if len(c.token_ids) == m + 1
                and c.finish_reason == "stop"]
    assert on_token
    early = decode(tok, on_token[0].token_ids[:m])
    stop = next(early[i:i + 3] for i in range(len(early) - 3)
                if "\ufffd" not in early[i:i + 3])
    _, got = generate(path, PROMPTS[:1], SamplingParams(**common, stop=[stop]))
    for fc, gc in zip(free[0].outputs, got[0].outputs, strict=True):
        if fc in on_token:
            assert gc.token_ids == fc.token_ids and gc.stop_reason == fc.token_ids[-1]
            assert gc.text == fc.text == decode(tok, fc.token_ids[:None if include else -1])
            assert decode(tok, fc.token_ids[-1:])  # the stop token has text to leave out
    assert got[0].outputs[on_token[0].index].text.find(stop) < len(early)


def test_the_tokenizers_eos_ends_samples_when_the_configs_name_none(tmp_path):
    """A checkpoint whose config.json (and generation_config.json) give no eos_token_id
    still stops at its tokenizer's EOS (id 2 here), as vLLM does; with stop_reason None,
    as for any EOS of the model, and no text (it is a special token)."""
    import json
    import os

    from tests.helpers import make_checkpoint

    make_checkpoint(tmp_path, "qwen2", seed=5, eos_token_id=None)
    with open(tmp_path / "config.json") as f:
        assert json.load(f).get("eos_token_id") is None
    gen = tmp_path / "generation_config.json"
    if os.path.exists(gen):
        assert json.loads(gen.read_text()).get("eos_token_id") is None
    tok = save_byte_tokenizer(tmp_path)
    assert tok.eos_token_id == 2
    engine = Engine(str(tmp_path), page_size=PAGE, max_kv_tokens=256 * PAGE,
                    debug_integrity=True)
    assert engine.model_config.eos_token_ids == (2,)
    out = engine.generate([PROMPTS[0]], SamplingParams(n=64, seed=3, max_tokens=24))
    ended = [c for c in out[0].outputs if c.token_ids[-1] == 2]
    assert ended  # the random policy draws it
    for c in out[0].outputs:
        assert 2 not in c.token_ids[:-1]
        assert c.finish_reason == ("stop" if c in ended else "length")
        assert c.stop_reason is None and c.text == decode(tok, c.token_ids)
    free = engine.generate([PROMPTS[0]], SamplingParams(n=64, seed=3, max_tokens=24,
                                                        ignore_eos=True))
    assert any(2 in c.token_ids[:-1] for c in free[0].outputs)
