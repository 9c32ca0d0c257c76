"""Held-out evaluation: pass@k against hand-computed values, and the greedy score equal to
the verifier's mean score of the engine's greedy answers."""

import pytest

from trainer.evaluate import evaluate, pass_at_k


def test_pass_at_k_matches_hand_computed_values():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(2, 1, 3)


@pytest.mark.parametrize("greedy", [True, False])
def test_greedy_score_is_the_mean_score_of_the_greedy_answers(tiny_policy, tmp_path, greedy):
    from engine import Engine, SamplingParams
    from tests.trainer.test_loop import _cfg
    from trainer.data import load_problems, render_prompt
    from trainer.verifiers import VerifierPool, VerifyItem
    from trainer.verifiers.pool import verify_one

    cfg = _cfg(tiny_policy, tmp_path, **{"eval.k": 3, "eval.greedy": greedy,
                                          "data.verifier": "tests.trainer.reward_fns:char_hash"})
    engine = Engine(tiny_policy, page_size=4, max_kv_tokens=2048)
    _, held = load_problems(cfg.data)
    with VerifierPool(0, 5.0) as pool:
        got = evaluate(engine, held, cfg, pool)
    assert 0.0 <= got["eval/mean_at_k"] <= 1.0 and got["eval/k"] == 3
    if not greedy:
        assert "eval/greedy" not in got
        return
    prompts = [render_prompt(p, engine.tokenizer, cfg.data.chat_template) for p in held]
    outs = engine.generate(prompts, SamplingParams(temperature=0,
                                                   max_tokens=cfg.eval.max_tokens))
    scores = [verify_one(VerifyItem(o.outputs[0].text or "", p.answer, p.verifier,
                                    p.metadata)).score for p, o in zip(held, outs)]
    assert got["eval/greedy"] == pytest.approx(sum(scores) / len(scores))
    # sampled answers score otherwise (the hash score tells texts apart), so a greedy score
    # computed from samples would fail the comparison above
    assert got["eval/mean_at_k"] != pytest.approx(got["eval/greedy"])
