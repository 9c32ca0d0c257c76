"""The engine with the Triton attention backend (under the interpreter on CPU) gives the
same greedy tokens as with the torch reference backend."""

import pytest

from brorl.engine import Engine, SamplingParams

pytest.importorskip("triton")


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("cascade", [True, False])
def test_triton_backend_greedy_tokens_equal_the_torch_backend(qwen2, cascade, merge):
    path, _ = qwen2
    # two prompts (one with a partial last page), 3 samples each: cascade groups of size 3,
    # or with merging one row per prompt (its KV copied to the other two)
    prompts = [list(range(3, 14)), list(range(20, 28))]
    params = SamplingParams(n=3, max_tokens=4, temperature=0.0, ignore_eos=True)
    outs, logprobs = {}, {}
    for backend in ("torch", "triton"):
        engine = Engine(path, page_size=4, max_kv_tokens=512, attention_backend=backend,
                        cascade_decode=cascade, merge_identical_samples=merge)
        assert engine.backend.name == backend
        res = engine.generate(prompts, params)
        outs[backend] = [[c.token_ids for c in o.outputs] for o in res]
        logprobs[backend] = [lp for o in res for c in o.outputs for lp in c.logprobs]
    assert outs["triton"] == outs["torch"]
    assert all(len(t) == 4 for o in outs["triton"] for t in o)
    assert logprobs["triton"] == pytest.approx(logprobs["torch"], abs=1e-4)


def test_triton_sampler_in_the_engine_draws_the_torch_samplers_tokens(qwen2, monkeypatch):
    """The fused Triton sampler as the engine's sampler (under the interpreter) draws the
    same tokens as the reference sampler and reports the same behaviour logprobs, with
    temperature, top-k, top-p, min-p and a min_tokens ban, on identical logits (both
    engines use the torch attention backend; merging off so every row is sampled)."""
    import brorl.kernels.sampling_triton as st

    calls = []
    fused = st.sample_triton
    monkeypatch.setattr(st, "sample_triton", lambda *a: calls.append(1) or fused(*a))
    path, _ = qwen2
    prompts = [list(range(3, 14)), list(range(20, 28))]
    params = [SamplingParams(n=3, max_tokens=4, temperature=0.9, top_k=20, top_p=0.8,
                             seed=11, ignore_eos=True),
              SamplingParams(n=2, max_tokens=4, temperature=1.3, min_p=0.05, min_tokens=3,
                             stop_token_ids=[5, 6], seed=12)]
    outs = {}
    for impl in ("torch", "triton"):
        engine = Engine(path, page_size=4, max_kv_tokens=512, attention_backend="torch",
                        merge_identical_samples=False)
        engine.sampler.impl = impl
        res = [engine.generate([p], sp)[0] for p, sp in zip(prompts, params)]
        outs[impl] = [(c.token_ids, c.logprobs) for o in res for c in o.outputs]
    for (tok_ref, lp_ref), (tok, lp) in zip(outs["torch"], outs["triton"]):
        assert tok == tok_ref
        assert lp == pytest.approx(lp_ref, abs=1e-6)
    assert len({tuple(t) for t, _ in outs["triton"]}) > 1  # the draws are not all greedy
    assert len(calls) >= 6  # every decode step of the second engine ran the fused kernel


def test_triton_cascade_takes_group_padding_from_the_host(qwen2, monkeypatch):
    """Groups of 3 and 2 samples (one group row padded) and groups of equal size: each
    decode call gets `padded` from the runner's host lists, equal to what the device check
    finds, and the device check (a host sync per layer) never runs; tokens equal the torch
    backend's."""
    import brorl.engine.attention_triton as at
    import brorl.kernels.decode_attention_triton as dt

    seen, device_checks = [], []
    check, fused = dt._check_groups, dt.cascade_decode_triton

    def spy(q, kc, vc, gr, pp, pl, sp, sl, scale, padded=None):
        seen.append((padded, check(gr, pl, q.shape[0], pp.shape[1] * kc.shape[1],
                                   (sl, sp.shape[1] * kc.shape[1]))))
        return fused(q, kc, vc, gr, pp, pl, sp, sl, scale, padded=padded)

    monkeypatch.setattr(at, "cascade_decode_triton", spy)
    monkeypatch.setattr(dt, "_check_groups", lambda *a: device_checks.append(1) or check(*a))
    path, _ = qwen2
    prompts = [list(range(3, 14)), list(range(20, 28))]
    for ns in ((3, 2), (2, 2)):
        params = [SamplingParams(n=n, max_tokens=3, temperature=0.0, ignore_eos=True)
                  for n in ns]
        outs = {}
        for backend in ("torch", "triton"):
            engine = Engine(path, page_size=4, max_kv_tokens=512, attention_backend=backend,
                            merge_identical_samples=False)
            outs[backend] = [[c.token_ids for c in o.outputs]
                             for o in engine.generate(prompts, params)]
        assert outs["triton"] == outs["torch"]
    assert seen and all(given == found for given, found in seen)
    assert {given for given, _ in seen} == {True, False}
    assert device_checks == []
