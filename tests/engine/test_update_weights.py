import pytest
import torch

from brorl.engine import Engine, SamplingParams
from tests.engine.test_models import hf_greedy
from tests.helpers import make_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPT = list(range(3, 23))


def snapshot(engine):
    return {k: v.clone() for k, v in engine.model.params.items()}


@pytest.mark.parametrize("corrupt,match", [
    (lambda sd: sd.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(1)}),
     "unknown parameter name"),
    (lambda sd: sd.update({"model.norm.weight": torch.zeros(3)}), "has shape"),
    (lambda sd: sd.update({"model.norm.weight": torch.zeros(64, dtype=torch.int32)}),
     "floating-point"),
])
def test_a_bad_update_raises_and_changes_nothing(tmp_path, qwen2, corrupt, match):
    path, _ = qwen2
    engine = Engine(path, page_size=4, max_kv_tokens=4096)
    before_out = engine.generate(PROMPT, GREEDY)[0].outputs[0].token_ids
    before = snapshot(engine)
    new_sd = make_checkpoint(tmp_path, "qwen2", seed=1).state_dict()
    items = list(new_sd.items())
    bad = dict(items)
    corrupt(bad)
    # the bad tensor comes last, after many valid ones that must not be applied either
    with pytest.raises(ValueError, match=match):
        engine.update_weights(bad)
    assert all(torch.equal(before[k], v) for k, v in engine.model.params.items())
    assert engine.stats()["policy_version"] == 0
    assert engine.stats()["cached_pages"] > 0  # not flushed either
    assert engine.generate(PROMPT, GREEDY)[0].outputs[0].token_ids == before_out


def test_duplicate_names_are_refused(qwen2):
    engine = Engine(qwen2[0], page_size=4, max_kv_tokens=4096)
    t = engine.model.params["norm"].clone()
    with pytest.raises(ValueError, match="given twice"):
        engine.update_weights([("model.norm.weight", t), ("model.norm.weight", t)])


def test_an_update_matches_the_new_model_flushes_the_cache_and_bumps_the_version(
        tmp_path, qwen2):
    path, old_model = qwen2
    engine = Engine(path, page_size=4, max_kv_tokens=4096)
    engine.generate(PROMPT, GREEDY)
    assert engine.stats()["cached_pages"] > 0
    new_model = make_checkpoint(tmp_path, "qwen2", seed=1)
    engine.update_weights(new_model.named_parameters())
    s = engine.stats()
    assert s["policy_version"] == 1 and s["cached_pages"] == 0
    assert s["free_pages"] == s["num_pages"]
    out = engine.generate(PROMPT, GREEDY)[0]
    assert out.num_cached_tokens == 0  # stale KV was not reused
    tokens, _ = hf_greedy(new_model, PROMPT, 8)
    assert out.outputs[0].token_ids == tokens
    assert tokens != hf_greedy(old_model, PROMPT, 8)[0]
    engine.update_weights({}, version=7)
    assert engine.stats()["policy_version"] == 7


def test_partial_update_and_tied_lm_head_alias(tmp_path):
    model = make_checkpoint(tmp_path, "qwen2", tie_word_embeddings=True)
    engine = Engine(str(tmp_path), page_size=4, max_kv_tokens=4096)
    sd = model.state_dict()
    assert "lm_head.weight" in sd  # state_dict carries the alias of a tied embedding
    new_embed = sd["model.embed_tokens.weight"] * 2
    engine.update_weights({"model.embed_tokens.weight": new_embed, "lm_head.weight": new_embed})
    assert torch.equal(engine.model.params["lm_head"], new_embed)
    assert torch.equal(engine.model.params["norm"], sd["model.norm.weight"])
