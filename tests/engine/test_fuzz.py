"""Differential fuzzing of the engine: random request mixes (prompts sharing prefixes that
end on and around page boundaries, n up to 24, low temperatures so that samples repeat and
merge, stop tokens, min_tokens, top-k/top-p/min-p, greedy) run in a reference
configuration and in stressed ones (a KV pool that forces preemption, small batches and
prefill chunks, another page size, paged instead of cascade decode, merging off, other
attention backends, the Python cache, a prefix already cached, a flushed cache, a rejected
request before, every request in its own call, greedy requests in another order). Every
configuration must give the reference's tokens, finish reasons and logprobs, keep the
stop / length / truncation rules, agree with the transformers model, and leak no page.

The tight pools are the smallest that validation accepts. The tests at the end are the
minimal repros of the bugs this fuzzing found (admission that stalled the scheduler, a NaN
temperature accepted).
"""

from __future__ import annotations

import importlib.util
import math
import random

import pytest
import torch

from brorl.engine import Engine, SamplingParams
from brorl.kernels.decode_attention_cpp import attention_ext_built

VOCAB = 128  # tests/helpers.py
EOS = 2
BIG_POOL = 4096  # KV tokens: nothing is preempted or evicted
# float32 logits agree to ~1e-6 across batchings; a logprob is a logit over T (>= 0.05)
LOGPROB_ATOL = 1e-4
SEEDS = range(12)


def _backends() -> list[str]:
    out = ["torch"]
    if importlib.util.find_spec("numba") is not None:
        out.append("numba")
    if attention_ext_built():
        out.append("cpp")
    return out


# -- drawing requests ------------------------------------------------------------------
def _draw_params(rng: random.Random, long: bool = False) -> SamplingParams:
    max_tokens = rng.randrange(8, 14) if long else rng.randrange(1, 14)
    stop = None
    if not long and rng.random() < 0.6:
        stop = rng.sample(range(3, VOCAB), rng.randrange(1, 20))
    return SamplingParams(
        n=rng.randrange(12, 25) if long else rng.randrange(1, 25),
        temperature=(rng.choice([0.0, 0.05, 0.1, 0.2]) if long else
                     rng.choice([0.0, 0.05, 0.1, 0.2, 0.3, 0.7, 1.0, 1.5])),
        top_k=rng.choice([-1, -1, 1, 2, 5, 20]),
        top_p=rng.choice([1.0, 1.0, 0.9, 0.5]),
        min_p=rng.choice([0.0, 0.0, 0.05, 0.3]),
        max_tokens=max_tokens,
        min_tokens=rng.randrange(0, max_tokens + 1) if rng.random() < 0.5 else 0,
        seed=rng.randrange(0, 1000),
        stop_token_ids=stop,
        ignore_eos=long or rng.random() < 0.3)


def draw_requests(rng: random.Random) -> tuple[int, list[list[int]], list[SamplingParams]]:
    """(page size, prompts, params): prompts cut from one random prefix at and around page
    boundaries, with random tails, some repeated; the first request is long, at a low
    temperature and with many samples, so merging and (in a small pool) preemption happen."""
    ps = rng.choice([2, 3, 4, 5, 8])
    base = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(ps + 1, 4 * ps + 3))]
    prompts, params = [], []
    for i in range(rng.randrange(2, 5)):
        if i and rng.random() < 0.2:
            prompt = list(rng.choice(prompts))
        else:
            cut = rng.choice([0, ps - 1, ps, ps + 1, 2 * ps, 2 * ps + 1, len(base),
                              rng.randrange(0, len(base) + 1)])
            tail = rng.choice([0, 0, 1, 2, ps, rng.randrange(0, 2 * ps)])
            prompt = base[:cut] + [rng.randrange(3, VOCAB) for _ in range(tail)]
            prompt = prompt or [rng.randrange(3, VOCAB)]
        prompts.append(prompt)
        params.append(_draw_params(rng, long=i == 0))
    if max(len(p) for p in prompts) <= ps:  # a prefix to cache: at least one whole page
        prompts[0] = base[:ps + 1]
    return ps, prompts, params


def _smallest_pool_pages(prompts, params, ps: int) -> int:
    """The smallest pool validation accepts for these requests: one sample of the widest
    request at max_tokens beside its prompt, plus its partial tail page while the samples
    copy it. Anything the scheduler admits must run in it."""
    return max(-(-(len(p) + q.max_tokens - 1) // ps) + (len(p) % ps != 0)
               for p, q in zip(prompts, params))


# -- configurations ----------------------------------------------------------------------
def configurations(rng: random.Random, ps: int, prompts, params) -> list[tuple[str, dict]]:
    """(name, options) of the stressed configurations of one case. Options are Engine
    keyword arguments plus the harness's own: page_size, cache_impl, mode."""
    backends = _backends()
    other_ps = rng.choice([p for p in (1, 2, 3, 4, 5, 8, 16) if p != ps])
    tiny = _smallest_pool_pages(prompts, params, ps)
    # a warm cache must survive the first call: room for every prompt's pages besides
    warm_pool = tiny + sum(-(-len(p) // ps) for p in prompts)
    return [
        ("preempt", dict(max_kv_tokens=(tiny + rng.randrange(0, 3)) * ps, reserve_ratio=0.0)),
        ("python_cache_small_pool", dict(max_kv_tokens=warm_pool * ps, cache_impl="python",
                                         reserve_ratio=rng.choice([0.0, 0.3, 0.7]),
                                         mode="warm")),
        ("small_batch", dict(max_batch_size=rng.randrange(1, 5),
                             max_prefill_tokens=rng.randrange(1, 3 * ps))),
        ("page_size", dict(page_size=other_ps, cascade_decode=rng.random() < 0.5)),
        ("paged_decode", dict(cascade_decode=False)),
        ("no_merging", dict(merge_identical_samples=False)),
        *[(f"backend_{b}", dict(attention_backend=b)) for b in backends],
        ("prefix_cached", dict(mode="warm")),
        ("cache_flushed", dict(mode="flush")),
        ("after_bad_request", dict(mode="bad")),
        ("one_call_each", dict(mode="split")),
        ("greedy_reordered", dict(mode="reorder")),
        ("combined", dict(max_kv_tokens=warm_pool * ps,
                          reserve_ratio=0.0, max_batch_size=rng.randrange(2, 9),
                          cascade_decode=rng.random() < 0.5,
                          merge_identical_samples=rng.random() < 0.7,
                          attention_backend=rng.choice(backends), mode="warm")),
    ]


def run(path, ps, prompts, params, monkeypatch, page_size=None, cache_impl=None,
        mode=None, **options):
    """Builds an engine, generates (the way `mode` says) and checks page accounting.
    Returns (engine, outputs in the request order of `prompts`)."""
    ps = page_size or ps
    with monkeypatch.context() as m:
        if cache_impl:
            m.setenv("BRORL_CACHE_IMPL", cache_impl)
        engine = Engine(path, page_size=ps, debug_integrity=True,
                        **{"max_kv_tokens": BIG_POOL, **options})
    if cache_impl:
        assert engine.stats()["cache_impl"] == cache_impl
    if mode == "warm":  # the prompts' pages are cached by an earlier call
        engine.generate(prompts, [SamplingParams(n=2, max_tokens=min(3, q.max_tokens), seed=1)
                                  for q in params])
        assert engine.stats()["cached_pages"] > 0
    if mode == "flush":  # cached, then flushed by a weight update (the same weights)
        engine.generate(prompts[::-1], params[::-1])
        engine.update_weights({})
    if mode == "bad":
        with pytest.raises(ValueError, match="outside the vocabulary"):
            engine.generate([*prompts, [5, VOCAB]], [*params, params[0]])
    if mode == "split":  # request i alone in a call, still at index i (the noise key)
        filler = SamplingParams(n=1, max_tokens=1, seed=0)
        outs = [engine.generate([[3 + j] for j in range(i)] + [p], [filler] * i + [q])[i]
                for i, (p, q) in enumerate(zip(prompts, params))]
    elif mode == "reorder":  # indices change, so only greedy samples must stay the same
        outs = engine.generate(prompts[::-1], params[::-1])[::-1]
    else:
        outs = engine.generate(prompts, params)
    engine.check_integrity()
    s = engine.stats()
    assert s["free_pages"] + s["cached_pages"] == s["num_pages"], "a page leaked"
    return engine, outs


# -- checks ------------------------------------------------------------------------------
def assert_same(ref, outs, params, name: str, greedy_only: bool = False) -> None:
    for i, (a, b, q) in enumerate(zip(ref, outs, params, strict=True)):
        if greedy_only and not q.greedy:
            continue
        for j, (ca, cb) in enumerate(zip(a.outputs, b.outputs, strict=True)):
            where = f"{name}: request {i} sample {j}"
            assert cb.token_ids == ca.token_ids, where
            assert cb.finish_reason == ca.finish_reason, where
            diff = max((abs(x - y) for x, y in zip(ca.logprobs, cb.logprobs, strict=True)),
                       default=0.0)
            assert diff <= LOGPROB_ATOL, f"{where}: logprobs differ by {diff}"


def assert_stop_rules(prompts, params, outs) -> None:
    """The prompt echoed; n samples; at most max_tokens; a stop token only last, never
    before min_tokens; "length" exactly at max_tokens."""
    for p, q, o in zip(prompts, params, outs, strict=True):
        assert o.prompt_token_ids == p
        stop = set(q.stop_token_ids or ()) | (set() if q.ignore_eos else {EOS})
        assert [c.index for c in o.outputs] == list(range(q.n))
        for c in o.outputs:
            t = c.token_ids
            assert 1 <= len(t) <= q.max_tokens and len(c.logprobs) == len(t)
            assert not set(t[:-1]) & stop, (t, stop)
            if c.finish_reason == "stop":
                assert t[-1] in stop and len(t) >= q.min_tokens, (t, q)
            else:
                assert c.finish_reason == "length" and len(t) == q.max_tokens, (t, q)


def assert_matches_model(model, prompts, params, outs) -> None:
    """Against the transformers model: each token's behaviour logprob, greedy tokens are
    the argmax, sampled tokens survive top-k, top-p and min-p (with the min_tokens ban)."""
    for p, q, o in zip(prompts, params, outs, strict=True):
        stop = sorted(set(q.stop_token_ids or ()) | (set() if q.ignore_eos else {EOS}))
        T = q.temperature if q.temperature > 0 else 1.0
        for tokens, c in {tuple(c.token_ids): c for c in o.outputs}.items():
            with torch.no_grad():
                logits = model(torch.tensor([p + list(tokens)])).logits[0, len(p) - 1:-1]
            z = logits.double() / T
            want = torch.log_softmax(z, -1).gather(1, torch.tensor(tokens)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), want,
                                       atol=LOGPROB_ATOL * max(1.0, 1.0 / T), rtol=0)
            eps = 1e-4 / T  # logit rounding, scaled like z
            for k, tok in enumerate(tokens):
                zk = z[k].clone()
                if k < q.min_tokens and stop:
                    zk[stop] = -math.inf
                assert zk[tok] > -math.inf, "a banned token was drawn"
                if q.greedy:
                    top2 = zk.topk(2).values
                    assert tok == int(zk.argmax()) or top2[0] - top2[1] < eps
                    continue
                if q.top_k > 0:
                    assert zk[tok] >= zk.topk(q.top_k).values[-1] - eps, "outside top-k"
                    zk = torch.where(zk >= zk.topk(q.top_k).values[-1], zk, -math.inf)
                if q.top_p < 1.0:
                    prob = torch.softmax(zk, -1)
                    assert prob[zk > zk[tok] + eps].sum() < q.top_p + 1e-6, "outside top-p"
                if q.min_p > 0:
                    assert zk[tok] >= zk.max() + math.log(q.min_p) - eps, "below min-p"


# -- the fuzz test -----------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_random_request_mixes_give_the_same_samples_in_every_configuration(
        qwen2, monkeypatch, seed):
    path, model = qwen2
    rng = random.Random(seed)
    ps, prompts, params = draw_requests(rng)
    ref_engine, ref = run(path, ps, prompts, params, monkeypatch)
    assert_stop_rules(prompts, params, ref)
    assert_matches_model(model, prompts, params, ref)
    s = ref_engine.stats()
    assert s["decode_rows"] < s["decode_tokens"], "no samples were merged"
    for name, options in configurations(rng, ps, prompts, params):
        engine, outs = run(path, ps, prompts, params, monkeypatch, **options)
        assert_stop_rules(prompts, params, outs)
        assert_same(ref, outs, params, name, greedy_only=options.get("mode") == "reorder")
        s = engine.stats()
        if name == "preempt":
            assert s["preemptions"] > 0, f"{name}: the small pool preempted nothing"
        if options.get("mode") == "warm":
            assert s["cached_prompt_tokens"] > 0, f"{name}: no prefix was reused"
        engine.update_weights({})  # flushes the cache: every page is free again
        assert engine.stats()["free_pages"] == engine.stats()["num_pages"]


# -- repros of bugs found by the fuzzing -----------------------------------------------------
def _greedy(max_tokens: int, n: int = 1) -> SamplingParams:
    return SamplingParams(n=n, temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def test_a_short_request_admitted_beside_a_long_one_waits_instead_of_stalling(qwen2):
    """5 pages of 4 tokens. Alone, the long request fits exactly (1 pinned prompt page + 4
    private pages); admitted together with the short one (1 more pinned page) it can never
    get its 4 private pages. Reversing the two requests, or running them in two calls,
    works (the short one runs first)."""
    path, _ = qwen2
    engine = Engine(path, page_size=4, max_kv_tokens=20, debug_integrity=True)
    alone = engine.generate([[24]], _greedy(13))[0].outputs[0].token_ids
    outs = engine.generate([[24], [18]], [_greedy(13), _greedy(1)])
    assert outs[0].outputs[0].token_ids == alone
    assert len(outs[1].outputs[0].token_ids) == 1


@pytest.mark.parametrize("prompt,page_size,max_kv_tokens,max_tokens", [
    ([24], 4, 4, 4),  # a partial prompt page: tail page + its copy need 2 pages
    ([17, 100], 2, 2, 1),  # a whole prompt page and one output token (no KV for it)
])
def test_a_request_that_passes_validation_runs(
        qwen2, prompt, page_size, max_kv_tokens, max_tokens):
    """A request either runs or raises ValueError; it never stalls the scheduler."""
    path, _ = qwen2
    engine = Engine(path, page_size=page_size, max_kv_tokens=max_kv_tokens,
                    debug_integrity=True)
    try:
        out = engine.generate([prompt], _greedy(max_tokens))
    except ValueError:
        return  # rejecting the request up front is a valid fix
    assert len(out[0].outputs[0].token_ids) == max_tokens


def test_nan_temperature_is_refused():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=float("nan"))
