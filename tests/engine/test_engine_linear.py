"""The engine with oneDNN prepacked dense layers (the CPU default) gives the torch
F.linear engine's tokens and logprobs, and an update_weights repacks what it changed."""

import pytest
import torch

from brorl.engine import Engine, SamplingParams
from brorl.kernels.linear import onednn_available
from tests.helpers import make_checkpoint

pytestmark = pytest.mark.skipif(not onednn_available(), reason="torch has no oneDNN")

PAGE = 4
PROMPTS = [list(range(3, 3 + 4 * PAGE + 2)), list(range(40, 47))]


def engine(path, linear, dtype="float32"):
    return Engine(path, page_size=PAGE, max_kv_tokens=4096, linear_backend=linear,
                  dtype=dtype)


def completions(eng, temperature):
    params = SamplingParams(n=4, max_tokens=10, seed=3, temperature=temperature,
                            ignore_eos=True)
    return [c for o in eng.generate(PROMPTS, params) for c in o.outputs]


def assert_same(got, ref, tol=1e-4):
    assert [c.token_ids for c in got] == [c.token_ids for c in ref]
    for a, b in zip(got, ref):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < tol


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_onednn_engine_matches_torch_linear_engine(qwen2, temperature):
    path, _ = qwen2
    fast, ref = engine(path, "onednn"), engine(path, "torch")
    assert fast.stats()["linear_backend"] == "onednn"
    assert ref.stats()["linear_backend"] == "torch"
    assert_same(completions(fast, temperature), completions(ref, temperature))


def test_auto_is_onednn_on_cpu(qwen2):
    assert engine(qwen2[0], "auto").stats()["linear_backend"] == "onednn"


@pytest.mark.parametrize("tied", [True, False])
def test_a_partial_update_repacks_the_changed_weights(tmp_path, tied):
    # with tied embeddings, updating only the embedding must refresh the LM head's packed
    # copy too
    path = tmp_path / "old"
    make_checkpoint(path, "qwen2", seed=0, tie_word_embeddings=tied)
    new = make_checkpoint(tmp_path / "new", "qwen2", seed=5,
                          tie_word_embeddings=tied).state_dict()
    part = {k: v for k, v in new.items()
            if k in ("model.embed_tokens.weight", "lm_head.weight")
            or k.startswith("model.layers.0.mlp.")}
    fast, ref = engine(str(path), "onednn"), engine(str(path), "torch")
    before = completions(fast, 0.0)
    fast.update_weights(part)
    ref.update_weights(part)
    after = completions(fast, 0.0)
    assert_same(after, completions(ref, 0.0))
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    if tied:  # the LM head alone, through the embedding's name
        fast.update_weights({"model.embed_tokens.weight": torch.zeros_like(
            new["model.embed_tokens.weight"])})
        logprobs = completions(fast, 1.0)[0].logprobs  # all-zero logits: uniform
        assert max(abs(lp + torch.log(torch.tensor(128.0)).item()) for lp in logprobs) < 1e-5


@pytest.mark.skipif(not onednn_available(torch.bfloat16),
                    reason="oneDNN has no bfloat16 path on this CPU")
def test_onednn_engine_runs_bfloat16(qwen2):
    got = completions(engine(qwen2[0], "onednn", "bfloat16"), 1.0)
    assert len(got) == 8 and all(len(c.token_ids) == 10 for c in got)
    assert all(lp <= 0.0 for c in got for lp in c.logprobs)


def test_a_bfloat16_engine_runs_on_every_cpu_with_auto(qwen2):
    """'auto' picks oneDNN for bfloat16 only where its bf16 path works (an AVX2-only CPU
    crashed in the weights' packing); either way the samples are bfloat16's."""
    eng = engine(qwen2[0], "auto", "bfloat16")
    expected = "onednn" if onednn_available(torch.bfloat16) else "torch"
    assert eng.stats()["linear_backend"] == expected
    got = completions(eng, 1.0)
    assert len(got) == 8 and all(lp <= 0.0 for c in got for lp in c.logprobs)


def test_bad_linear_backend_is_a_clear_error(qwen2):
    with pytest.raises(ValueError, match="unknown linear_backend 'mkl'"):
        engine(qwen2[0], "mkl")
    with pytest.raises(ValueError, match="needs a CPU device"):
        engine(qwen2[0], "onednn", "float16")
    assert torch.isfinite(torch.tensor(completions(engine(qwen2[0], "auto"), 1.0)[0]
                                       .logprobs)).all()
