"""The README's Engine API example runs as written (with a tiny checkpoint in place of its
path and smaller n / max_tokens), and what its comments name exists."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def _engine_api_block() -> str:
    text = README.read_text()
    section = text.split("## Engine API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's Engine API section has no python block"
    return match.group(1)


def _word_tokenizer(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "What", "is", "2", "+", "3?"]
    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(128 - len(words))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(path)


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    from tests.helpers import make_checkpoint

    path = tmp_path_factory.mktemp("readme")
    model = make_checkpoint(path, "qwen2")
    _word_tokenizer(path)
    code = _engine_api_block()
    edits = [('"path/to/hf_checkpoint_dir"', repr(str(path))), ("n=512", "n=16"),
             ("max_tokens=128", "max_tokens=8")]
    for old, new in edits:
        assert code.count(old) == 1, f"the README example no longer has {old}"
        code = code.replace(old, new)
    # `model` in the example is the trainer's policy: here the checkpoint's own model
    env = {"model": model}
    exec(compile(code, str(README), "exec"), env)
    return code, env


def test_the_readme_engine_example_runs_and_gives_what_it_says(readme_run):
    code, env = readme_run
    outs, sample = env["outs"], env["sample"]
    assert len(outs) == 1 and len(outs[0].outputs) == 16
    assert outs[0].prompt_token_ids == [3, 4, 5, 6, 7]  # "What is 2 + 3?"
    assert 1 <= len(sample.token_ids) == len(sample.logprobs) <= 8
    assert sample.finish_reason in ("stop", "length")
    assert all(lp <= 0 for lp in sample.logprobs)
    stats = env["eng"].stats()
    # the keys the example's comment names (and the design's engine contract: at least
    # these five)
    comment = code.split("eng.stats()", 1)[1].split("eng.update_weights", 1)[0]
    named = re.findall(r"[a-z_]+", comment)
    assert {"prefill_tokens", "cached_prompt_tokens", "decode_tokens", "preemptions",
            "policy_version"} <= set(named) <= set(stats)
    assert stats["policy_version"] == 1  # bumped by the example's update_weights
    assert stats["decode_tokens"] >= 16


def test_the_readme_update_weights_line_refuses_a_bad_tensor_before_applying_any(readme_run):
    import torch

    from brorl.engine import SamplingParams

    eng, model = readme_run[1]["eng"], readme_run[1]["model"]
    named = dict(model.named_parameters())
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    before = eng.generate([[3, 4]], greedy)[0].outputs[0].token_ids
    bad = {n: torch.zeros_like(t) for n, t in named.items()}
    bad["model.norm.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="model.norm.weight.*shape"):
        eng.update_weights(bad.items())
    assert eng.generate([[3, 4]], greedy)[0].outputs[0].token_ids == before
    assert eng.stats()["policy_version"] == 1
