"""Held-out evaluation: pass@k against hand-computed values, and the greedy score equal to
the verifier's mean score of the engine's greedy answers."""

import pytest

from brorl.trainer.evaluate import evaluate, pass_at_k


# hand values: 1 - C(n-c, k) / C(n, k); (4,1,2): 1 - 3/6; (5,2,3): 1 - 1/10; (5,2,2): 1 - 3/10
@pytest.mark.parametrize("n,c,k,want", [(4, 0, 1, 0.0), (4, 4, 2, 1.0), (4, 1, 1, 0.25),
                                        (4, 1, 2, 0.5), (5, 2, 3, 0.9), (5, 3, 3, 1.0),
                                        (5, 2, 2, 0.7), (4, 0, 2, 0.0), (4, 3, 2, 1.0)])
def test_pass_at_k_unbiased_estimator(n, c, k, want):
    assert pass_at_k(n, c, k) == pytest.approx(want)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(2, 1, 3)


@pytest.mark.parametrize("greedy", [True, False])
def test_greedy_score_is_the_mean_score_of_the_greedy_answers(tiny_policy, tmp_path, greedy):
    from brorl.engine import Engine, SamplingParams
    from brorl.trainer.data import load_problems, render_prompt
    from brorl.trainer.verifiers import VerifierPool, VerifyItem
    from brorl.trainer.verifiers.pool import verify_one
    from tests.trainer.test_loop import _cfg

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
