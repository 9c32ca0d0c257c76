"""The engine with the Triton attention backend (under the interpreter on CPU) gives the
same greedy tokens as with the torch reference backend."""

import pytest

from engine import Engine, SamplingParams

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
