import json
import time
from pathlib import Path

import pytest

from brorl.trainer.verifiers import (
    VerifierPool,
    VerifyItem,
    VerifyResult,
    extract_answer,
    get_verifier,
    load_user_verifier,
    register_verifier,
    verify_one,
)
from brorl.trainer.verifiers.gym import extract_gym_answer

USER = "tests.trainer.user_verifier_example"


def math_item(response: str, gold: str) -> VerifyItem:
    return VerifyItem(response, gold, "math")


@pytest.mark.parametrize("text, expected", [
    ("reasoning... <answer> 42 </answer>", "42"),
    ("<answer>1</answer> then <answer>2</answer>", "2"),
    ("<answer>\n\\frac{1}{2}\n</answer> and \\boxed{7}", "\\frac{1}{2}"),
    ("so \\boxed{3} or rather \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("the last one is unbalanced \\boxed{5} \\boxed{6", "5"),
    ("no answer here", None),
    ("<answer>  </answer>", None),
    ("<answer>unclosed", None),
    # an earlier unclosed tag is not part of the answer
    ("I'll write <answer> tags. <answer>42</answer>", "42"),
    ("<ANSWER>draft <Answer> 7 </answer>", "7"),
])
def test_extract_answer_takes_last_tag_then_last_balanced_boxed(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("gold, predicted", [
    ("1/2", "0.5"),
    ("0.5", "\\frac{1}{2}"),
    ("\\frac{1}{2}", "1/2"),
    ("$\\frac{1}{2}$", "\\dfrac12"),
    ("2x+1", "1+2x"),
    ("\\boxed{2x+1}", "x*2 + 1"),
    ("\\frac{\\sqrt{2}}{2}", "1/\\sqrt{2}"),
    ("3", "x = 3"),
    ("-4", "-4.0"),
])
def test_math_equivalent_forms_score_one(gold, predicted):
    assert get_verifier("math")(math_item(f"so <answer>{predicted}</answer>", gold)) == 1.0
    assert get_verifier("math")(math_item(f"thus \\boxed{{{predicted}}}.", gold)) == 1.0


@pytest.mark.parametrize("gold, predicted", [
    ("1/2", "0.6"), ("2x+1", "2x-1"), ("3", "4"), ("\\frac{1}{2}", "2"), ("7", "x"),
])
def test_math_wrong_answers_score_zero(gold, predicted):
    assert get_verifier("math")(math_item(f"<answer>{predicted}</answer>", gold)) == 0.0


def test_math_response_without_answer_scores_zero():
    assert get_verifier("math")(math_item("I think it is 5", "5")) == 0.0
    assert get_verifier("math")(math_item("<answer></answer>", "5")) == 0.0


def test_math_needs_a_gold_answer():
    with pytest.raises(ValueError, match="gold answer"):
        get_verifier("math")(VerifyItem("<answer>1</answer>", None, "math"))


@pytest.fixture(scope="module")
def chain_sum():
    import reasoning_gym

    ds = reasoning_gym.create_dataset("chain_sum", size=3, seed=1)
    # through JSON: a scorer must also take entries whose tuples became lists
    return [json.loads(json.dumps(ds[i])) for i in range(3)]


def test_reasoning_gym_scores_with_the_dataset_scorer(chain_sum):
    verify = get_verifier("reasoning_gym")
    for entry in chain_sum:
        meta = {"dataset": "chain_sum", "entry": entry}
        right = VerifyItem(f"thinking\n<answer>{entry['answer']}</answer>", None,
                           "reasoning_gym", meta)
        wrong = VerifyItem(f"<answer>{int(entry['answer']) + 1}</answer>", None,
                           "reasoning_gym", meta)
        last_line = VerifyItem(f"let me add\n{entry['answer']}\n", None, "reasoning_gym", meta)
        assert verify(right) == 1.0
        assert verify(wrong) == 0.0
        assert verify(last_line) == 1.0
        assert verify(VerifyItem("", None, "reasoning_gym", meta)) == 0.0


def test_reasoning_gym_needs_dataset_and_entry():
    with pytest.raises(ValueError, match="dataset"):
        get_verifier("reasoning_gym")(VerifyItem("<answer>1</answer>", "1", "reasoning_gym"))


def test_reasoning_gym_scores_the_gold_answer_of_tuple_entries_one():
    """arc_agi's scorer compares its parsed board, a tuple of tuples, with the entry's:
    the entry must reach it as the dataset made it (as lists, the gold answer got 0.05)."""
    from brorl.trainer.data import gym_problems
    from brorl.trainer.verifiers.gym import extract_gym_answer

    verify = get_verifier("reasoning_gym")
    for p in gym_problems("arc_agi", 2, 0, {}, "auto"):
        assert isinstance(p.metadata["entry"]["metadata"]["output"], tuple)
        assert verify(VerifyItem(f"<answer>{p.answer}</answer>", p.answer, p.verifier,
                                 p.metadata)) == 1.0
    from reasoning_gym.utils import extract_answer as upstream

    for text in ("a stray <answer> here. <answer>5</answer>", "<answer>1</answer> <answer>2",
                 "x <answer> 7 </answer>"):  # tags read as reasoning-gym reads them
        assert extract_gym_answer(text) == upstream(text)


def test_gym_answer_falls_back_to_the_last_nonempty_line():
    assert extract_gym_answer("a\n b \n\n") == "b"
    assert extract_gym_answer("x <answer> 4 </answer>\ny") == "4"
    assert extract_gym_answer("  \n") is None


def test_user_verifier_by_module_function():
    verify = get_verifier(f"{USER}:exact_match")
    assert verify is load_user_verifier(f"{USER}:exact_match")
    assert verify(VerifyItem(" yes ", "yes", f"{USER}:exact_match")) == 1.0
    assert verify(VerifyItem("no", "yes", f"{USER}:exact_match")) == 0.0


@pytest.mark.parametrize("spec", [
    "no_such_module_xyz:fn", f"{USER}:missing", f"{USER}:", ":fn", "a:b:c",
])
def test_bad_user_verifier_spec_raises_naming_it(spec):
    with pytest.raises(ValueError) as e:
        get_verifier(spec)
    assert spec in str(e.value)


def test_unknown_verifier_name_lists_supported_names():
    with pytest.raises(ValueError, match="unknown verifier 'nope'") as e:
        get_verifier("nope")
    for name in ("math", "reasoning_gym", "code"):
        assert name in str(e.value)


def test_registering_a_name_twice_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_verifier("math")(lambda item: 1.0)


def test_verify_one_turns_failures_into_error_results():
    assert verify_one(VerifyItem("x", "x", f"{USER}:exact_match")) == VerifyResult(1.0, "ok")
    crashed = verify_one(VerifyItem("x", None, f"{USER}:crash"))
    assert (crashed.score, crashed.status) == (0.0, "error") and "boom" in crashed.detail
    assert verify_one(VerifyItem("x", None, f"{USER}:out_of_range")).status == "error"
    assert verify_one(VerifyItem("x", None, "nope")).status == "error"


def test_in_process_pool_keeps_order_and_counts():
    items = [VerifyItem(str(i), str(i % 2), f"{USER}:exact_match") for i in range(4)]
    items.append(VerifyItem("x", None, f"{USER}:crash"))
    with VerifierPool(num_workers=0) as pool:
        results = pool.score(items)
        assert [r.score for r in results] == [1.0, 1.0, 0.0, 0.0, 0.0]
        assert results[-1].status == "error"
        assert pool.stats["scored"] == 5 and pool.stats["errors"] == 1


def test_pool_times_out_stuck_items_and_keeps_scoring():
    slow = VerifyItem("x", None, f"{USER}:slow", {"sleep_s": 60})
    fast = [VerifyItem(str(i), str(i), f"{USER}:exact_match") for i in range(6)]
    with VerifierPool(num_workers=2, timeout_s=1.0, warm_modules=()) as pool:
        start = time.monotonic()
        results = pool.score([fast[0], slow, fast[1], fast[2]])
        assert time.monotonic() - start < 10
        assert [r.status for r in results] == ["ok", "timeout", "ok", "ok"]
        assert results[1].score == 0.0 and [results[i].score for i in (0, 2, 3)] == [1.0] * 3
        assert pool.stats["timeouts"] == 1 and pool.stats["restarts"] == 1
        # The replaced worker serves the next batch; order is preserved.
        items = [VerifyItem(str(i), str(i if i % 3 else -1), f"{USER}:exact_match")
                 for i in range(9)]
        assert [r.score for r in pool.score(items)] == [0.0 if i % 3 == 0 else 1.0
                                                          for i in range(9)]
        assert pool.stats == {"scored": 13, "ok": 12, "timeouts": 1, "errors": 0,
                              "restarts": 1}


def test_pool_reports_raising_and_dying_verifiers_as_errors():
    items = [VerifyItem("a", "a", f"{USER}:exact_match"),
             VerifyItem("b", None, f"{USER}:crash"),
             VerifyItem("c", None, f"{USER}:die"),
             VerifyItem("d", None, f"{USER}:out_of_range"),
             VerifyItem("e", "e", f"{USER}:exact_match")]
    with VerifierPool(num_workers=2, timeout_s=5.0, warm_modules=()) as pool:
        results = pool.score(items)
        assert [r.status for r in results] == ["ok", "error", "error", "error", "ok"]
        assert "RuntimeError: boom" in results[1].detail
        assert "died" in results[2].detail
        assert pool.stats["errors"] == 3 and pool.stats["restarts"] == 1
        assert [r.status for r in pool.score(items[:1] * 3)] == ["ok"] * 3


def test_pool_workers_score_builtin_verifiers(chain_sum):
    entry = chain_sum[0]
    items = [
        math_item("<answer>0.5</answer>", "\\frac12"),
        VerifyItem(f"<answer>{entry['answer']}</answer>", None, "reasoning_gym",
                   {"dataset": "chain_sum", "entry": entry}),
        VerifyItem("```python\nprint(int(input()) * 2)\n```", None, "code",
                   {"tests": [{"input": "3\n", "output": "6\n"}]}),
        math_item("<answer>0.6</answer>", "\\frac12"),
    ]
    with VerifierPool(num_workers=2, timeout_s=30.0) as pool:
        assert [r.score for r in pool.score(items)] == [1.0, 1.0, 1.0, 0.0]
    with pytest.raises(RuntimeError, match="closed"):
        pool.score(items)


def test_pool_timeout_kills_the_workers_sandboxed_program(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the spawned worker's sandboxes go here
    looping = VerifyItem("```python\nwhile True:\n    pass\n```", None, "code",
                         {"tests": [{"input": "", "output": ""}], "timeout_s": 60.0})
    with VerifierPool(num_workers=1, timeout_s=1.5, warm_modules=()) as pool:
        assert pool.score([looping])[0].status == "timeout"
        time.sleep(0.2)
        assert not list(tmp_path.iterdir())  # the sandbox dir is gone ...
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):  # ... and so is its process
            try:
                assert str(tmp_path) not in cmdline.read_text()
            except OSError:
                pass
