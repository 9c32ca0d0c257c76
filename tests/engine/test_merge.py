"""Merging samples with identical contexts in decode (merge_identical_samples): the model
runs once per distinct context, every sample still gets the tokens and logprobs it would
get alone, and pages filled while merged are shared, so a tight KV pool runs more samples
at once."""

import pytest
import torch

from brorl.engine import Engine, SamplingParams
from brorl.engine.merging import distinct_contexts

PAGE = 4


def run(path, prompts, params, **kw):
    engine = Engine(path, page_size=PAGE, debug_integrity=True, **{"max_kv_tokens": 8192, **kw})
    return engine, engine.generate(prompts, params)


def assert_same(a, b):
    for oa, ob in zip(a, b, strict=True):
        for ca, cb in zip(oa.outputs, ob.outputs, strict=True):
            assert ca.token_ids == cb.token_ids
            assert ca.finish_reason == cb.finish_reason
            torch.testing.assert_close(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs),
                                       atol=1e-4, rtol=0)  # logits / 0.05: batch rounding x20


def test_greedy_samples_of_a_prompt_decode_as_one_row(qwen2):
    path, _ = qwen2
    prompts = [list(range(5, 12)), list(range(20, 29))]
    params = SamplingParams(n=16, temperature=0.0, max_tokens=10, ignore_eos=True)
    merged_engine, merged = run(path, prompts, params)
    plain_engine, plain = run(path, prompts, params, merge_identical_samples=False)
    assert_same(merged, plain)
    s, p = merged_engine.stats(), plain_engine.stats()
    assert s["decode_tokens"] == p["decode_tokens"] == 2 * 16 * 9
    assert s["decode_rows"] == 2 * 9  # one row per prompt and step
    assert p["decode_rows"] == p["decode_tokens"]


@pytest.mark.parametrize("kw", [
    {},
    dict(cascade_decode=False),
    dict(attention_backend="torch"),
    dict(max_kv_tokens=30 * PAGE, reserve_ratio=0.0),  # preempts and recomputes samples
    dict(max_batch_size=5),
])
def test_merged_samples_that_diverge_continue_from_their_own_kv(qwen2, kw):
    """A low temperature (the random model is flat) makes samples share their first
    tokens and then part: after a split each continues from the KV copied to it."""
    path, _ = qwen2
    prompts = [list(range(5, 23)), list(range(40, 43))]
    params = SamplingParams(n=24, temperature=0.05, max_tokens=16, seed=11, ignore_eos=True)
    merged_engine, merged = run(path, prompts, params, **kw)
    _, plain = run(path, prompts, params, merge_identical_samples=False,
                   **{k: v for k, v in kw.items() if k != "max_kv_tokens"})
    assert_same(merged, plain)
    s = merged_engine.stats()
    assert s["decode_rows"] < 0.75 * s["decode_tokens"]  # merging happened
    assert s["shared_decode_pages"] > 0  # and pages filled while merged are shared
    for o in merged:  # and the samples parted: some pair split after sharing tokens
        outs = [tuple(c.token_ids) for c in o.outputs]
        assert 2 <= len(set(outs)) < len(outs)
        assert any(a != b and a[:2] == b[:2] for a in outs for b in outs)
    if "reserve_ratio" in kw:
        assert s["preemptions"] > 0
    assert s["free_pages"] + s["cached_pages"] == s["num_pages"]


def test_a_step_refines_the_previous_partition_of_contexts():
    """Samples merge iff they were one row at their last step (same merged_with) and have
    the same length and last token; a sample marked distinct (None) is never merged, even
    with equal tokens, and neither are samples of different rows."""

    class Seq:
        def __init__(self, tokens, merged_with):
            self.token_ids, self.merged_with = tokens, merged_with

    a, b = object(), object()
    seqs = [Seq([1, 2, 5], a), Seq([1, 2, 6], a), Seq([1, 2, 5], a), Seq([1, 2, 5, 5], a),
            Seq([1, 2, 5], None), Seq([1, 2, 5], b), Seq([1, 2, 5], b), Seq([1, 2, 5], None)]
    rows, index = distinct_contexts(seqs)
    assert rows == [seqs[0], seqs[1], seqs[3], seqs[4], seqs[5], seqs[7]]
    assert index == [0, 1, 0, 2, 3, 4, 4, 5]
    assert distinct_contexts(seqs[:2]) == (seqs[:2], None)
    assert distinct_contexts(seqs[4:6]) == (seqs[4:6], None)


def test_samples_alone_in_their_row_are_never_compared_again(qwen2):
    """After a decode step a sample whose row had no other member is marked distinct for
    good; the members of a shared row point to it."""
    path, _ = qwen2
    engine = Engine(path, page_size=PAGE, max_kv_tokens=8192)
    params = SamplingParams(n=24, temperature=0.05, max_tokens=8, seed=11, ignore_eos=True)
    seen = []
    decode = engine._decode

    def spy(seqs):
        out = decode(seqs)
        seen.append([(tuple(s.token_ids[:-1]), s.merged_with) for s in seqs])
        return out

    engine._decode = spy
    engine.generate([list(range(5, 23))], params)
    sizes = set()
    for step in seen:
        rows = {}  # the context each sample decoded from
        for context, m in step:
            rows.setdefault(context, []).append(m)
        for members in rows.values():
            sizes.add(len(members) > 1)
            if len(members) == 1:
                assert members[0] is None
            else:  # all point to one member of the row
                assert len({id(m) for m in members}) == 1 and members[0] is not None
    assert sizes == {True, False}


@pytest.mark.parametrize("shared_rows", [True, False])
def test_stop_rules_and_min_tokens_hold_for_merged_samples(qwen2, monkeypatch, shared_rows):
    """Merged rows go to the sampler once per row (shared_rows: the samples' bans and
    parameters are their row's) or expanded per sample: stop tokens, min_tokens bans and
    max_tokens give what they give alone."""
    import brorl.engine.merging

    monkeypatch.setattr(brorl.engine.merging, "SHARED_ROW_SAMPLING", 1 if shared_rows else 10**9)
    path, model = qwen2
    prompts = [list(range(5, 23)), list(range(40, 43))]
    # the most likely first tokens are stop tokens, so min_tokens has something to ban
    with torch.no_grad():
        first = model(torch.tensor([prompts[0]])).logits[0, -1].topk(3).indices.tolist()
    params = SamplingParams(n=32, temperature=0.05, max_tokens=12, seed=4, min_tokens=3,
                            stop_token_ids=first)
    merged_engine, merged = run(path, prompts, params)
    _, plain = run(path, prompts, params, merge_identical_samples=False)
    assert_same(merged, plain)
    s = merged_engine.stats()
    assert s["decode_rows"] < s["decode_tokens"] / 2
    reasons = {c.finish_reason for o in merged for c in o.outputs}
    assert reasons == {"stop", "length"}
    for c in merged[0].outputs:
        assert len(c.token_ids) >= 3
        assert not set(c.token_ids[:2]) & set(first)


def test_pages_filled_while_merged_are_shared_so_a_tight_pool_runs_more_at_once(qwen2):
    """Greedy samples stay merged: each page they fill is held once, not once per sample.
    With a pool that fits 9 samples' reservations, more samples run at a time (fewer decode
    steps), with the same outputs, nothing preempted and no page leaked."""
    path, _ = qwen2
    prompt = list(range(5, 14))
    params = SamplingParams(n=32, temperature=0.0, max_tokens=24, ignore_eos=True)
    merged_engine, merged = run(path, [prompt], params, max_kv_tokens=60 * PAGE)
    plain_engine, plain = run(path, [prompt], params, max_kv_tokens=60 * PAGE,
                              merge_identical_samples=False)
    assert_same(merged, plain)
    s, p = merged_engine.stats(), plain_engine.stats()
    assert s["shared_decode_pages"] > 0 and p["shared_decode_pages"] == 0
    assert s["preemptions"] == p["preemptions"] == 0
    assert s["decode_steps"] < 0.9 * p["decode_steps"]
    assert s["free_pages"] + s["cached_pages"] == s["num_pages"]


def test_first_tokens_are_drawn_from_one_row_of_prompt_logits_per_group(qwen2):
    """A group's samples start from the same prompt logits: the sampler gets one row per
    group (not n copies) and each sample still draws with its own noise, as when merging
    is off."""
    path, _ = qwen2
    prompts = [list(range(5, 23)), list(range(40, 43)), list(range(60, 77))]
    params = SamplingParams(n=20, temperature=0.8, max_tokens=3, seed=5, ignore_eos=True)
    engine = Engine(path, page_size=PAGE, max_kv_tokens=8192, debug_integrity=True)
    shapes = []
    call = type(engine.sampler).__call__

    class Spy(type(engine.sampler)):
        def __call__(self, logits, seqs, *shared):
            shapes.append((logits.shape[0], len(seqs)))
            return call(self, logits, seqs, *shared)

    engine.sampler.__class__ = Spy
    merged = engine.generate(prompts, params)
    _, plain = run(path, prompts, params, merge_identical_samples=False)
    assert_same(merged, plain)
    assert shapes[0] == (3, 60)
    assert len({tuple(c.token_ids[:1]) for c in merged[0].outputs}) > 1  # own noise each
