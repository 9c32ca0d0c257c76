"""`brorl train --launcher ray` on CPU: Ray local with 2 CPUs, a trainer actor and two
rollout workers, weights over gloo (through /dev/shm on this one machine); the probe says
every worker runs the trainer's weights. Also the prompt spreading of
`RayEngines.generate` against fake workers."""

import math
import types

import pytest

from brorl.trainer.metrics import read_metrics


def _ray_run(tiny_policy, out, monkeypatch, **extra):
    pytest.importorskip("ray")
    from brorl.trainer.cli import main

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    overrides = {
        "model.path": tiny_policy, "model.device": "cpu", "output_dir": str(out),
        "steps": 2, "seed": 3, "data.size": 40, "data.eval_size": 4,
        "data.verifier": "tests.trainer.reward_fns:digit_fraction",
        "rollout.n": 4, "rollout.prompts_per_step": 2, "rollout.max_prompts_per_step": 4,
        "rollout.max_tokens": 6, "eval.k": 2, "eval.max_tokens": 6, "eval.every": 0,
        "optim.lr": 1e-2, "verifier.num_workers": 0, "progress": False,
        "checkpoint_every": 2, "rollout.weight_sync_probe": True,
        "rollout.weight_sync_bucket_mb": 1, "ray.num_cpus": 2, "ray.num_workers": 2,
        "ray.cpus_per_actor": 0.5, "algorithm.truncated_reward": "null", **extra}
    assert main(["train", "--launcher", "ray", *[f"{k}={v}" for k, v in overrides.items()]]) == 0
    rows = [r for r in read_metrics(out) if "weight_sync/seconds" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert (out / "checkpoints").is_dir()
    return rows


@pytest.fixture(scope="module")
def one_trainer_rows(tiny_policy, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        return _ray_run(tiny_policy, tmp_path_factory.mktemp("ray") / "run", mp)


def test_ray_launch_two_steps_probe_matches(one_trainer_rows):
    from brorl.trainer.weight_sync import shm

    on_shm = shm.fits(shm.DEFAULT_SHM_DIR, 1 << 20)  # one machine: buckets go through it
    for r in one_trainer_rows:
        assert r["weight_sync/probe_max_abs_diff"] < 1e-5
        assert r["weight_sync/shared_memory"] == int(on_shm) and r["weight_sync/bytes"] > 0
        assert math.isfinite(r["train/loss"]) and r["train/grad_norm"] > 0  # weights moved


def test_two_fsdp2_trainers_train_like_one(one_trainer_rows, tiny_policy, tmp_path,
                                           monkeypatch):
    """ray.num_trainers=2: the policy sharded over two trainer actors (FSDP2 over gloo)
    takes the same steps: same rollouts, losses and gradient norms to rounding, and the
    workers run the gathered weights (probe)."""
    rows = _ray_run(tiny_policy, tmp_path / "run", monkeypatch, **{"ray.num_trainers": 2})
    for one, two in zip(one_trainer_rows, rows):
        assert two["weight_sync/probe_max_abs_diff"] < 1e-5
        assert two["reward/mean"] == one["reward/mean"]
        assert two["response/mean_tokens"] == one["response/mean_tokens"]
        for k in ("train/loss", "train/grad_norm", "train/entropy"):
            assert two[k] == pytest.approx(one[k], rel=1e-4, abs=1e-6), k
    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(ckpt))  # rank 0 wrote the gathered weights


class _FakeWorker:
    """Answers generate() like an engine: one output per prompt, tagged with the worker."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.generate = types.SimpleNamespace(remote=self._generate)

    def _generate(self, prompts, params):
        from brorl.engine import CompletionOutput, RequestOutput

        return [RequestOutput(j, list(p), [CompletionOutput(i, [self.k], None, "length")
                                           for i in range(sp.n)])
                for j, (p, sp) in enumerate(zip(prompts, params))]


@pytest.mark.parametrize("num_prompts,num_workers", [(5, 2), (1, 3), (6, 3), (4, 1)])
def test_generate_keeps_prompt_samples_together_and_in_order(num_prompts, num_workers):
    from brorl.engine import SamplingParams
    from brorl.trainer.launch_ray import RayEngines

    eng = RayEngines.__new__(RayEngines)
    eng._ray = types.SimpleNamespace(get=lambda refs: refs)
    eng.workers = [_FakeWorker(k) for k in range(num_workers)]
    prompts = [[10 + i, 11 + i] for i in range(num_prompts)]
    params = [SamplingParams(n=3 + i, max_tokens=1) for i in range(num_prompts)]
    outs = eng.generate(prompts, params)
    assert [o.request_id for o in outs] == list(range(num_prompts))
    assert [o.prompt_token_ids for o in outs] == prompts
    for i, o in enumerate(outs):
        assert len(o.outputs) == 3 + i
        assert {c.token_ids[0] for c in o.outputs} == {i % num_workers}  # one worker


class _CountingWorker(_FakeWorker):
    """A fake worker that also records every generate call's prompts."""

    def __init__(self, k: int) -> None:
        super().__init__(k)
        self.calls: list[list] = []
        self.generate = types.SimpleNamespace(remote=self._record)

    def _record(self, prompts, params):
        self.calls.append(list(prompts))
        return self._generate(prompts, params)


def _fake_engines(workers) -> "RayEngines":  # noqa: F821 - imported by the callers
    from brorl.trainer.launch_ray import RayEngines

    eng = RayEngines.__new__(RayEngines)
    eng._ray = types.SimpleNamespace(get=lambda refs: refs)
    eng.workers = workers
    eng._version = 0
    return eng


def test_generate_spreads_random_prompt_counts_whole_balanced_and_loses_none():
    """Random prompt counts (0-23, most not a multiple of the 1-6 workers) and sample
    counts: every prompt comes back once, in order, with all its samples from one worker;
    each worker gets floor or ceil of prompts / workers, in one call, never an empty one;
    equal prompts are still separate requests."""
    import random

    from brorl.engine import SamplingParams

    rng = random.Random(11)
    for _ in range(60):
        num_prompts, num_workers = rng.randint(0, 23), rng.randint(1, 6)
        workers = [_CountingWorker(k) for k in range(num_workers)]
        eng = _fake_engines(workers)
        prompts = [[rng.randint(3, 9)] * rng.randint(1, 3) for _ in range(num_prompts)]
        ns = [rng.randint(1, 5) for _ in range(num_prompts)]
        outs = eng.generate(prompts, [SamplingParams(n=n, max_tokens=1) for n in ns])
        assert [o.request_id for o in outs] == list(range(num_prompts))
        assert [o.prompt_token_ids for o in outs] == prompts
        assert [len(o.outputs) for o in outs] == ns
        owner = [{c.token_ids[0] for c in o.outputs} for o in outs]
        assert all(len(s) == 1 for s in owner)  # all N samples of a prompt on one worker
        sent = [len(c) for w in workers for c in w.calls]
        assert all(sent) and all(len(w.calls) <= 1 for w in workers)
        counts = [sum(len(c) for c in w.calls) for w in workers]
        assert sum(counts) == num_prompts
        assert max(counts, default=0) - min(counts, default=0) <= 1 or num_prompts < num_workers


def test_stats_sum_counters_but_not_the_page_size():
    eng = _fake_engines([types.SimpleNamespace(stats=types.SimpleNamespace(
        remote=lambda k=k: {"decode_tokens": 10 + k, "page_size": 16, "num_pages": 64,
                            "cascade_decode": True, "attention_backend": "torch",
                            "policy_version": 9})) for k in range(3)])
    eng._version = 4
    s = eng.stats()
    assert s["decode_tokens"] == 33 and s["num_pages"] == 192  # totals over the workers
    assert s["page_size"] == 16 and s["cascade_decode"] is True  # per-engine settings
    assert s["attention_backend"] == "torch" and s["policy_version"] == 4


def test_a_failed_sync_keeps_the_version_and_asks_every_worker():
    from brorl.trainer.weight_sync import WeightSyncError

    asked = []
    workers = [types.SimpleNamespace(receive=types.SimpleNamespace(
        remote=lambda k=k: asked.append(k))) for k in range(2)]
    eng = _fake_engines(workers)
    eng._version = 3

    def lost(named, version):
        raise WeightSyncError("rollout worker rank 2 is gone")

    eng.sender = types.SimpleNamespace(send=lost)
    with pytest.raises(WeightSyncError, match="gone"):
        eng.update_weights([], version=4)
    assert eng.policy_version == 3 and asked == [0, 1]
    eng.sender = types.SimpleNamespace(send=lambda named, version: {"bytes": 0})
    eng.update_weights([])
    assert eng.policy_version == 4 and eng.last_sync == {"bytes": 0}


def test_a_worker_that_cannot_start_raises_its_error_before_the_sync_group(monkeypatch):
    """A worker whose engine cannot be built (say, its KV pool does not fit) used to show
    as a weight-sync timeout: the sender waited weight_sync_timeout_s for it to join. Now
    its own error comes first, before the group is formed. Ray is faked: actors run
    in-process, a constructor's error raising when a method's result is fetched."""
    import sys

    from brorl.trainer import launch_ray, weight_sync
    from brorl.trainer.config_load import load_config

    class Handle:
        def __init__(self, cls, args):
            self.cls, self.args, self.obj = cls, args, None

        def __getattr__(self, name):
            def call(*a, **kw):
                def run():
                    self.obj = self.obj or self.cls(*self.args)
                    return getattr(self.obj, name)(*a, **kw)
                return run
            return types.SimpleNamespace(remote=call)

    def remote(cls):
        return types.SimpleNamespace(options=lambda **kw: types.SimpleNamespace(
            remote=lambda *args: Handle(cls, args)))

    fake = types.SimpleNamespace(remote=remote, get=lambda refs: [r() for r in refs],
                                 util=types.SimpleNamespace(
                                     get_node_ip_address=lambda: "127.0.0.1"))
    monkeypatch.setitem(sys.modules, "ray", fake)

    class NoRoom:
        def __init__(self, path, cfg, num_threads):
            raise ValueError("not enough free memory for one KV page (4096 bytes)")

    def sender(*a, **kw):
        raise AssertionError("the sync group was formed before the workers were up")

    monkeypatch.setattr(launch_ray, "RolloutWorker", NoRoom)
    monkeypatch.setattr(weight_sync, "make_sender", sender)
    cfg = load_config(None, ["launcher=ray", "ray.num_workers=2"])
    with pytest.raises(ValueError, match="one KV page"):
        launch_ray.RayEngines("unused", cfg)
