"""The embedded loop end to end on a tiny model: finite loss, changed weights, the engine
in sync with the trainer after each step, and an exact resume."""

import math

import pytest
import torch

from brorl.trainer import loop
from brorl.trainer.config_load import load_config
from brorl.trainer.loop import setup, train, train_step
from brorl.trainer.metrics import read_metrics
from brorl.trainer.policy import pad_batch, token_logprobs
from brorl.trainer.run_state import save_run

_TIME_KEYS = ("time", "elapsed_s", "step_seconds", "seconds", "per_s")


def _cfg(path, out, **extra):
    overrides = {
        "model.path": path, "output_dir": str(out), "steps": 2, "seed": 3,
        "data.size": 40, "data.eval_size": 4,
        "data.verifier": "tests.trainer.reward_fns:digit_fraction",
        "rollout.n": 8, "rollout.prompts_per_step": 2, "rollout.max_prompts_per_step": 4,
        "rollout.max_tokens": 6, "eval.k": 2, "eval.max_tokens": 6, "eval.every": 0,
        "optim.lr": 1e-2, "optim.micro_batch_size": 5, "optim.logprob_chunk": 7,
        "verifier.num_workers": 0, "progress": False, "checkpoint_every": 2,
        "algorithm.truncated_reward": "null", **extra}
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def _engine_matches_trainer(run) -> float:
    """Max |engine behaviour logprob - trainer logprob| over sampled tokens."""
    from brorl.engine import SamplingParams

    prompt = run.engine.tokenizer("State the final answer: 1 + 2 =")["input_ids"]
    out = run.engine.generate([prompt], SamplingParams(n=3, max_tokens=6, seed=11))[0]
    seqs = [prompt + c.token_ids for c in out.outputs]
    ids, targets, mask = pad_batch(seqs, [len(prompt)] * 3, pad_id=0)
    with torch.no_grad():
        lp, _ = token_logprobs(run.model, ids, targets, mask)
    worst = 0.0
    for row, c in enumerate(out.outputs):
        mine = lp[row, len(prompt) - 1:len(prompt) - 1 + len(c.token_ids)]
        worst = max(worst, (mine - torch.tensor(c.logprobs)).abs().max().item())
    return worst


def test_two_steps_update_weights_and_keep_engine_in_sync(tiny_policy, tmp_path):
    run = setup(_cfg(tiny_policy, tmp_path / "run", **{"algorithm.num_mini_batches": 2,
                                                         "algorithm.kl_coef": 0.1,
                                                         "algorithm.entropy_coef": 0.01,
                                                         "algorithm.old_logprobs": "recompute"}),
                None)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    try:
        for _ in range(2):
            m = train_step(run)
            assert m["rollout/groups_kept"] >= 1
            assert 0 < m["rollout/decode_rows_fraction"] <= 1
            # generation alone (BroRL's samples/s) against the whole rollout with scoring
            assert 0 < m["rollout/generate_seconds"] <= m["rollout/seconds"]
            assert m["rollout/generate_samples_per_s"] >= m["rollout/samples_per_s"] > 0
            # n=8: each prompt is computed once for its 8 samples (the group fork)
            assert 1 - 1 / 8 <= m["rollout/prefix_cache_hit_rate"] < 1
            assert 0 < m["rollout/unsampled_mass"] < 1  # n=8 (no _n16 figures below 17)
            assert 0 < m["rollout/unsampled_mass_first_token"] < 1
            assert "rollout/unsampled_mass_n16" not in m
            # float32 engine and trainer: the recomputed old logprobs are the behaviour
            # ones to float rounding
            assert 0 <= m["mismatch/logprob_abs_mean"] <= m["mismatch/logprob_abs_max"] < 1e-4
            assert 0 < m["train/distinct_samples"] <= m["train/samples"]
            assert math.isfinite(m["train/loss"]) and math.isfinite(m["train/kl"])
            assert m["train/grad_norm"] > 0
            assert _engine_matches_trainer(run) < 1e-4  # weights reached the engine
        changed = [k for k, v in run.model.state_dict().items() if not torch.equal(v, before[k])]
        assert len(changed) == len(before)
        assert run.engine.stats()["policy_version"] == 2
    finally:
        run.pool.close()
        run.metrics.close()


def test_a_step_without_an_update_keeps_the_engines_weights_version_and_cache(
        tiny_policy, tmp_path, caplog):
    run = setup(_cfg(tiny_policy, tmp_path / "run", **{
        "data.verifier": "tests.trainer.reward_fns:constant_half"}), None)
    try:
        cached = run.engine.stats()["cached_pages"]
        m = train_step(run)
        assert m["rollout/groups_kept"] == 0 and "weight_sync/seconds" not in m
        assert "no update (the engine keeps policy version 0)" in caplog.text
        stats = run.engine.stats()
        assert stats["policy_version"] == 0 and stats["cached_pages"] > cached  # not flushed
    finally:
        run.pool.close()
        run.metrics.close()


def test_the_embedded_sync_refuses_a_partial_state_and_changes_nothing(tiny_policy, tmp_path,
                                                                        monkeypatch):
    """Through the protocol's check (Engine.update_weights alone would apply the part)."""
    from brorl.trainer.weight_sync import ManifestRefused

    run = setup(_cfg(tiny_policy, tmp_path / "run"), None)
    full = loop.full_state
    monkeypatch.setattr(loop, "full_state", lambda model, dp: dict(
        list(full(model, dp).items())[1:]))
    from brorl.engine import SamplingParams

    def sample():
        out = run.engine.generate([[5, 6, 7]], SamplingParams(n=2, max_tokens=4, seed=1))
        return [(c.token_ids, c.logprobs) for c in out[0].outputs]

    try:
        before = sample()
        with pytest.raises(ManifestRefused, match="missing parameters"):
            train_step(run)
        assert run.engine.stats()["policy_version"] == 0 and sample() == before
    finally:
        run.pool.close()
        run.metrics.close()


def test_a_step_with_activation_checkpointing_keeps_the_engine_in_sync(tiny_policy,
                                                                        tmp_path):
    run = setup(_cfg(tiny_policy, tmp_path / "run", **{
        "optim.gradient_checkpointing": True, "algorithm.kl_coef": 0.1}), None)
    try:
        layer = run.model.model.layers[0]
        assert layer.gradient_checkpointing and run.model.training
        m = train_step(run)
        assert math.isfinite(m["train/loss"]) and m["train/grad_norm"] > 0
        assert _engine_matches_trainer(run) < 1e-4
    finally:
        run.pool.close()
        run.metrics.close()


def test_a_reference_reset_without_kl_is_warned_about(tiny_policy, tmp_path, caplog):
    run = setup(_cfg(tiny_policy, tmp_path / "run", **{"algorithm.ref_reset_every": 5}), None)
    try:
        assert run.ref_model is None
        assert "ref_reset_every=5 does nothing with algorithm.kl_coef=0" in caplog.text
    finally:
        run.pool.close()
        run.metrics.close()
    caplog.clear()
    run = setup(_cfg(tiny_policy, tmp_path / "run2", **{"algorithm.ref_reset_every": 5,
                                                         "algorithm.kl_coef": 0.1}), None)
    run.pool.close()
    run.metrics.close()
    assert "does nothing" not in caplog.text


def test_a_resume_with_overrides_saves_them_for_the_next_resume(tiny_policy, tmp_path,
                                                                caplog):
    """brorl train --resume RUN steps=3 runs to step 3 and config.yaml says so: a later
    plain --resume (which reads config.yaml) must not fall back to the first steps=2."""
    import json

    import yaml

    out = tmp_path / "run"
    train(_cfg(tiny_policy, out, steps=2))
    first = (out / "config.yaml").read_text()
    train(_cfg(tiny_policy, out, steps=2), resume=str(out))  # nothing changed
    assert (out / "config.yaml").read_text() == first and "changed config" not in caplog.text
    assert "already at step 2 of steps=2: nothing to train" in caplog.text
    train(_cfg(tiny_policy, out, steps=3), resume=str(out))
    assert "resuming with a changed config (steps)" in caplog.text
    assert yaml.safe_load((out / "config.yaml").read_text())["steps"] == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in rows) == 3


def _comparable(rows):
    return [{k: v for k, v in r.items() if not any(t in k for t in _TIME_KEYS)} for r in rows]


def test_resume_after_a_kill_gives_the_same_metrics(tiny_policy, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    train(_cfg(tiny_policy, straight, steps=4))
    killed = tmp_path / "killed"

    def dies_after_step_3(run):
        metrics = loop.train_step.__wrapped__(run)
        if run.step == 3:  # checkpointed at 2; step 3 is logged, then the process dies
            raise KeyboardInterrupt
        return metrics

    dies_after_step_3.__wrapped__ = loop.train_step
    monkeypatch.setattr(loop, "train_step", dies_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_policy, killed, steps=4))
    monkeypatch.undo()
    assert [r["step"] for r in read_metrics(killed)] == [0, 1, 2, 3]
    result = train(_cfg(tiny_policy, killed, steps=4), resume=str(killed))
    want, got = read_metrics(straight), read_metrics(killed)
    assert [r["step"] for r in got] == [0, 1, 2, 3, 4]
    assert _comparable(got) == _comparable(want)
    assert result["after"]["eval/mean_at_k"] == want[-1]["eval/mean_at_k"]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(_cfg("unused", tmp_path / "x"), resume=str(tmp_path / "empty"))


def test_a_new_run_refuses_a_directory_holding_a_run_unless_overwrite(tiny_policy, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny_policy, out, steps=1))
    before = read_metrics(out)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(ValueError, match=r"already holds a run \(metrics.jsonl, checkpoints"
                                         r"\).*--resume.*overwrite=true"):
        train(_cfg(tiny_policy, out, steps=1))
    # refused before touching anything: the old run's metrics and checkpoints are intact
    assert read_metrics(out) == before
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ckpts
    # overwrite never deletes what the new run reads: here its policy
    with pytest.raises(ValueError, match="would delete .*step-000001, which this run reads"):
        train(_cfg(str(out / "checkpoints" / "step-000001"), out, steps=1, overwrite="true"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ckpts
    (out / "checkpoints" / "step-000009").mkdir()  # a stale checkpoint the new run must drop
    (out / "curves.png").write_bytes(b"the old run's curves")
    train(_cfg(tiny_policy, out, steps=1, overwrite="true"))
    assert not (out / "curves.png").exists()
    assert [r["step"] for r in read_metrics(out)] == [0, 1]  # not appended to the old run's
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]
    # its saved config, reused as a template, does not delete this run
    assert "overwrite: false" in (out / "config.yaml").read_text()
    # a first attempt that died before its first checkpoint: nothing to resume
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="has no checkpoint to resume; choose another"):
        train(_cfg(tiny_policy, failed, steps=1))


def test_eval_of_a_run_uses_the_runs_own_config(tiny_policy, tmp_path, capsys):
    import json

    from brorl.trainer.cli import main

    out = tmp_path / "run"
    train(_cfg(tiny_policy, out, steps=1))
    capsys.readouterr()
    ckpt = out / "checkpoints" / "step-000001"
    for target in (out, ckpt):  # a run dir, or one of its checkpoints
        assert main(["eval", str(target), "verifier.num_workers=0"]) == 0
        result = json.loads(capsys.readouterr().out)
        # the run's data.eval_size=4 and eval.k=2, not the demo's 100 and 8
        assert result["checkpoint"] == str(ckpt)
        assert (result["eval/problems"], result["eval/k"]) == (4, 2)


def test_an_interrupt_while_drawing_rollouts_saves_the_last_step(tiny_policy, tmp_path,
                                                                  monkeypatch):
    """Ctrl-C in step 4's rollouts (checkpoints every 2 steps) saves step 3 as it ended;
    the resumed run logs the same metrics as one never interrupted."""
    straight = tmp_path / "straight"
    train(_cfg(tiny_policy, straight, steps=5))
    cut = tmp_path / "cut"
    real = loop.collect_rollouts

    def interrupted_in_step_4(engine, stream, pool, cfg, step):
        out = real(engine, stream, pool, cfg, step)  # the stream and RNG have moved on
        if step == 4:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(loop, "collect_rollouts", interrupted_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_policy, cut, steps=5))
    monkeypatch.undo()
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-000002",
                                                                       "step-000003"]
    train(_cfg(tiny_policy, cut, steps=5), resume=str(cut))
    got = read_metrics(cut)
    assert [r["step"] for r in got] == [0, 1, 2, 3, 4, 5]
    assert _comparable(got) == _comparable(read_metrics(straight))


def test_an_interrupt_during_an_update_leaves_the_newest_checkpoint(tiny_policy, tmp_path,
                                                                    monkeypatch, capsys):
    import brorl.trainer.cli as cli

    cut = tmp_path / "cut"
    real = loop.policy_update

    def interrupted_update(*args, **kwargs):
        if loop_steps[0] == 3:  # the policy would be half updated: nothing is saved
            raise KeyboardInterrupt
        loop_steps[0] += 1
        return real(*args, **kwargs)

    loop_steps = [1]
    monkeypatch.setattr(loop, "policy_update", interrupted_update)
    monkeypatch.setattr(cli, "load_config", lambda *a: _cfg(tiny_policy, cut, steps=4))
    assert cli.main(["train"]) == 130
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-000002"]
    assert (f"interrupted; the newest checkpoint is {cut / 'checkpoints' / 'step-000002'}: "
            f"continue with brorl train --resume {cut}") in capsys.readouterr().err


def test_rollout_stop_strings_end_responses_and_the_verifier_sees_them(tiny_policy, tmp_path):
    """rollout.stop: a response ends at the token that completes a stop string, and the
    text scored is the text of the tokens trained on, stop string included."""
    from brorl.trainer.rollout import generate_groups

    cfg = _cfg(tiny_policy, tmp_path / "run", **{
        "rollout.stop": "['=']", "rollout.max_tokens": 12,
        "data.verifier": "tests.trainer.reward_fns:ends_with_equals"})
    assert cfg.rollout.sampling["stop"] == ["="]
    run = setup(cfg, None)
    try:
        problems = run.stream.take(4)
        groups = generate_groups(run.engine, problems, cfg, [1, 2, 3, 4], run.pool,
                                 {**cfg.rollout.sampling, "n": 16})
        stopped = 0
        for g in groups:
            for ids, reward, reason in zip(g.response_ids, g.rewards.tolist(),
                                           g.finish_reasons):
                text = run.engine.tokenizer.decode(ids, skip_special_tokens=True)
                before = run.engine.tokenizer.decode(ids[:-1], skip_special_tokens=True)
                if "=" in text:  # it stopped at the first token that made one
                    assert reason == "stop" and "=" not in before and reward == 1.0
                    stopped += 1
                else:
                    assert reward == 0.0
        assert 0 < stopped < 64
    finally:
        run.pool.close()
        run.metrics.close()


@pytest.mark.parametrize("override,match", [
    ("rollout.stop=['']", "rollout: stop strings must be non-empty"),
    ("rollout.stop={a: 1}", "rollout.stop must be list or str"),  # one string is fine
    ("eval.stop=[3]", "eval: stop strings must be strings"),
])
def test_bad_stop_strings_fail_when_the_config_loads(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_prefix_cache_hit_rate_counts_prompt_tails_recomputed_after_preemption():
    from brorl.trainer.data import Problem
    from brorl.trainer.rollout import Group, _engine_metrics

    g = Group(Problem("p", "1", "math"), list(range(22)), [[5]] * 12, [[-1.0]] * 12,
              ["stop"] * 12, torch.zeros(12))
    before = dict(decode_tokens=0, decode_rows=0, prefill_tokens=0,
                  recomputed_prompt_tokens=0)
    after = dict(decode_tokens=120, decode_rows=30, prefill_tokens=22,
                 recomputed_prompt_tokens=2 * 9)  # 9 preemptions, a 2-token tail each
    m = _engine_metrics(before, after, [g])
    assert m["rollout/prefix_cache_hit_rate"] == pytest.approx(1 - (22 + 18) / (12 * 22))
    assert m["rollout/decode_rows_fraction"] == pytest.approx(0.25)


def test_progress_false_silences_transformers_bars_too(tiny_policy, tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    try:
        run = setup(_cfg(tiny_policy, tmp_path / "run"), None)
        assert not hf_logging.is_progress_bar_enabled()
        capfd.readouterr()
        save_run(run)
        assert "it/s]" not in capfd.readouterr().err
        hf_logging.enable_progress_bar()  # the control: the same save shows its bar
        save_run(run)
        if "it/s]" not in capfd.readouterr().err:
            pytest.skip("this transformers version shows no bar when it saves")
    finally:
        hf_logging.enable_progress_bar()
