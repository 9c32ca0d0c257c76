"""Engine behaviour: group fork, prefix reuse, preemption, determinism, stop rules,
page accounting over long random runs."""

import random

import pytest
import torch

from brorl.engine import Engine, SamplingParams

PAGE = 4


def tokens_of(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_n_samples_prefill_the_prompt_once_and_a_repeat_reuses_the_cache(qwen2):
    path, _ = qwen2
    engine = Engine(path, page_size=PAGE, max_kv_tokens=8192, debug_integrity=True)
    prompt = list(range(3, 3 + 4 * PAGE + 2))  # 18 tokens
    out = engine.generate(prompt, SamplingParams(n=64, max_tokens=6, seed=0))[0]
    assert len(out.outputs) == 64
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # samples differ
    s = engine.stats()
    assert s["prefill_tokens"] == len(prompt)  # not 64 x
    assert s["cached_prompt_tokens"] == 0
    engine.generate(prompt, SamplingParams(n=8, max_tokens=6, seed=1))
    s2 = engine.stats()
    cached = (len(prompt) - 1) // PAGE * PAGE
    assert s2["cached_prompt_tokens"] == cached
    assert s2["prefill_tokens"] - s["prefill_tokens"] == len(prompt) - cached


def test_identical_prompts_in_one_call_are_computed_once(qwen2):
    path, _ = qwen2
    engine = Engine(path, page_size=PAGE, max_kv_tokens=8192, debug_integrity=True)
    prompt = list(range(10, 10 + 5 * PAGE))
    engine.generate([prompt] * 3, SamplingParams(n=2, max_tokens=3, seed=0))
    # the 2nd and 3rd wait for the 1st to be cached, then compute only the last page
    assert engine.stats()["prefill_tokens"] == len(prompt) + 2 * PAGE


def run(path, prompts, params, **kw):
    engine = Engine(path, page_size=PAGE, debug_integrity=True, **kw)
    outs = engine.generate(prompts, params)
    return engine, outs


def test_small_pool_preempts_yet_gives_the_same_samples(qwen2):
    path, _ = qwen2
    prompts = [list(range(5, 25)), list(range(40, 47))]
    params = SamplingParams(n=12, max_tokens=40, seed=123, ignore_eos=True)
    _, big = run(path, prompts, params, max_kv_tokens=16384)
    small_engine, small = run(path, prompts, params, max_kv_tokens=60 * PAGE,
                              reserve_ratio=0.0)
    s = small_engine.stats()
    assert s["preemptions"] > 0 and s["recomputed_tokens"] > 0
    assert tokens_of(small) == tokens_of(big)
    for a, b in zip(small, big):
        for ca, cb in zip(a.outputs, b.outputs):
            assert ca.finish_reason == cb.finish_reason == "length"
            torch.testing.assert_close(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs),
                                       atol=1e-4, rtol=0)
    assert s["free_pages"] + s["cached_pages"] == s["num_pages"]  # nothing leaked


def test_recomputed_prompt_tokens_count_the_prompt_tail_each_preempted_sample_redoes(qwen2):
    """A preempted sample keeps the group's whole prompt pages and recomputes from there:
    the prompt's partial last page (its private copy), then its own tokens. stats()
    counts that prompt part apart, for the trainer's prefix-cache hit rate."""
    path, _ = qwen2
    prompt = list(range(5, 27))  # 22 tokens: 5 whole pages of 4 and a tail of 2
    params = SamplingParams(n=12, max_tokens=40, seed=123, ignore_eos=True)
    engine, _ = run(path, [prompt], params, max_kv_tokens=50 * PAGE, reserve_ratio=0.0)
    s = engine.stats()
    assert s["preemptions"] > 0
    assert s["recomputed_prompt_tokens"] == s["preemptions"] * (len(prompt) % PAGE)
    assert s["prefill_tokens"] == len(prompt)


def test_full_reservation_never_preempts(qwen2):
    path, _ = qwen2
    params = SamplingParams(n=12, max_tokens=40, seed=123, ignore_eos=True)
    engine, _ = run(path, [list(range(5, 25))], params, max_kv_tokens=60 * PAGE)
    assert engine.stats()["preemptions"] == 0


def test_samples_do_not_depend_on_batching_or_attention_path(qwen2):
    path, _ = qwen2
    prompts = [list(range(3, 3 + n)) for n in (1, 5, 9, 13)]
    params = SamplingParams(n=5, max_tokens=12, seed=7, temperature=0.9, top_p=0.95)
    _, ref = run(path, prompts, params, max_kv_tokens=8192)
    for kw in (dict(cascade_decode=False), dict(max_batch_size=3),
               dict(attention_backend="torch"), dict(attention_backend="numba"),
               dict(attention_backend="torch", cascade_decode=False),
               dict(max_prefill_tokens=1), dict(max_kv_tokens=40 * PAGE, reserve_ratio=0.2)):
        _, outs = run(path, prompts, params, **{"max_kv_tokens": 8192, **kw})
        assert tokens_of(outs) == tokens_of(ref), kw


def test_seed_none_gives_fresh_samples_and_seeds_reproduce(qwen2):
    path, _ = qwen2
    engine = Engine(path, page_size=PAGE, max_kv_tokens=8192)
    p = [5, 6, 7]
    a = engine.generate(p, SamplingParams(n=4, max_tokens=10, ignore_eos=True))
    b = engine.generate(p, SamplingParams(n=4, max_tokens=10, ignore_eos=True))
    c = engine.generate(p, SamplingParams(n=4, max_tokens=10, ignore_eos=True, seed=3))
    d = engine.generate(p, SamplingParams(n=4, max_tokens=10, ignore_eos=True, seed=3))
    assert tokens_of(a) != tokens_of(b)
    assert tokens_of(c) == tokens_of(d)


def test_stop_tokens_min_tokens_and_eos(qwen2):
    path, _ = qwen2
    engine = Engine(path, page_size=PAGE, max_kv_tokens=8192)
    stop = list(range(3, 60))  # almost half the vocabulary stops
    out = engine.generate([9, 10], SamplingParams(n=30, max_tokens=20, seed=1,
                                                  stop_token_ids=stop))[0].outputs
    assert any(c.finish_reason == "stop" for c in out)
    for c in out:
        if c.finish_reason == "stop":
            assert c.token_ids[-1] in stop + [2]  # 2 is the checkpoint's EOS
            assert not set(c.token_ids[:-1]) & set(stop + [2])
        else:
            assert len(c.token_ids) == 20
    out = engine.generate([9, 10], SamplingParams(n=30, max_tokens=20, min_tokens=8, seed=1,
                                                  stop_token_ids=stop))[0].outputs
    assert all(len(c.token_ids) >= 8 for c in out)
    assert all(not set(c.token_ids[:7]) & set(stop + [2]) for c in out)


def test_stop_reason_names_the_stop_token_but_not_eos_or_length(qwen2):
    """vLLM's stop_reason: the token of stop_token_ids a sample stopped on; None when it
    stopped on the model's EOS (2) or at max_tokens."""
    path, _ = qwen2
    engine = Engine(path, page_size=PAGE, max_kv_tokens=8192)
    out = engine.generate([9, 10], SamplingParams(n=200, max_tokens=20, seed=1,
                                                  stop_token_ids=[5]))[0].outputs
    ends = {(c.finish_reason, c.token_ids[-1] if c.finish_reason == "stop" else None,
             c.stop_reason) for c in out}
    assert ends == {("stop", 5, 5), ("stop", 2, None), ("length", None, None)}
    listed = engine.generate([9, 10], SamplingParams(n=200, max_tokens=20, seed=1,
                                                     stop_token_ids=[5, 2]))[0].outputs
    assert [(c.token_ids, c.stop_reason) for c in listed] == [
        (c.token_ids, c.stop_reason) for c in out]  # an EOS listed still names nothing


def test_logprobs_are_of_the_temperature_scaled_full_softmax(qwen2):
    path, model = qwen2
    engine = Engine(path, page_size=PAGE, max_kv_tokens=8192)
    prompt = [4, 8, 15, 16, 23, 42]
    params = SamplingParams(n=3, max_tokens=5, temperature=1.7, top_k=4, seed=2,
                            ignore_eos=True)
    for c in engine.generate(prompt, params)[0].outputs:
        ids = torch.tensor([prompt + c.token_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1].float()
        want = torch.log_softmax(logits / 1.7, -1).gather(1, torch.tensor(c.token_ids)[:, None])
        torch.testing.assert_close(torch.tensor(c.logprobs), want[:, 0], atol=1e-4, rtol=0)
        top4 = logits.topk(4, dim=-1).indices
        assert all(t in top4[i] for i, t in enumerate(c.token_ids))


def test_long_random_run_keeps_cache_consistent_and_leaks_no_page(qwen2):
    path, _ = qwen2
    rng = random.Random(0)
    engine = Engine(path, page_size=PAGE, max_kv_tokens=80 * PAGE, reserve_ratio=0.3,
                    debug_integrity=True, max_batch_size=24)
    shared = [rng.randrange(3, 128) for _ in range(10)]  # a common "system prompt"
    for round_ in range(4):
        prompts, params = [], []
        for _ in range(5):
            tail = [rng.randrange(3, 128) for _ in range(rng.randrange(1, 14))]
            prompts.append((shared if rng.random() < 0.6 else []) + tail)
            params.append(SamplingParams(n=rng.randrange(1, 9), max_tokens=rng.randrange(1, 25),
                                         temperature=rng.choice([0.0, 1.0]), seed=round_,
                                         stop_token_ids=[rng.randrange(3, 128)]))
        outs = engine.generate(prompts, params)
        assert [len(o.outputs) for o in outs] == [p.n for p in params]
        s = engine.stats()
        assert s["free_pages"] + s["cached_pages"] == s["num_pages"]
    engine.update_weights({})  # flushes the cache
    assert engine.stats()["free_pages"] == engine.stats()["num_pages"]


def test_string_prompts_use_the_checkpoint_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.helpers import make_checkpoint

    make_checkpoint(tmp_path, "qwen2")
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(125)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(tmp_path)
    engine = Engine(str(tmp_path), page_size=PAGE, max_kv_tokens=4096)
    out = engine.generate(["w1 w2 w3", [6, 7]], SamplingParams(max_tokens=3, temperature=0,
                                                               ignore_eos=True))
    assert out[0].prompt_token_ids == [4, 5, 6]
    assert out[0].outputs[0].text == " ".join(f"w{t - 3}" if t >= 3 else "" for t in
                                              out[0].outputs[0].token_ids).strip()


@pytest.mark.parametrize("bad,match", [
    (lambda: ([[]], SamplingParams()), "prompt 0 is empty"),
    (lambda: ([[5, 999]], SamplingParams()), "outside the vocabulary"),
    (lambda: ([[5, -1]], SamplingParams()), "outside the vocabulary"),
    (lambda: ([[5] * 500], SamplingParams(max_tokens=20)), "exceeds the model's context"),
    (lambda: ([[5]], SamplingParams(stop_token_ids=[4000])), "stop token id"),
    (lambda: (["text"], SamplingParams()), "no tokenizer"),
    (lambda: ([[5], [6]], [SamplingParams()]), "2 prompts"),
    (lambda: ([[5]], {"n": 2}), "a SamplingParams or a list of them, got dict"),
    (lambda: ([[5] * 100], SamplingParams(max_tokens=300)), "KV pages"),
])
def test_bad_requests_raise_and_the_engine_keeps_working(qwen2, bad, match):
    path, _ = qwen2
    engine = Engine(path, page_size=PAGE, max_kv_tokens=64 * PAGE, debug_integrity=True)
    prompts, params = bad()
    with pytest.raises(ValueError, match=match):
        engine.generate(prompts, params)
    out = engine.generate([[5, 6]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=0), "n must be"), (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=0), "top_k"),
    (dict(min_p=2.0), "min_p"), (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=9, max_tokens=4), "min_tokens"),
    (dict(temperature=float("nan")), "temperature"), (dict(top_p=float("nan")), "top_p"),
    (dict(min_p=float("inf")), "min_p"), (dict(temperature="1"), "temperature"),
    (dict(top_k=2.5), "top_k must be an integer"), (dict(seed=1.5), "seed must be"),
    (dict(n=True), "n must be an integer"), (dict(max_tokens=8.0), "max_tokens"),
    (dict(stop_token_ids=[3.7]), "stop_token_ids must be an integer"),
    (dict(stop_token_ids=2), "stop_token_ids must be a list of token ids, got 2"),
    # vLLM's logprobs=0 means "the sampled token's": here it must not quietly mean none
    (dict(logprobs=0), "logprobs must be a bool .*logprobs=k .* not supported"),
    (dict(logprobs="no"), "logprobs must be a bool"), (dict(ignore_eos=0), "ignore_eos"),
    (dict(ignore_eos="false"), "ignore_eos must be a bool"),
    # logits / 1e-44 overflow float32 (NaN logprobs, not the greedy tokens)
    (dict(temperature=1e-44), r"temperature must be 0 \(greedy\) or >= 1e-05"),
    (dict(temperature=9e-6), "temperature must be 0"),
])
def test_bad_sampling_params_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_numpy_integers_are_token_ids_and_parameters(qwen2):
    import numpy as np

    path, _ = qwen2
    engine = Engine(path, page_size=PAGE, max_kv_tokens=64 * PAGE)
    greedy = dict(max_tokens=np.int64(4), temperature=0, ignore_eos=True)
    got = engine.generate([np.int64(5), np.int32(6)], SamplingParams(**greedy))
    want = engine.generate([[5, 6]], SamplingParams(max_tokens=4, temperature=0,
                                                    ignore_eos=True))
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids
    assert got[0].prompt_token_ids == [5, 6] and type(got[0].prompt_token_ids[0]) is int


def test_unknown_model_type_and_backend_raise(tmp_path, qwen2):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unknown model type 'gpt2'.*qwen2"):
        Engine(str(tmp_path))
    with pytest.raises(ValueError, match="attention backend 'nope'"):
        Engine(qwen2[0], attention_backend="nope", max_kv_tokens=64)


def test_a_device_or_backend_this_machine_cannot_run_fails_at_construction(qwen2,
                                                                         monkeypatch):
    """Not at the first generate (triton on CPU), nor as torch's AssertionError (cuda)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="triton attention backend needs a CUDA device"):
        Engine(qwen2[0], attention_backend="triton", max_kv_tokens=64)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda'.*use device=\"cpu\""):
        Engine(qwen2[0], device="cuda", max_kv_tokens=64)


def test_decode_time_splits_into_model_sampler_and_host(qwen2):
    """stats() accounts each decode step: its host part (everything outside the model and
    the sampling kernel) is positive and smaller than the whole step."""
    path, _ = qwen2
    engine = Engine(path, page_size=PAGE, max_kv_tokens=8192)
    engine.generate(list(range(3, 20)), SamplingParams(n=8, max_tokens=5, seed=0))
    s = engine.stats()
    assert s["decode_steps"] == 4  # the first token comes from the prefill's logits
    assert 0 < s["decode_host_seconds"] < s["decode_step_seconds"]
    assert s["decode_step_seconds"] >= s["decode_seconds"]


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="Linux only")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_cpu_pool_sized_for_free_memory_is_resident_only_where_used(qwen2, dtype):
    """The pool is zeros from calloc'd memory: creating 1 GiB of it neither clears nor
    maps it (torch.zeros did both: about 1 s per 2 GB here), and it works as zeros."""
    path, _ = qwen2
    before = _resident_bytes()
    engine = Engine(path, page_size=PAGE, max_kv_tokens=(1 << 30) // 512, dtype=dtype)
    pool = engine.kv
    assert pool.k.nbytes + pool.v.nbytes >= 1 << 29  # at least 512 MiB in this model
    assert _resident_bytes() - before < 128 << 20
    assert pool.k.is_contiguous() and pool.k.data_ptr() % 64 == 0 and pool.v.data_ptr() % 64 == 0
    assert not pool.k[:, -3:].any() and not pool.v[:, :3].any()
    want = Engine(path, page_size=PAGE, max_kv_tokens=256, dtype=dtype)
    params = SamplingParams(n=3, max_tokens=5, temperature=0, ignore_eos=True)
    assert tokens_of(engine.generate([[5, 6, 7]], params)) == tokens_of(
        want.generate([[5, 6, 7]], params))


def test_pools_sized_for_free_memory_count_the_pools_this_process_made(qwen2):
    """Free memory does not show a lazily mapped pool's untouched pages, so each engine
    sized from free memory counts the live pools as taken (else each would take 30% of
    the same memory)."""
    import gc

    from brorl.engine import kv_pool

    path, _ = qwen2
    gc.collect()
    before = kv_pool._lazy_pool_bytes[0]  # pools of engines other tests still hold
    first = Engine(path, page_size=PAGE)
    second = Engine(path, page_size=PAGE)
    assert second.kv.num_pages < 0.85 * first.kv.num_pages  # ~0.7x: 30% of what is left
    held = first.kv.k.nbytes + first.kv.v.nbytes + second.kv.k.nbytes + second.kv.v.nbytes
    assert kv_pool._lazy_pool_bytes[0] == before + held
    del first, second
    gc.collect()
    assert kv_pool._lazy_pool_bytes[0] == before  # released with their engines
