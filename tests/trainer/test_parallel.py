"""Data-parallel training (trainer/parallel.py): two CPU processes over gloo with FSDP2, the
policy and its KL reference read by rank 0 alone and broadcast into the other rank's
shards, take the same policy-update step as one process, to float32 rounding (dropout off
in both, gradients summed over ranks, a rank with no samples left joining the collectives
at weight 0, old logprobs recomputed by shares, a sharded KL reference); the full state and
the optimizer state gather on rank 0 and load back."""

import copy
import multiprocessing as mp
import time

import pytest
import torch

from brorl.trainer.config_load import load_config
from brorl.trainer.data import Problem
from brorl.trainer.parallel import SINGLE
from brorl.trainer.rollout import Group
from brorl.trainer.update import micro_batches
from tests.helpers import make_checkpoint

OVERRIDES = ["algorithm.num_mini_batches=2", "optim.micro_batch_size=1",
             "algorithm.old_logprobs=recompute", "algorithm.kl_coef=0.1",
             "algorithm.entropy_coef=0.01", "optim.grad_clip=0.5"]


def _groups(seed: int = 0) -> list[Group]:
    """Two groups of 3 samples with mixed rewards, two of them equal; behaviour logprobs
    near the policy's (random offsets, so some ratios clip)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for gi, rewards in enumerate([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]):
        prompt = torch.randint(3, 100, (4 + gi,), generator=g).tolist()
        responses = [torch.randint(3, 100, (3 + j,), generator=g).tolist() for j in range(3)]
        behaviour = [(-4.0 + 0.3 * torch.randn(len(r), generator=g)).tolist()
                     for r in responses]
        if gi == 1:  # two equal samples (reward 1 both): merged into one weighted row
            responses[2], behaviour[2] = list(responses[1]), list(behaviour[1])
        out.append(Group(Problem(f"p{gi}", "1", "math"), prompt, responses, behaviour,
                         ["stop"] * 3, torch.tensor(rewards)))
    return out


def _step(model, ref, cfg, dp):
    from brorl.trainer.update import policy_update

    # weight change = a fixed linear function of the (clipped) gradients of both steps
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    gen = torch.Generator().manual_seed(5)
    return policy_update(model, opt, sched, _groups(), cfg, 0, ref, gen, dp), opt


def _rank(rank: int, path: str, port: int, queue) -> None:
    torch.set_num_threads(1)
    from brorl.trainer.parallel import (
        close_group,
        full_state,
        init_group,
        load_optimizer_state,
        load_sharded_policy,
        optimizer_state,
    )

    dp = init_group(rank, 2, f"127.0.0.1:{port}", torch.device("cpu"), 60)
    if rank > 0:  # only rank 0 reads the checkpoint: the others get its config by broadcast
        path = "/nonexistent/policy"
    model = load_sharded_policy(path, dp, torch.device("cpu"))
    ref = load_sharded_policy(path, dp, torch.device("cpu"), frozen=True)
    assert ref.training is False and not any(p.requires_grad for p in ref.parameters())
    assert model.training and model.config.attention_dropout == 0.0
    cfg = load_config(None, OVERRIDES)
    metrics, opt = _step(model, ref, cfg, dp)
    from torch.distributed.tensor import DTensor

    # the frozen reference's root (embeddings, LM head) is resharded after its forwards,
    # which run under no_grad: no backward would reshard it
    ref_sharded = isinstance(ref.get_input_embeddings().weight, DTensor)
    state = full_state(model, dp)
    saved = optimizer_state(model, opt, dp)  # collective: the full state on rank 0
    saved = saved if rank == 0 else {}  # as if rank 0 alone had read it from a file
    momentum = [opt.state[p]["momentum_buffer"].to_local().clone() for p in model.parameters()]
    for p in model.parameters():
        opt.state[p]["momentum_buffer"].zero_()
    load_optimizer_state(model, opt, saved, dp)
    restored = all(torch.equal(opt.state[p]["momentum_buffer"].to_local(), m)
                   for p, m in zip(model.parameters(), momentum))
    if rank == 0:
        queue.put(("main", metrics, {k: v.numpy().copy() for k, v in state.items()},
                   restored, ref_sharded))
    else:
        queue.put(("other", len(state), restored, ref_sharded))
    close_group(dp)


def test_micro_batches_give_every_rank_the_same_count():
    from brorl.trainer.parallel import DataParallel

    items = list(range(5))
    assert micro_batches(items, 2) == [[0, 1], [2, 3], [4]]
    r0 = micro_batches(items, 1, DataParallel(0, 2))
    r1 = micro_batches(items, 1, DataParallel(1, 2))
    assert r0 == [[0], [2], [4]] and r1 == [[1], [3], []]
    assert micro_batches([7], 4, DataParallel(1, 3)) == [[]]
    assert micro_batches([], 4, DataParallel(0, 2)) == []
    with pytest.raises(ValueError, match="rank 2 outside world size 2"):
        DataParallel(2, 2)


def test_random_splits_give_every_item_to_one_rank_in_equal_micro_batch_counts():
    """Against the plain definition, for random item counts, world sizes and micro-batch
    sizes: the ranks' micro-batches hold every item exactly once, each rank's in order and
    its own share (`share`), at most `size` each, the same number on every rank, and no
    more than rank 0's share needs."""
    import random

    from brorl.trainer.parallel import DataParallel

    rng = random.Random(4)
    for _ in range(300):
        n, world, size = rng.randint(0, 40), rng.randint(1, 5), rng.randint(1, 6)
        items = [f"s{i}" for i in range(n)]
        ranks = [DataParallel(r, world) for r in range(world)]
        parts = [micro_batches(items, size, dp) for dp in ranks]
        assert sorted(x for p in parts for mb in p for x in mb) == sorted(items)
        for dp, p in zip(ranks, parts):
            assert [x for mb in p for x in mb] == dp.share(items) == items[dp.rank::world]
            assert all(len(mb) <= size for mb in p)
        assert len({len(p) for p in parts}) == 1
        assert len(parts[0]) == -(-len(ranks[0].share(items)) // size)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_loss_summed_over_ranks_micro_batches_is_the_mini_batch_loss(mode):
    """How the update normalises across ranks (every micro-batch divides by the whole
    mini-batch's token or sample count, FSDP2 sums): for random ragged masks and merged
    rows of random counts, the sum over every rank's micro-batch losses equals the loss
    of the mini-batch in one piece, whatever the world size."""
    from brorl.trainer.algorithms import aggregate_loss
    from brorl.trainer.parallel import DataParallel

    gen = torch.Generator().manual_seed(2)
    for trial in range(20):
        rows, length = 2 + trial % 7, 9
        loss = torch.randn(rows, length, generator=gen, dtype=torch.float64)
        lengths = torch.randint(1, length + 1, (rows,), generator=gen)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).double()
        counts = torch.randint(1, 4, (rows,), generator=gen).double()  # merged samples
        weight = mask * counts[:, None]
        num_tokens, num_seqs = float(weight.sum()), int(counts.sum())
        whole = aggregate_loss(loss, weight, mode, num_tokens, num_seqs)
        assert torch.allclose(whole, aggregate_loss(loss, weight, mode))  # the definition
        for world in (1, 2, 3, 5):
            total = torch.zeros((), dtype=torch.float64)
            for r in range(world):
                for mb in micro_batches(list(range(rows)), 2, DataParallel(r, world)):
                    if mb:
                        total += aggregate_loss(loss[mb], weight[mb], mode, num_tokens,
                                                num_seqs)
            torch.testing.assert_close(total, whole, rtol=1e-12, atol=1e-12)


def test_two_fsdp2_ranks_take_the_one_process_step(tmp_path):
    from brorl.trainer.policy import load_policy
    from brorl.trainer.weight_sync.channel import free_port

    path = str(tmp_path / "policy")
    # dropout in the checkpoint's config: both trainers must turn it off, or the sharded
    # step's logprobs are noisy and it differs from the one-process one
    make_checkpoint(path, "qwen2", seed=3, tie_word_embeddings=True, attention_dropout=0.3)
    cfg = load_config(None, OVERRIDES)
    model = load_policy(path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    single, _ = _step(model, copy.deepcopy(model).eval(), cfg, SINGLE)
    expected = {n: p.detach() for n, p in model.named_parameters()}

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank, args=(r, path, port, queue), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    (_, metrics, state, restored, ref_sharded), = [g for g in got if g[0] == "main"]
    # full state on rank 0 only
    assert [g for g in got if g[0] == "other"] == [("other", 0, True, True)]
    assert restored  # each rank got its shard of the optimizer state back
    assert ref_sharded
    assert set(state) == set(expected)
    moved = max(float((expected[n] - before[n]).abs().max()) for n in expected)
    assert moved > 1e-3  # the step changed the weights, so the comparison means something
    for n, t in expected.items():
        torch.testing.assert_close(torch.from_numpy(state[n]), t, atol=2e-6, rtol=1e-5,
                                   msg=n)
    for k in ("train/loss", "train/pg_loss", "train/kl", "train/entropy",
              "train/clip_fraction", "train/grad_norm"):
        assert metrics[k] == pytest.approx(single[k], rel=1e-4, abs=1e-7), k
    assert single["train/distinct_samples"] == metrics["train/distinct_samples"] == 5


def _refusing_engine(path, cfg):
    """A local engine whose weight updates are refused, as a receiver refuses a manifest."""
    from brorl.trainer.loop import local_engine
    from brorl.trainer.weight_sync import ManifestRefused

    engine = local_engine(path, cfg)

    def refuse(named, version=None):
        raise ManifestRefused("receiver 1 refused: shape of 'lm_head.weight' differs")

    engine.update_weights = refuse
    return engine


def _dp_train(rank: int, path: str, out: str, steps: int, resume: bool, port: int,
              queue, refuse_sync: bool = False) -> None:
    """One rank of a 2-rank run of the loop (rank 0 with a local engine)."""
    torch.set_num_threads(1)
    from brorl.trainer.loop import train
    from brorl.trainer.parallel import close_group, init_group
    from tests.trainer.test_loop import _cfg

    dp = init_group(rank, 2, f"127.0.0.1:{port}", torch.device("cpu"), 120)
    if rank > 0:  # only rank 0 touches the filesystem: paths the other rank never reads
        path, out = f"{out}-rank1/policy", f"{out}-rank1/run"
    cfg = _cfg(path, out, steps=steps, **{"eval.every": 1, "checkpoint_every": 2,
                                          "algorithm.kl_coef": 0.1,
                                          "algorithm.num_mini_batches": 2})
    try:
        train(cfg, resume=out if resume else None, dp=dp,
              make_engine=_refusing_engine if refuse_sync else None)
        queue.put((rank, "ok"))
    except BaseException as err:  # noqa: BLE001 - reported to the test
        queue.put((rank, repr(err)))
    finally:
        close_group(dp)


def _run_two_ranks(path, out, steps, resume=False):
    assert _two_ranks(path, out, steps, resume) == [(0, "ok"), (1, "ok")]


def _two_ranks(path, out, steps, resume=False, refuse_sync=False) -> list[tuple[int, str]]:
    """(rank, "ok" or the error's repr) of each rank of a 2-rank run of the loop."""
    from brorl.trainer.weight_sync.channel import free_port

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_dp_train, args=(r, path, str(out), steps, resume, port,
                                                 queue, refuse_sync), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(30)
    return results


def test_an_error_on_rank_0_stops_every_rank(tiny_policy, tmp_path):
    """Resuming a run directory with no checkpoint fails on rank 0 (the only rank that
    looks) with the error naming it, and rank 1 stops with that message instead of
    waiting for the group's timeout."""
    (tmp_path / "empty").mkdir()

    start = time.monotonic()
    (r0, e0), (r1, e1) = _two_ranks(tiny_policy, tmp_path / "empty", 1, resume=True)
    assert time.monotonic() - start < 100  # well under the group's 120 s timeout
    assert (r0, r1) == (0, 1)
    assert e0.startswith("FileNotFoundError") and "no complete checkpoint" in e0
    assert e1.startswith("MainRankError") and "rank 0 failed" in e1
    assert "no complete checkpoint" in e1


def test_a_refused_sync_checkpoints_on_every_rank_then_stops_both(tiny_policy, tmp_path):
    """Rank 0's engine refuses the step-1 weights: both ranks join the checkpoint (a
    collective) and then raise. Before, rank 0 went on to checkpoint and rank 1 raised,
    so rank 0 failed on a closed connection (or hung to the timeout) with no checkpoint."""
    (r0, e0), (r1, e1) = _two_ranks(tiny_policy, tmp_path / "run", 2, refuse_sync=True)
    assert (r0, r1) == (0, 1)
    assert e0.startswith("ManifestRefused") and "lm_head.weight" in e0
    assert e1.startswith("WeightSyncError") and "could not sync" in e1
    assert "lm_head.weight" in e1  # rank 0's reason reaches rank 1
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-000001"]
    # the step's training metrics are logged with the failure, so a resume (from step 2)
    # leaves no hole in metrics.jsonl
    from brorl.trainer.metrics import read_metrics

    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[1]["weight_sync/failed"] == 1 and rows[1]["train/grad_norm"] > 0


def test_two_rank_loop_resumes_exactly(tiny_policy, tmp_path):
    """The loop over two FSDP2 ranks (KL reference sharded too), stopped after its step-2
    checkpoint and resumed to step 3, logs what an uninterrupted 3-step run logs. Rank 1
    is given paths that do not exist: everything it needs comes from rank 0."""
    from brorl.trainer.checkpoint import load_state
    from brorl.trainer.metrics import read_metrics
    from tests.trainer.test_loop import _comparable

    _run_two_ranks(tiny_policy, tmp_path / "straight", 3)
    _run_two_ranks(tiny_policy, tmp_path / "split", 2)
    state = load_state(tmp_path / "split" / "checkpoints" / "step-000002")
    assert state["data_parallel"] and (tmp_path / "split" / "checkpoints" / "step-000002" /
                                       "reference.pt").is_file()
    _run_two_ranks(tiny_policy, tmp_path / "split", 3, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split", "straight"]  # rank 1: none
    want, got = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in got] == [0, 1, 2, 3]
    assert all(r["train/grad_norm"] > 0 for r in got if r["step"])
    assert _comparable(got) == _comparable(want)


def test_objects_go_over_a_gloo_group_of_their_own_even_when_the_trainers_use_nccl(
        monkeypatch):
    """Over NCCL, the ranks waiting for rank 0's rollouts in broadcast_object would wait in a
    GPU collective: the pickled objects take a separate gloo group (torch.distributed is
    recorded here; no GPU needed)."""
    import torch.distributed as dist

    import brorl.trainer.parallel as par

    calls, objects_group = [], object()
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kw: calls.append(("init", backend, kw["timeout"])))
    monkeypatch.setattr(dist, "new_group",
                        lambda backend=None, timeout=None, **kw: calls.append(
                            ("new_group", backend, timeout)) or objects_group)

    def broadcast(box, src, group=None):
        calls.append(("broadcast", group))
        box[0] = "from rank 0"

    monkeypatch.setattr(dist, "broadcast_object_list", broadcast)
    monkeypatch.setattr(dist, "all_gather_object",
                        lambda out, obj, group=None: calls.append(("gather", group)))
    monkeypatch.setattr(par, "_objects_group", None)
    dp = par.init_group(1, 2, "127.0.0.1:1", torch.device("cuda"), 90)
    from datetime import timedelta

    assert calls == [("init", "nccl", timedelta(seconds=90)),
                     ("new_group", "gloo", timedelta(seconds=90))]
    assert par.broadcast_object(None, dp) == "from rank 0"
    par.all_gather_objects({"a": 1.0}, dp)
    assert calls[2:] == [("broadcast", objects_group), ("gather", objects_group)]
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append(("destroy",)))
    par.close_group(dp)
    assert calls[-1] == ("destroy",)
    with pytest.raises(RuntimeError, match="init_group"):
        par.broadcast_object(None, dp)
