"""The demo policy: worked solutions, an exact tokenizer, and a cached HF checkpoint that
the engine and transformers both load."""

import pytest
import torch

from brorl.trainer.config import DemoConfig
from brorl.trainer.demo import (
    build_tokenizer,
    demo_policy,
    task_problems,
    warm_start_targets,
    worked_operations,
    worked_solution,
)


def test_worked_solution_is_left_to_right_and_tagged():
    assert worked_solution("4 - 1") == " 4 - 1 = 3 <answer>3</answer>"
    assert worked_solution("12 + 7 - 25") == " 12 + 7 = 19 , 19 - 25 = -6 <answer>-6</answer>"
    with pytest.raises(ValueError, match="not a chain_sum expression"):
        worked_solution("4 -")


def test_worked_solution_cut_short_answers_the_running_total():
    assert worked_solution("12 + 7 - 25", 1) == " 12 + 7 = 19 <answer>19</answer>"
    assert worked_solution("1 + 2 + 3 - 4", 2) == " 1 + 2 = 3 , 3 + 3 = 6 <answer>6</answer>"
    assert worked_solution("4 - 1", 5) == worked_solution("4 - 1")  # nothing left to cut
    with pytest.raises(ValueError, match="clauses_written must be at least 1"):
        worked_solution("4 - 1", 0)
    with pytest.raises(ValueError, match="unknown operator"):  # also past the cut
        worked_solution("4 - 1 * 3", 1)


def test_worked_operations_counts_the_clauses_of_a_response():
    assert worked_operations(worked_solution("12 + 7 - 25")) == 2
    assert worked_operations(worked_solution("12 + 7 - 25", 1)) == 1
    assert worked_operations(" -3 + 4 = 1 , 1 - 9 = -8 <answer>-8</answer>") == 2
    assert worked_operations(" <answer>19</answer>") == 0
    assert worked_operations(" 12 + 7 = <answer>19</answer>") == 0  # no result: not worked


def test_warm_start_targets_cut_the_configured_fraction_by_seed():
    exprs = [f"{i % 10} + {i % 7} - {i % 3}" for i in range(2000)]
    cfg = DemoConfig(sft_cut_short=0.65)
    targets = warm_start_targets(exprs, cfg)
    cut = [t.count(" = ") == 1 for t in targets]
    assert abs(sum(cut) / len(cut) - 0.65) < 0.04
    for e, t, c in zip(exprs, targets, cut):
        assert t == worked_solution(e, 1 if c else None)
    assert warm_start_targets(exprs, cfg) == targets  # deterministic by seed
    assert warm_start_targets(exprs, DemoConfig(sft_cut_short=0.65, seed=5)) != targets
    assert warm_start_targets(exprs, DemoConfig(sft_cut_short=0.0)) == [
        worked_solution(e) for e in exprs]
    always = warm_start_targets(exprs, DemoConfig(sft_cut_short=1.0))
    assert all(t.count(" = ") == 1 for t in always)
    with pytest.raises(ValueError, match="demo.sft_cut_short"):
        DemoConfig(sft_cut_short=1.5)


def test_worked_solutions_match_reasoning_gym_answers():
    cfg = DemoConfig(task_kwargs={"min_terms": 2, "max_terms": 4, "min_digits": 1,
                                  "max_digits": 3})
    for entry in task_problems(cfg, 50, seed=7):
        solution = worked_solution(entry["metadata"]["expression"])
        assert solution.endswith(f"<answer>{entry['answer']}</answer>")


def test_tokenizer_round_trips_exactly_with_single_digit_tokens():
    texts = ["State the answer: 12 + 7 =", " 12 + 7 = 19 <answer>19</answer>"]
    tok = build_tokenizer(texts)
    for t in texts + [" 12 + 7 , -3 (x) the answer"]:  # known words, new arrangement
        ids = tok(t)["input_ids"]
        assert tok.decode(ids) == t
    assert len(tok(" 123")["input_ids"]) == 3  # ' 1', '2', '3'
    assert tok.convert_tokens_to_ids(" <answer>") != tok.unk_token_id  # one token


def test_demo_policy_is_cached_and_loads_through_engine_and_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from brorl.engine import Engine, SamplingParams

    cfg = DemoConfig(sft_steps=2, sft_examples=64, sft_batch_size=8, hidden_size=32,
                     intermediate_size=64, num_layers=1, cache_dir=str(tmp_path))
    path = demo_policy(cfg, progress=False)
    assert demo_policy(cfg, progress=False) == path  # second call: the cache
    assert len(list(tmp_path.iterdir())) == 1
    engine = Engine(path)
    out = engine.generate("State the final answer to the following arithmetic problem: 1 + 2 =",
                          SamplingParams(n=2, temperature=0, max_tokens=4))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([out[0].prompt_token_ids])
    greedy = hf.generate(ids, max_new_tokens=4, do_sample=False,
                         eos_token_id=engine.tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
    assert out[0].outputs[0].token_ids == greedy[:len(out[0].outputs[0].token_ids)]
