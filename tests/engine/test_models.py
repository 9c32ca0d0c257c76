"""Greedy tokens and logprobs of our model code equal transformers' on tiny random
checkpoints loaded through the real loading path."""

import pytest
import torch

from brorl.engine import Engine, SamplingParams
from tests.helpers import FAMILIES, make_checkpoint

PAGE = 8
MAX_NEW = 12


def hf_greedy(model, prompt: list[int], max_new: int) -> tuple[list[int], torch.Tensor]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                         output_logits=True, return_dict_in_generate=True,
                         eos_token_id=None, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = torch.stack([torch.log_softmax(lg[0].float(), -1)[t]
                            for lg, t in zip(out.logits, tokens)])
    return tokens, logprobs


def assert_matches_hf(engine, model, prompts):
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = engine.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        tokens, logprobs = hf_greedy(model, prompt, MAX_NEW)
        got = out.outputs[0]
        assert got.token_ids == tokens, f"prompt of length {len(prompt)}"
        assert torch.allclose(torch.tensor(got.logprobs), logprobs, atol=1e-4, rtol=0)
        assert got.finish_reason == "length"
    return outs


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_and_logprobs_match_transformers_at_page_edges(checkpoints, family):
    path, model = checkpoints[family]
    engine = Engine(path, page_size=PAGE, max_kv_tokens=4096, debug_integrity=True)
    g = torch.Generator().manual_seed(1)
    lengths = [1, PAGE - 1, PAGE, PAGE + 1, 3 * PAGE + 5]
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]
    assert_matches_hf(engine, model, prompts)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_with_a_cached_prefix(checkpoints, family):
    path, model = checkpoints[family]
    engine = Engine(path, page_size=PAGE, max_kv_tokens=4096, debug_integrity=True)
    g = torch.Generator().manual_seed(2)
    base = torch.randint(3, 128, (4 * PAGE + 3,), generator=g).tolist()
    assert_matches_hf(engine, model, [base])
    # Prompts that extend the cached one: at, before and after page boundaries.
    prompts = [base[:2 * PAGE], base[:2 * PAGE + 1], base + [5, 6, 7], base[:3 * PAGE] + [9]]
    before = engine.stats()["cached_prompt_tokens"]
    outs = assert_matches_hf(engine, model, prompts)
    assert [o.num_cached_tokens for o in outs] == [PAGE, 2 * PAGE, 4 * PAGE, 3 * PAGE]
    assert engine.stats()["cached_prompt_tokens"] - before == 10 * PAGE


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
])
def test_rope_scaling_matches_transformers(tmp_path, rope):
    model = make_checkpoint(tmp_path, "llama", rope_parameters={"rope_theta": 5000.0, **rope})
    engine = Engine(str(tmp_path), page_size=PAGE, max_kv_tokens=2048)
    g = torch.Generator().manual_seed(3)
    assert_matches_hf(engine, model, [torch.randint(3, 128, (70,), generator=g).tolist()])


def test_tied_embeddings_and_no_qkv_bias_variants(tmp_path):
    model = make_checkpoint(tmp_path, "llama", tie_word_embeddings=True, attention_bias=True,
                            mlp_bias=True)
    engine = Engine(str(tmp_path), page_size=PAGE, max_kv_tokens=2048)
    assert_matches_hf(engine, model, [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])


def test_bfloat16_engine_tracks_float32_logprobs(qwen2):
    path, model = qwen2
    engine = Engine(path, dtype="bfloat16", page_size=PAGE, max_kv_tokens=2048)
    out = engine.generate([[5, 6, 7, 8, 9]], SamplingParams(temperature=0, max_tokens=4,
                                                            ignore_eos=True))[0].outputs[0]
    _, logprobs = hf_greedy(model, [5, 6, 7, 8, 9], 1)
    assert abs(out.logprobs[0] - logprobs[0].item()) < 0.05


def _edit_config(path, edit) -> None:
    import json

    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    edit(cfg)
    cfg_file.write_text(json.dumps(cfg))


@pytest.mark.parametrize("case", ["llama3 without its original length", "yarn without factor"])
def test_rope_parameters_an_older_config_leaves_out_match_transformers(tmp_path, case):
    """transformers fills them from max_position_embeddings (512 here): llama3's original
    length (the engine took 8192: logprobs 0.65 off, other greedy tokens) and yarn's factor
    (max / original; the engine raised a TypeError)."""
    from transformers import AutoModelForCausalLM

    rope = ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
            if case.startswith("llama3") else
            {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64})
    make_checkpoint(tmp_path, "llama", rope_parameters={"rope_theta": 5000.0, **rope})

    def drop(cfg):
        if case.startswith("llama3"):
            del cfg["rope_parameters"]["original_max_position_embeddings"]
        else:
            cfg["rope_parameters"]["factor"] = None

    _edit_config(tmp_path, drop)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    engine = Engine(str(tmp_path), page_size=PAGE, max_kv_tokens=2048)
    g = torch.Generator().manual_seed(4)
    assert_matches_hf(engine, model, [torch.randint(3, 128, (70,), generator=g).tolist()])


def test_qwen3_attention_bias_is_on_the_output_projection_too(tmp_path):
    model = make_checkpoint(tmp_path, "qwen3", attention_bias=True)
    assert model.model.layers[0].self_attn.o_proj.bias is not None  # transformers' layout
    engine = Engine(str(tmp_path), page_size=PAGE, max_kv_tokens=2048)
    assert_matches_hf(engine, model, [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])


@pytest.mark.parametrize("rope,match", [
    ({"rope_type": "longrope", "long_factor": [1.0], "short_factor": [1.0]},
     "unsupported rope scaling type 'longrope'"),
    ({"rope_type": "default", "partial_rotary_factor": 0.5},
     r"partial rotary embeddings \(partial_rotary_factor=0.5\) are not supported"),
])
def test_rope_settings_we_do_not_run_are_refused_by_name(tmp_path, rope, match):
    make_checkpoint(tmp_path, "llama")
    _edit_config(tmp_path, lambda cfg: cfg.update(rope_parameters={"rope_theta": 1e4, **rope}))
    with pytest.raises(ValueError, match=match):
        Engine(str(tmp_path), page_size=PAGE, max_kv_tokens=2048)
