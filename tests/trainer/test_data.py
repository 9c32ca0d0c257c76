"""Data: reasoning-gym and file sources, a disjoint held-out split, prompt rendering, and a
stream that resumes exactly."""

import json

import pytest

from brorl.trainer.config import DataConfig
from brorl.trainer.data import Problem, ProblemStream, file_problems, load_problems, render_prompt


def _rows(n):
    return [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(n)]


def test_gym_dataset_by_name_with_disjoint_held_out_split():
    cfg = DataConfig(train="gym:chain_sum", size=60, eval_size=20, seed=3,
                     gym_kwargs={"min_terms": 2, "max_terms": 2, "min_digits": 2,
                                 "max_digits": 2})
    train, held = load_problems(cfg)
    assert len(held) == 20 and 0 < len(train) <= 60
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    p = train[0]
    assert p.verifier == "reasoning_gym" and p.metadata["dataset"] == "chain_sum"
    assert p.metadata["entry"]["answer"] == p.answer
    again, _ = load_problems(cfg)
    assert [q.prompt for q in again] == [q.prompt for q in train]  # deterministic by seed


def test_a_gym_task_can_be_the_held_out_set_of_a_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _rows(6)))
    train, held = load_problems(DataConfig(train=str(path), eval="gym:chain_sum",
                                           eval_size=4))
    assert len(train) == 6 and len(held) == 4
    assert {p.verifier for p in held} == {"reasoning_gym"}
    assert {p.verifier for p in train} == {"math"}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_file_sources_split_off_a_held_out_set(tmp_path, suffix):
    rows = _rows(30)
    rows[0]["verifier"] = "code"
    rows[0]["tests"] = [{"input": "", "output": "0"}]
    path = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
        pq.write_table(pa.Table.from_pylist(rows), path)
    train, held = load_problems(DataConfig(train=str(path), eval_size=10, seed=0))
    assert len(train) == 20 and len(held) == 10
    assert sorted(p.prompt for p in train + held) == sorted(r["prompt"] for r in rows)
    code = [p for p in train + held if p.verifier == "code"][0]
    assert code.metadata["tests"] == [{"input": "", "output": "0"}]
    assert {p.verifier for p in train + held} == {"code", "math"}


def test_bad_files_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        file_problems(str(tmp_path / "x.jsonl"), "auto")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"answer": "1"}))
    with pytest.raises(ValueError, match="row 0: needs a string `prompt`"):
        file_problems(str(bad), "auto")
    with pytest.raises(ValueError, match=".jsonl or .parquet"):
        (tmp_path / "a.csv").write_text("x")
        file_problems(str(tmp_path / "a.csv"), "auto")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(_rows(1)[0]) + "\n\n{\"prompt\": \"x\", \"answer\": 1,\n")
    with pytest.raises(ValueError, match=r"broken.jsonl line 3 \(row 1\) is not JSON"):
        file_problems(str(broken), "auto")
    named = tmp_path / "named.jsonl"
    named.write_text(json.dumps({"prompt": "p", "answer": "1", "verifier": 5}))
    with pytest.raises(ValueError, match="row 0: `verifier` must be a name"):
        file_problems(str(named), "auto")
    unanswered = tmp_path / "unanswered.jsonl"
    unanswered.write_text("\n".join(json.dumps(r) for r in [*_rows(2), {"prompt": "p"}]))
    with pytest.raises(ValueError, match="row 2: the math verifier needs an `answer`"):
        file_problems(str(unanswered), "auto")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in _rows(5)))
    with pytest.raises(ValueError, match="empty.jsonl' holds no problems"):
        load_problems(DataConfig(train=str(good), eval=str(empty)))
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(json.dumps(r) for r in _rows(5)))
    with pytest.raises(ValueError, match="need more than data.eval_size=10"):
        load_problems(DataConfig(train=str(small), eval_size=10))


@pytest.mark.parametrize("verifier,match", [
    ("bogus", "unknown verifier 'bogus'"), ("no_such_module:fn", "cannot import"),
    ("json:no_such_function", "has no 'no_such_function'"),
])
def test_a_verifier_that_cannot_run_fails_at_load(tmp_path, verifier, match):
    # else every sample's scoring fails and the run trains on rewards that are all 0
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in _rows(5)))
    with pytest.raises(ValueError, match=match):
        load_problems(DataConfig(train=str(rows), eval_size=1, verifier=verifier))
    per_row = tmp_path / "per_row.jsonl"
    per_row.write_text("\n".join(json.dumps({**r, "verifier": verifier}) for r in _rows(5)))
    with pytest.raises(ValueError, match=match):
        load_problems(DataConfig(train=str(per_row), eval_size=1))
    assert len(load_problems(DataConfig(train=str(rows), eval_size=1))[0]) == 4


def test_stream_resumes_exactly_across_epochs():
    problems = [Problem(str(i), None, "math") for i in range(7)]
    a = ProblemStream(problems, seed=5)
    first = [p.prompt for p in a.take(10)]
    state = a.state()
    rest = [p.prompt for p in a.take(12)]
    b = ProblemStream(problems, seed=5)
    b.load_state(state)
    assert [p.prompt for p in b.take(12)] == rest
    assert sorted(first[:7]) == sorted(str(i) for i in range(7))  # each epoch a permutation


def test_render_prompt_uses_the_chat_template_when_present():
    from brorl.trainer.demo import build_tokenizer

    tok = build_tokenizer(["hello world", "<user><assistant>"])
    p = Problem("hello world", None, "math")
    plain = render_prompt(p, tok)
    assert tok.decode(plain) == "hello world"
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}" \
                        "{% if add_generation_prompt %}<assistant>{% endif %}"
    templated = render_prompt(p, tok)
    assert tok.decode(templated) == "<user>hello world<assistant>"
    assert render_prompt(p, tok, chat_template=False) == plain


def test_a_system_prompt_comes_first_as_a_system_turn_or_text():
    from brorl.trainer.data import system_prompt
    from brorl.trainer.demo import build_tokenizer

    tok = build_tokenizer(["hello world", "be brief\n\n", "<user><assistant><system>"])
    p = Problem("hello world", None, "math")
    assert tok.decode(render_prompt(p, tok, system="be brief")) == "be brief\n\nhello world"
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}" \
                        "{% if add_generation_prompt %}<assistant>{% endif %}"
    assert (tok.decode(render_prompt(p, tok, system="be brief"))
            == "<system>be brief<user>hello world<assistant>")
    assert "<answer>answer here</answer>" in system_prompt("gym:default")
    assert system_prompt("plain words") == "plain words" and system_prompt("") == ""
    with pytest.raises(ValueError, match="no system prompt 'nope'; it has .*default"):
        load_problems(DataConfig(train="gym:chain_sum", size=8, eval_size=2,
                                 system_prompt="gym:nope"))
