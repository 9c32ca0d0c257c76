"""Weight sync: the bucket packing against the plain tensors, and two real processes over
gloo (spawned, free ports), each through shared memory and through TCP: a synced engine
generates what transformers generates with the trainer's new weights; a bad manifest is
refused with the engine unchanged; a receiver killed mid-sync gives the sender a clear
error within the timeout; a receiver that cannot map the sender's shared memory falls back
to TCP; no shared-memory file outlives a sync."""

import multiprocessing as mp
import os
import time

import pytest
import torch

from brorl.trainer.weight_sync import (
    ManifestRefused,
    WeightSyncError,
    make_receiver,
    make_sender,
)
from brorl.trainer.weight_sync.channel import free_port
from brorl.trainer.weight_sync.probe import engine_logits, probe_diff, trainer_logits
from brorl.trainer.weight_sync.protocol import Manifest, check_manifest, pack, plan_buckets, unpack
from tests.engine.test_models import hf_greedy
from tests.helpers import make_checkpoint

PROMPT = list(range(3, 23))
MAX_NEW = 8
TIMEOUT_S = 20.0


def test_buckets_round_trip_every_tensor_exactly():
    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 3), (1,), (129,), (5, 5, 2), (1000,), (2, 1)]
    named = [(f"p{i}", torch.randn(s, generator=gen, dtype=d)) for i, (s, d) in
             enumerate(zip(shapes, [torch.float32, torch.bfloat16] * 3))]
    manifest = plan_buckets(named, bucket_bytes=512, version=7)
    assert Manifest.from_bytes(manifest.to_bytes()) == manifest
    assert len(manifest.buckets) >= 3  # split by dtype and by size; 1000 floats alone
    dtypes = {n: str(t.dtype).removeprefix("torch.") for n, t in named}
    for b in manifest.buckets:  # one dtype per bucket, at most 512 bytes unless one tensor
        assert {dtypes[e.name] for e in b.entries} == {b.dtype}
        assert b.num_bytes <= 512 or len(b.entries) == 1
    got = {}
    for b in manifest.buckets:
        buf = torch.empty(b.numel, dtype=getattr(torch, b.dtype))
        got.update(unpack(b, pack(b, dict(named), buf).clone()))
    assert set(got) == {n for n, _ in named}
    for name, t in named:
        assert got[name].dtype == t.dtype and torch.equal(got[name], t)


def test_plan_buckets_rejects_integer_tensors():
    with pytest.raises(TypeError, match="p0.*int64"):
        plan_buckets([("p0", torch.zeros(3, dtype=torch.int64))], 1024, 0)


def test_check_manifest_names_the_bad_tensor(qwen2):
    from brorl.engine import Engine

    engine = Engine(qwen2[0], page_size=4, max_kv_tokens=256)
    named = list(qwen2[1].named_parameters())
    check_manifest(engine, plan_buckets(named, 1 << 20, 1))
    bad = [(n, torch.zeros(3) if n == "model.norm.weight" else p) for n, p in named]
    with pytest.raises(ValueError, match="model.norm.weight.*shape"):
        check_manifest(engine, plan_buckets(bad, 1 << 20, 1))
    with pytest.raises(ValueError, match="missing parameters"):
        check_manifest(engine, plan_buckets(named[1:], 1 << 20, 1))


# -- two processes ---------------------------------------------------------------------
def _receiver(path, port, mode, queue, shm_dir, joining):
    """A rollout worker: one engine, receives syncs; reports what it saw on `queue`.
    shm_dir None: no shared memory; else the directory it looks for the sender's in.
    Sets `joining` once its imports and engine are done, just before it joins."""
    torch.set_num_threads(1)
    from brorl.engine import Engine, SamplingParams

    engine = Engine(path, page_size=4, max_kv_tokens=1024)
    greedy = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    joining.set()
    rx = make_receiver("gloo", engine, host="127.0.0.1", port=port, rank=1, world_size=2,
                       timeout_s=TIMEOUT_S, shared_memory=shm_dir is not None,
                       shm_dir=shm_dir)
    report = {"before": engine.generate([PROMPT], greedy)[0].outputs[0].token_ids}
    if mode == "die":  # the manifest and one bucket arrive, then the process dies
        from brorl.trainer.weight_sync.sync import _agree, _recv_bytes

        manifest = Manifest.from_bytes(_recv_bytes(rx.channel))
        _agree(rx.channel, None, "manifest")
        sizes = [b.num_bytes for b in manifest.buckets]
        if rx.channel.shared_buffers(sizes) is not None:
            rx.channel.notify(0)
        else:
            rx.channel.broadcast(torch.empty(sizes[0], dtype=torch.uint8), 0)
        os._exit(3)
    refusals = []
    for _ in range(2 if mode == "refuse" else 0):
        try:
            rx.receive()
        except ManifestRefused as err:
            refusals.append(str(err))
        report.setdefault("after_refusals", []).append(
            (engine.generate([PROMPT], greedy)[0].outputs[0].token_ids,
             engine.stats()["policy_version"]))
    report["refusals"] = refusals
    if mode == "grow":  # a first, smaller (bf16) sync before the float32 one
        report["first_version"] = rx.receive()
    report["version"] = rx.receive()
    report["after"] = engine.generate([PROMPT], greedy)[0].outputs[0].token_ids
    # numpy, not a tensor: torch's queue would pass a tensor as a file descriptor that the
    # parent fetches from this process, which may have exited by then (ConnectionReset)
    report["logits"] = engine_logits(engine, PROMPT).numpy()
    queue.put(report)
    rx.close()


def _start(path, mode, shm_dir):
    """The receiver process, once it is about to join: the sender's join timeout (8 s in
    the kill test) then never counts the spawn and imports of a loaded machine."""
    ctx = mp.get_context("spawn")
    queue, port, joining = ctx.Queue(), free_port(), ctx.Event()
    proc = ctx.Process(target=_receiver, args=(path, port, mode, queue, shm_dir, joining),
                       daemon=True)
    proc.start()
    assert joining.wait(120), "the receiver process did not start"
    return proc, queue, port


@pytest.fixture(params=["shm", "tcp"])
def shm_dir(request, tmp_path):
    """Where both ends stage buckets ("shm": a fresh directory), or None ("tcp")."""
    return str(tmp_path) if request.param == "shm" else None


def _sender(port, shm_dir, timeout_s=TIMEOUT_S, bucket_bytes=40_000):
    return make_sender("gloo", host="127.0.0.1", port=port, world_size=2, timeout_s=timeout_s,
                       bucket_bytes=bucket_bytes, shared_memory=shm_dir is not None,
                       shm_dir=shm_dir)


@pytest.fixture(scope="module")
def trainer_model(tmp_path_factory):
    """The trainer's 'new' weights: another random model of the same architecture."""
    return make_checkpoint(tmp_path_factory.mktemp("new"), "qwen2", seed=1)


def test_gloo_sync_makes_engine_generate_like_transformers(qwen2, trainer_model, shm_dir):
    proc, queue, port = _start(qwen2[0], "ok", shm_dir)
    tx = _sender(port, shm_dir)  # 40 kB buckets: several of them
    stats = tx.send(list(trainer_model.named_parameters()), version=5)
    report = queue.get(timeout=60)
    proc.join(30)
    tx.close()
    assert stats["buckets"] > 2
    assert stats["shared_memory"] == (shm_dir is not None)
    if shm_dir is not None:  # the segment's name was unlinked once the receiver mapped it
        assert os.listdir(shm_dir) == []
    assert report["version"] == 5
    expected, _ = hf_greedy(trainer_model, PROMPT, MAX_NEW)
    old, _ = hf_greedy(qwen2[1], PROMPT, MAX_NEW)
    assert report["before"] == old and expected != old  # the test can tell them apart
    assert report["after"] == expected
    engine_side = torch.from_numpy(report["logits"])
    assert probe_diff(engine_side, trainer_logits(trainer_model, PROMPT), 1e-5) < 1e-5


def test_bad_manifest_is_refused_and_leaves_engine_unchanged(qwen2, trainer_model, shm_dir):
    proc, queue, port = _start(qwen2[0], "refuse", shm_dir)
    tx = _sender(port, shm_dir)
    named = list(trainer_model.named_parameters())
    wrong_shape = [(n, p[:-1] if n.endswith("layers.1.mlp.up_proj.weight") else p)
                   for n, p in named]
    with pytest.raises(ManifestRefused, match="layers.1.mlp.up_proj.weight.*shape"):
        tx.send(wrong_shape, version=1)
    missing = [(n, p) for n, p in named if n != "model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(ManifestRefused, match="missing.*layers.0.self_attn.k_proj.weight"):
        tx.send(missing, version=2)
    tx.send(named, version=3)  # the group is still usable after refusals
    report = queue.get(timeout=60)
    proc.join(30)
    tx.close()
    assert len(report["refusals"]) == 2
    assert report["after_refusals"] == [(report["before"], 0)] * 2
    assert report["version"] == 3
    assert report["after"] == hf_greedy(trainer_model, PROMPT, MAX_NEW)[0]


def test_receiver_killed_mid_sync_is_a_clear_error_and_trainer_state_survives(
        qwen2, trainer_model, tmp_path, shm_dir):
    proc, _, port = _start(qwen2[0], "die", shm_dir)
    timeout = 8.0
    tx = _sender(port, shm_dir, timeout_s=timeout, bucket_bytes=20_000)
    before = {k: v.clone() for k, v in trainer_model.state_dict().items()}
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match="rollout worker rank.*1.*timeout 8 s") as err:
        tx.send(list(trainer_model.named_parameters()), version=1)
    assert "Connection" in str(err.value) or "timed out" in str(err.value).lower()
    assert time.monotonic() - start < timeout + 5
    proc.join(10)
    assert proc.exitcode == 3
    tx.close()
    # the trainer's weights are intact and a checkpoint still saves and loads
    trainer_model.save_pretrained(str(tmp_path / "ckpt"))
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"))
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, before[k])


def test_receiver_that_cannot_map_shared_memory_falls_back_to_tcp(
        qwen2, trainer_model, tmp_path, caplog):
    """The receiver looks in another directory (as on another machine): the group agrees
    to send over TCP and the sync is exact."""
    (tmp_path / "sender").mkdir()
    (tmp_path / "receiver").mkdir()
    proc, queue, port = _start(qwen2[0], "ok", str(tmp_path / "receiver"))
    tx = _sender(port, str(tmp_path / "sender"))
    with caplog.at_level("WARNING", logger="brorl"):
        stats = tx.send(list(trainer_model.named_parameters()), version=2)
    report = queue.get(timeout=60)
    proc.join(30)
    assert not stats["shared_memory"]
    assert not tx.channel.shared_memory or tx.channel._shm_off
    tx.close()
    assert "cannot map shared memory" in caplog.text
    assert os.listdir(tmp_path / "sender") == []  # the unused segment did not outlive it
    assert report["version"] == 2
    assert report["after"] == hf_greedy(trainer_model, PROMPT, MAX_NEW)[0]


def test_shared_segment_grows_when_a_sync_needs_more_room(qwen2, trainer_model, tmp_path):
    proc, queue, port = _start(qwen2[0], "grow", str(tmp_path))
    tx = _sender(port, str(tmp_path))
    named = list(trainer_model.named_parameters())
    tx.dtype = "bfloat16"
    first = tx.send(named, version=1)
    generation = tx.channel._segment.generation
    tx.dtype = None  # float32: twice the bytes, a new segment
    second = tx.send(named, version=2)
    report = queue.get(timeout=60)
    proc.join(30)
    assert first["shared_memory"] and second["shared_memory"]
    assert second["bytes"] == 2 * first["bytes"]
    assert tx.channel._segment.generation == generation + 1
    tx.close()
    assert os.listdir(tmp_path) == []
    assert (report["first_version"], report["version"]) == (1, 2)
    assert report["after"] == hf_greedy(trainer_model, PROMPT, MAX_NEW)[0]
    engine_side = torch.from_numpy(report["logits"])
    assert probe_diff(engine_side, trainer_logits(trainer_model, PROMPT), 1e-5) < 1e-5


def test_shared_segment_views_are_aligned_and_disjoint(tmp_path):
    from brorl.trainer.weight_sync import shm

    sizes = [10, 0, 64, 130, 7]
    offsets, total = shm.aligned_offsets(sizes)
    assert offsets == [0, 64, 64, 128, 320] and total == 384
    seg = shm.Segment.create(str(tmp_path), "t", 1, total)
    other = shm.Segment.attach(str(tmp_path), "t", 1, total)  # a second mapping
    seg.unlink()
    assert os.listdir(tmp_path) == []
    for i, v in enumerate(seg.views(sizes)):
        v.fill_(i + 1)
    got = other.views(sizes)  # what another process would see
    for i, v in enumerate(got):
        assert v.numel() == sizes[i] and bool((v == i + 1).all())
        assert v.data_ptr() % shm.ALIGN == 0 or v.numel() == 0
    with pytest.raises(ValueError, match="do not fit"):
        seg.views([total + 1])
    with pytest.raises(OSError):
        shm.Segment.attach(str(tmp_path), "t", 2, total)


# -- the probe check in the embedded loop ------------------------------------------------
def _embedded_run(engine_path, model):
    import types

    from brorl.engine import Engine
    from brorl.trainer.config_load import load_config
    from brorl.trainer.parallel import SINGLE

    cfg = load_config(None, ["rollout.weight_sync_probe=true"])
    return types.SimpleNamespace(engine=Engine(engine_path, page_size=4, max_kv_tokens=256),
                                 model=model, cfg=cfg, dp=SINGLE)


def test_embedded_sync_logs_a_probe_difference_under_1e5(qwen2, trainer_model):
    from brorl.trainer.loop import sync_weights

    run = _embedded_run(qwen2[0], trainer_model)
    out = sync_weights(run, step=4)
    assert out["weight_sync/probe_max_abs_diff"] < 1e-5
    assert run.engine.stats()["policy_version"] == 4


def test_probe_warns_when_engine_runs_other_weights(qwen2, trainer_model, caplog):
    from brorl.trainer.weight_sync.probe import probe_check

    run = _embedded_run(qwen2[0], trainer_model)  # engine still has the old weights
    with caplog.at_level("WARNING", logger="brorl"):
        diff = probe_check(run.engine, run.model, "float32")
    assert diff > 1e-2
    assert "weight sync probe" in caplog.text


def test_probe_diff_is_the_max_abs_difference_over_every_engine_position_and_token(caplog):
    """Against a plain loop: W engines' [T, vocab] logits, one entry of the last engine
    off by 0.25; the warning comes past the threshold only (equal is fine), and a NaN
    anywhere is reported as NaN with a warning."""
    import math

    gen = torch.Generator().manual_seed(3)
    trainer_side = torch.randn(5, 11, generator=gen)
    engines = trainer_side + 1e-6 * torch.randn(3, 5, 11, generator=gen)
    engines[2, 4, 7] = trainer_side[4, 7] - 0.25
    want = max(abs(float(engines[w, t, v] - trainer_side[t, v]))
               for w in range(3) for t in range(5) for v in range(11))
    for threshold, warns in ((0.3, False), (want, False), (0.1, True)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="brorl"):
            assert probe_diff(engines, trainer_side, threshold) == pytest.approx(want)
        assert ("weight sync probe" in caplog.text) == warns, threshold
    assert probe_diff(engines[0], trainer_side, 1.0) < 1e-5  # one engine: [T, vocab]
    engines[1, 0, 0] = float("nan")
    with caplog.at_level("WARNING", logger="brorl"):
        assert math.isnan(probe_diff(engines, trainer_side, 1.0))
    assert "differ by nan" in caplog.text
    with pytest.raises(ValueError, match="shapes differ"):
        probe_diff(engines[:, :4], trainer_side, 1.0)


@pytest.mark.gpu
def test_nccl_channel_world_size_one_sends_through_the_protocol(qwen2):
    pytest.importorskip("cupy")
    tx = make_sender("nccl", host="127.0.0.1", port=free_port(), world_size=1, timeout_s=30,
                     bucket_bytes=20_000, dtype="bfloat16", device="cuda")
    t = torch.arange(5, dtype=torch.int64, device="cuda")
    tx.channel.allreduce_max(t)
    tx.channel.broadcast(t, src=0)
    assert t.tolist() == [0, 1, 2, 3, 4]
    named = [(n, p.cuda()) for n, p in qwen2[1].named_parameters()]
    stats = tx.send(named, version=2)
    assert stats["buckets"] > 2
    assert stats["bytes"] == sum(p.numel() * 2 for _, p in named)
    tx.close()


def _fake_cupy(monkeypatch, comms: list):
    """cupy.cuda.nccl stand-ins: NcclCommunicator records (world, uid, rank)."""
    import contextlib
    import sys
    import types

    nccl = types.SimpleNamespace(get_unique_id=lambda: bytes(range(128)),
                                 NcclCommunicator=lambda *a: comms.append(a) or object())
    cuda = types.SimpleNamespace(nccl=nccl, Device=lambda i: contextlib.nullcontext())
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cuda))
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)


def test_nccl_channel_refuses_to_enter_nccl_init_until_every_rank_joined(monkeypatch):
    """NCCL's own init waits forever for a rank that never comes: rank 0 alone (rank 1
    never starts) fails within its timeout, naming rank 1, without entering it; two ranks
    both enter it, with rank 0's unique id."""
    import threading

    from brorl.trainer.weight_sync.channel import NcclChannel

    comms = []
    _fake_cupy(monkeypatch, comms)
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"rank\(s\) \[1\] did not join"):
        NcclChannel("127.0.0.1", free_port(), 0, 2, timeout_s=1.5, device="cuda:0")
    assert time.monotonic() - start < 10
    assert comms == []
    port, errors = free_port(), []

    def join(rank):
        try:
            NcclChannel("127.0.0.1", port, rank, 2, timeout_s=30, device="cuda:0")
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=join, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(c[2] for c in comms) == [0, 1]
    assert all(c[:2] == (2, bytes(range(128))) for c in comms)
