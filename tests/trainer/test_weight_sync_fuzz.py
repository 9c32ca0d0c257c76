"""Weight sync against plain references, on random inputs (seeded):

- bucket planning, packing and unpacking of random parameter sets (mixed float dtypes,
  zero-element and scalar tensors, non-contiguous views, names sharing storage, tensors
  larger than a bucket, bucket sizes that are no multiple of the element size) give back
  every tensor bit for bit, alone and over gloo (ranks as threads of this process, each
  receiver's model listing the names in another order), through shared memory and TCP;
- every kind of bad manifest (missing, extra or misshapen tensor, an integer dtype, a
  version older than the engine's, a layout whose entries overlap, another format, bytes
  that are no manifest) is refused on every rank with its reason, and leaves a real engine
  exactly as it was: every weight, the packed matrices, the KV pool, the prefix cache and
  the policy version;
- a receiver whose manifest check or weight application fails for any reason is a refusal
  the sender hears of at once, not a wait for the group's timeout;
- a receiver process stopped (SIGSTOP) or killed (SIGKILL) mid-sync: the sender raises a
  WeightSyncError within the timeout, no shared-memory file is left behind even before
  the sender is closed, and the loop's sync_weights still writes a checkpoint of the
  trainer's state that loads back exactly.
"""

import json
import multiprocessing as mp
import os
import random
import signal
import threading
import time

import pytest
import torch

from brorl.engine.models.weights import ParamSlot, validate_named_tensors
from brorl.trainer.weight_sync import ManifestRefused, WeightSyncError
from brorl.trainer.weight_sync.channel import GlooChannel, free_port
from brorl.trainer.weight_sync.protocol import (
    Manifest,
    check_manifest,
    dtype_of,
    pack,
    plan_buckets,
    unpack,
)
from brorl.trainer.weight_sync.sync import WeightReceiver, WeightSender, _agree, _send_bytes

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
JOIN_S = 60  # bound on any thread or process a test waits for (2 shared cores)


# -- plain references ------------------------------------------------------------------
def _bytes(t: torch.Tensor) -> bytes:
    """The tensor's values as bytes, in row-major order (the reference of a round trip)."""
    if not t.numel():
        return b""
    fresh = torch.empty(t.shape, dtype=t.dtype).copy_(t)  # row-major strides, even size 1
    return fresh.view(-1).view(torch.uint8).numpy().tobytes()


def _random_params(seed: int) -> list[tuple[str, torch.Tensor]]:
    """1-12 tensors of random float dtypes and shapes, some scalar, some with no element,
    some transposed or strided views, some the very tensor (or a view of the storage) of
    an earlier name (tied weights)."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    out: list[tuple[str, torch.Tensor]] = []
    for i in range(rng.randint(1, 12)):
        dtype, kind = rng.choice(DTYPES), rng.random()
        if kind < 0.1:
            shape: tuple[int, ...] = ()
        elif kind < 0.2:
            shape = (0, rng.randint(1, 4))
        else:
            shape = tuple(rng.randint(1, 40) for _ in range(rng.randint(1, 3)))
        t = (3 * torch.randn(shape, generator=gen)).to(dtype)
        view = rng.random()
        if view < 0.15 and t.dim() >= 2:
            t = t.transpose(0, 1)
        elif view < 0.25 and t.dim() >= 1:
            t = (3 * torch.randn((2 * t.shape[0], *t.shape[1:]), generator=gen)).to(dtype)[::2]
        elif view < 0.35 and out:
            t = out[rng.randrange(len(out))][1]  # the same tensor under a second name
        elif view < 0.4 and out and out[-1][1].numel() > 2:
            t = out[-1][1].reshape(-1)[1:]  # a view into an earlier name's storage
        out.append((f"model.layers.{i}.w{rng.randint(0, 9)}", t))
    return out


class _FakeModel:
    def __init__(self, spec: list[tuple[str, tuple[int, ...]]]) -> None:
        self.slots = {n: ParamSlot(n, 0, s[0] if s else 1, tuple(s)) for n, s in spec}


class FakeEngine:
    """What the receiver needs of an engine: `model.slots` to check a manifest against,
    `policy_version`, and `update_weights`, which validates like the engine and keeps a
    copy of what it was given."""

    device = torch.device("cpu")

    def __init__(self, spec: list[tuple[str, tuple[int, ...]]]) -> None:
        self.model = _FakeModel(spec)
        self.policy_version = 0
        self.applied: dict[str, torch.Tensor] = {}

    def update_weights(self, named, version=None) -> None:
        checked = validate_named_tensors(self.model.slots, named, require_all=False)
        self.applied = {slot.name: t.clone() for slot, t in checked}
        self.policy_version = int(version)


def _group(world_size: int, shm_dir: str | None, timeout_s: float = 30.0):
    """GlooChannels of one group, every rank a thread of this process."""
    port, channels, errors = free_port(), [None] * world_size, []

    def join(rank):
        try:
            channels[rank] = GlooChannel("127.0.0.1", port, rank, world_size, timeout_s,
                                         shared_memory=shm_dir is not None,
                                         shm_dir=shm_dir or "/nonexistent")
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=join, args=(r,), daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
    assert not errors and all(channels), errors
    return channels


def _serve(receiver: WeightReceiver, times: int, results: list) -> threading.Thread:
    """A thread that runs `times` receives, appending each version or exception."""
    def loop():
        for _ in range(times):
            try:
                results.append(receiver.receive())
            except Exception as err:  # noqa: BLE001 - the test inspects it
                results.append(err)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def _segments(directory) -> list[str]:
    return [f for f in os.listdir(directory) if f.startswith("brorl-weight-sync")]


# -- the protocol alone ------------------------------------------------------------------
@pytest.mark.parametrize("cast", [None, "bfloat16", "float64"])
def test_random_parameter_sets_round_trip_bit_exactly(cast):
    bucket_sizes = (1, 3, 7, 13, 100, 1000, 4099, 1 << 20)
    for seed in range(80):
        named = _random_params(seed)
        bucket_bytes = bucket_sizes[seed % len(bucket_sizes)]
        planned = named if cast is None else [
            (n, torch.empty(t.shape, dtype=dtype_of(cast), device="meta")) for n, t in named]
        manifest = plan_buckets(planned, bucket_bytes, version=seed)
        assert Manifest.from_bytes(manifest.to_bytes()) == manifest
        entries = manifest.entries()
        assert sorted(e.name for e, _ in entries) == sorted(n for n, _ in named)
        for b in manifest.buckets:  # contiguous, in its bucket, small unless one tensor
            ends = [0] + [e.offset + e.numel for e in b.entries]
            assert [e.offset for e in b.entries] == ends[:-1] and ends[-1] == b.numel
            assert b.num_bytes <= bucket_bytes or len(b.entries) == 1
        spec = [(n, tuple(t.shape)) for n, t in named]
        check_manifest(FakeEngine(random.Random(seed).sample(spec, len(spec))), manifest)
        got = {}
        for b in manifest.buckets:  # the bytes as they would arrive: a fresh uint8 copy
            wire = pack(b, dict(named), torch.empty(b.numel, dtype=dtype_of(b.dtype)))
            got.update(unpack(b, wire.clone()))
        for name, t in named:
            want = t if cast is None else t.to(dtype_of(cast))
            assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
            assert _bytes(got[name]) == _bytes(want), (seed, name)


def test_check_manifest_refuses_a_layout_that_is_not_the_senders():
    named = [("a", torch.zeros(4, 3)), ("b", torch.zeros(5))]
    engine = FakeEngine([(n, tuple(t.shape)) for n, t in named])
    tree = json.loads(plan_buckets(named, 1 << 20, 1).to_bytes())
    check_manifest(engine, Manifest.from_bytes(json.dumps(tree).encode()))
    for entry, fix, match in (
            (1, lambda e: e.__setitem__(2, 10), "overlap"),  # b starts inside a
            (1, lambda e: e.__setitem__(2, 13), "leave its 17-element bucket"),
            (0, lambda e: e.__setitem__(3, 11), "11 elements for shape"),
            (0, lambda e: e.__setitem__(1, [-4, -3]), "for shape")):
        bad = json.loads(json.dumps(tree))
        fix(bad["buckets"][0]["entries"][entry])
        with pytest.raises(ValueError, match=match):
            check_manifest(engine, Manifest.from_bytes(json.dumps(bad).encode()))


def test_error_messages_name_the_peers_of_each_rank():
    import types

    from brorl.trainer.weight_sync.channel import Channel

    def peers(rank, world_size):
        return Channel.peers(types.SimpleNamespace(rank=rank, world_size=world_size))

    assert peers(0, 3) == "rollout worker rank(s) 1, 2"
    assert peers(1, 2) == "trainer rank 0"  # was "trainer rank 0 " (a trailing blank)
    assert peers(2, 4) == "trainer rank 0, rollout worker rank(s) 1, 3"  # was "rank 0 1, 3"
    assert peers(0, 1) == ""


def test_a_segment_that_cannot_be_sized_or_mapped_leaves_no_file(tmp_path, monkeypatch):
    from brorl.trainer.weight_sync import shm

    def no_room(*args, **kwargs):
        raise OSError(28, "No space left on device")

    for target in ("os.posix_fallocate", "torch.from_file"):
        with monkeypatch.context() as m:
            m.setattr(target, no_room)
            with pytest.raises(OSError, match="No space"):
                shm.Segment.create(str(tmp_path), "t", 1, 4096)
        assert os.listdir(tmp_path) == [], target


def test_a_full_shm_directory_is_a_fallback_to_tcp_not_a_sigbus(tmp_path, monkeypatch,
                                                              caplog):
    """The segment's memory is reserved when it is made (posix_fallocate), so a directory
    that has filled up since `fits` looked (Ray's object store shares /dev/shm) is an
    ENOSPC there, and the sync goes over TCP, instead of a sparse file whose pages would
    be missing when the buckets are packed into it (SIGBUS, the trainer killed)."""
    import errno

    reserved = []

    def full(fd, offset, length):
        reserved.append(length)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.posix_fallocate", full)
    named = [("a", torch.randn(300, 7))]
    engine = FakeEngine([("a", (300, 7))])
    channels = _group(2, str(tmp_path))
    results = []
    thread = _serve(WeightReceiver(channels[1], engine), 1, results)
    with caplog.at_level("WARNING", logger="brorl"):
        stats = WeightSender(channels[0]).send(named, version=1)
    thread.join(JOIN_S)
    for c in channels:
        c.close()
    assert reserved == [8448]  # 8400 bytes on 64-byte boundaries, reserved up front
    assert results == [1] and not stats["shared_memory"]
    assert "no shared-memory segment" in caplog.text and "No space" in caplog.text
    assert torch.equal(engine.applied["a"], named[0][1])
    assert os.listdir(tmp_path) == []


# -- over gloo, ranks as threads ---------------------------------------------------------
@pytest.mark.parametrize("mode", ["shm", "tcp"])
def test_random_parameter_sets_sync_bit_exactly_over_gloo(mode, tmp_path):
    """Two receivers whose models list the names in other orders; two syncs per group,
    the second in the reverse order and cast to bfloat16 (other bucket sizes)."""
    for seed in range(4):
        named = _random_params(100 + seed)
        spec = [(n, tuple(t.shape)) for n, t in named]
        shm_dir = str(tmp_path) if mode == "shm" else None
        channels = _group(3, shm_dir)
        engines = [FakeEngine(random.Random(seed + k).sample(spec, len(spec)))
                   for k in range(2)]
        results = [[], []]
        threads = [_serve(WeightReceiver(channels[k + 1], engines[k]), 2, results[k])
                   for k in range(2)]
        tx = WeightSender(channels[0], bucket_bytes=(1, 7, 300, 5000)[seed])
        stats = [tx.send(named, version=3)]
        snapshots = [dict(e.applied) for e in engines]
        tx.dtype = "bfloat16"
        stats.append(tx.send(list(reversed(named)), version=4))
        for t in threads:
            t.join(JOIN_S)
        tx.close()
        for c in channels[1:]:
            c.close()
        assert results == [[3, 4], [3, 4]]
        assert [s["shared_memory"] for s in stats] == [mode == "shm"] * 2
        assert _segments(tmp_path) == []
        for engine, first in zip(engines, snapshots):
            assert engine.policy_version == 4
            for name, t in named:
                assert first[name].dtype == t.dtype and _bytes(first[name]) == _bytes(t)
                cast = t.to(torch.bfloat16)
                assert _bytes(engine.applied[name]) == _bytes(cast), (seed, name)


def test_a_refusal_by_two_of_four_receivers_names_the_lowest_on_every_rank():
    """Rank 3 lacks a tensor, rank 4 has another shape, ranks 1-2 fit: the group refuses,
    every rank raises naming the lowest refusing rank (3) and its reason, the fitting
    engines are left as they were."""
    named = [("a", torch.randn(4, 3)), ("b", torch.randn(5))]
    spec = [(n, tuple(t.shape)) for n, t in named]
    engines = [FakeEngine(spec), FakeEngine(spec), FakeEngine(spec[:1] + [("c", (2,))]),
               FakeEngine([("a", (4, 3)), ("b", (6,))])]
    channels = _group(5, None)
    results = [[] for _ in engines]
    threads = [_serve(WeightReceiver(channels[k + 1], e), 1, results[k])
               for k, e in enumerate(engines)]
    with pytest.raises(ManifestRefused, match="rank 3 refused.*unknown parameter name 'b'"):
        WeightSender(channels[0]).send(named, version=1)
    for t in threads:
        t.join(JOIN_S)
    for r in results:
        assert len(r) == 1 and isinstance(r[0], ManifestRefused)
        assert "rank 3 refused" in str(r[0]) and "'b'" in str(r[0])
    assert all(e.applied == {} and e.policy_version == 0 for e in engines[:2])
    for c in channels:
        c.close()


@pytest.mark.parametrize("source", ["named_parameters", "state_dict"])
def test_tied_embeddings_sync_to_a_real_engine_exactly(tmp_path, source):
    """A tied model sends its embedding once (named_parameters) or under both names, one
    storage (state_dict); over gloo with bfloat16 packing the engine then computes the
    trainer's logits (its weights cast to bfloat16) to float32 rounding, and its tied
    head is the new embedding."""
    from brorl.engine import Engine
    from brorl.trainer.weight_sync.probe import engine_logits, probe_diff, trainer_logits
    from tests.helpers import make_checkpoint

    old = make_checkpoint(tmp_path / "old", "qwen2", seed=4, tie_word_embeddings=True)
    new = make_checkpoint(tmp_path / "new", "qwen2", seed=5, tie_word_embeddings=True)
    named = list(getattr(new, source)().items()) if source == "state_dict" else \
        list(new.named_parameters())
    assert ("lm_head.weight" in dict(named)) == (source == "state_dict")
    engine = Engine(str(tmp_path / "old"), page_size=4, max_kv_tokens=256)
    channels = _group(2, str(tmp_path))
    results = []
    thread = _serve(WeightReceiver(channels[1], engine), 1, results)
    WeightSender(channels[0], bucket_bytes=10_000, dtype="bfloat16").send(named, version=1)
    thread.join(JOIN_S)
    for c in channels:
        c.close()
    assert results == [1]
    with torch.no_grad():
        for p in new.parameters():
            p.copy_(p.to(torch.bfloat16))  # what the engine was sent
    ids = list(range(3, 19))
    assert probe_diff(engine_logits(engine, ids), trainer_logits(new, ids), 1e-4) < 1e-4
    assert probe_diff(engine_logits(engine, ids), trainer_logits(old, ids), 1e9) > 1e-2
    assert torch.equal(engine.model.params["embed"], new.model.embed_tokens.weight)


def _raw_send(channel, manifest_bytes: bytes) -> None:
    """What a sender of another version (or a broken one) does: a manifest, then waits
    for the verdict."""
    _send_bytes(channel, manifest_bytes)
    _agree(channel, None, "manifest")


def _edit(manifest: Manifest, fn) -> bytes:
    tree = json.loads(manifest.to_bytes())
    fn(tree)
    return json.dumps(tree).encode()


def _engine_state(engine) -> dict:
    return {"params": {k: v.clone() for k, v in engine.model.params.items()},
            "packed": dict(engine.model.packed),  # the same objects when nothing repacked
            "kv": (engine.kv.k.clone(), engine.kv.v.clone()),
            "holders": engine.cache.radix.page_holders(),
            "stats": {k: engine.stats()[k] for k in ("cached_pages", "free_pages",
                                                     "policy_version")}}


def _assert_same_state(before: dict, engine, what: str) -> None:
    after = _engine_state(engine)
    assert after["stats"] == before["stats"], what
    assert after["holders"] == before["holders"], what
    for k, v in before["params"].items():
        assert torch.equal(after["params"][k], v), (what, k)
    assert all(after["packed"][k] is v for k, v in before["packed"].items()), what
    assert all(torch.equal(a, b) for a, b in zip(after["kv"], before["kv"])), what


def test_every_bad_manifest_is_refused_and_leaves_the_engine_exactly_as_it_was(
        qwen2, tmp_path):
    from brorl.engine import Engine, SamplingParams

    path, hf = qwen2
    engine = Engine(path, page_size=4, max_kv_tokens=256)
    prompt = list(range(3, 23))
    engine.generate([prompt], SamplingParams(temperature=0, max_tokens=4))
    engine.policy_version = 5
    before = _engine_state(engine)
    assert before["stats"]["cached_pages"] > 0  # a flush would show
    named = [(n, p.detach() + 1) for n, p in hf.named_parameters()]  # other weights
    good = plan_buckets(named, 1 << 20, 6)  # one bucket: entries to overlap
    cases = [
        ("missing", plan_buckets(named[1:], 20_000, 6).to_bytes(),
         f"missing parameters.*{named[0][0]}"),
        ("extra", plan_buckets([*named, ("model.extra.weight", torch.zeros(2))], 20_000,
                               6).to_bytes(), "unknown parameter name 'model.extra.weight'"),
        ("shape", plan_buckets([(n, t[:-1] if n == "model.norm.weight" else t)
                                for n, t in named], 20_000, 6).to_bytes(),
         "model.norm.weight.*shape"),
        ("dtype", _edit(good, lambda m: m["buckets"][0].update(dtype="int32")),
         "unknown dtype 'int32'"),
        ("version", plan_buckets(named, 20_000, 4).to_bytes(), "version 4 is older.*5"),
        ("overlap", _edit(good, lambda m: m["buckets"][0]["entries"][1].__setitem__(2, 0)),
         "overlap"),
        ("format", _edit(good, lambda m: m.update(format=99)), "format 99"),
        ("garbage", b"\x00 not a manifest", "JSONDecodeError|Expecting value"),
    ]
    channels = _group(2, str(tmp_path))
    results = []
    thread = _serve(WeightReceiver(channels[1], engine), len(cases) + 1, results)
    for k, (what, data, match) in enumerate(cases):
        with pytest.raises(ManifestRefused, match=f"rank 1 refused.*{match}"):
            _raw_send(channels[0], data)
        while len(results) <= k:  # the receiver's side of the verdict
            time.sleep(0.01)
        assert isinstance(results[k], ManifestRefused), (what, results[k])
        _assert_same_state(before, engine, what)
    stats = WeightSender(channels[0], 20_000).send(named, version=6)  # the group still works
    thread.join(JOIN_S)
    for c in channels:
        c.close()
    assert results[-1] == 6 and stats["shared_memory"]
    assert engine.stats()["policy_version"] == 6 and engine.stats()["cached_pages"] == 0
    for n, t in named:  # fused rows: compare through the engine's own slots
        slot = engine.model.slots[n]
        assert torch.equal(engine.model.params[slot.name][slot.start:slot.start + slot.rows], t)
    assert _segments(tmp_path) == []


def test_a_receiver_failing_for_any_reason_is_a_refusal_not_a_timeout():
    """The receiver's check or apply raises something other than ValueError (a bug, an
    out-of-memory error): the sender hears the reason at once instead of waiting out the
    group's timeout, and every rank stays in step for the next sync."""
    named = [("a", torch.randn(4, 3)), ("b", torch.randn(5))]
    engine = FakeEngine([(n, tuple(t.shape)) for n, t in named])
    channels = _group(2, None, timeout_s=20.0)
    results = []
    thread = _serve(WeightReceiver(channels[1], engine), 3, results)
    tx = WeightSender(channels[0])
    apply = engine.update_weights

    def out_of_memory(named, version=None):
        raise RuntimeError("CUDA out of memory")

    engine.update_weights = out_of_memory
    with pytest.raises(ManifestRefused, match=r"\(apply\).*RuntimeError: CUDA out of memory"):
        tx.send(named, version=1)
    with pytest.raises(ManifestRefused, match=r"\(manifest\).*KeyError"):
        _raw_send(channels[0], _edit(plan_buckets(named, 1024, 2),
                                     lambda m: m["buckets"][0].pop("numel")))
    engine.update_weights = apply
    assert tx.send(named, version=3)["buckets"] == 1
    thread.join(JOIN_S)
    for c in channels:
        c.close()
    assert [type(r).__name__ for r in results] == ["ManifestRefused"] * 2 + ["int"]
    assert engine.policy_version == 3 and torch.equal(engine.applied["a"], named[0][1])


# -- a receiver process that stops or dies mid-sync ----------------------------------
SPEC = [(f"model.layers.{i}.w", (128, 512)) for i in range(6)]  # 6 x 256 kB in float32


def _receiver_process(port, shm_dir, stop_at, how, joining, ready, spec):
    """A rollout worker that stops (SIGSTOP) or blocks until killed at its `stop_at`-th
    broadcast (1-2: the manifest, 3: the shared-memory header, 4+: buckets)."""
    torch.set_num_threads(1)
    joining.set()  # imports done: the join itself takes milliseconds, not the timeout
    channel = GlooChannel("127.0.0.1", port, 1, 2, 60.0, shared_memory=shm_dir is not None,
                          shm_dir=shm_dir or "/nonexistent")
    broadcast, count = channel.broadcast, [0]

    def counted(t, src):
        count[0] += 1
        if count[0] == stop_at:
            ready.set()
            if how == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(600)  # until the test kills this process
        broadcast(t, src)

    channel.broadcast = counted
    WeightReceiver(channel, FakeEngine(spec)).receive()


def _start_receiver(shm_dir, stop_at, how, spec=SPEC):
    ctx = mp.get_context("spawn")
    port, joining, ready = free_port(), ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_receiver_process, args=(port, shm_dir, stop_at, how, joining,
                                                       ready, spec), daemon=True)
    proc.start()
    assert joining.wait(JOIN_S), "the receiver process did not start"
    return proc, port, ready


def _kill_when_ready(proc, ready, how) -> threading.Thread:
    def kill():
        if ready.wait(JOIN_S) and how == "kill":
            os.kill(proc.pid, signal.SIGKILL)

    t = threading.Thread(target=kill, daemon=True)
    t.start()
    return t


def _reap(proc) -> None:
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(JOIN_S)


@pytest.mark.parametrize("how,mode,stop_at", [("stop", "shm", 3), ("kill", "tcp", 5)])
def test_receiver_stopped_or_killed_mid_sync_fails_the_sync_within_the_timeout(
        how, mode, stop_at, tmp_path):
    """Stopped at the shared-memory header, before mapping the segment: the sender's
    broadcast times out, and the segment it had made is gone at once (not at close).
    Killed while a bucket is on its way: the sender sees the connection drop. Either way
    the trainer's tensors are untouched."""
    shm_dir = str(tmp_path) if mode == "shm" else None
    proc, port, ready = _start_receiver(shm_dir, stop_at, how)
    timeout = 5.0
    tx = WeightSender(GlooChannel("127.0.0.1", port, 0, 2, timeout,
                                  shared_memory=shm_dir is not None,
                                  shm_dir=shm_dir or "/nonexistent"), bucket_bytes=300_000)
    gen = torch.Generator().manual_seed(7)
    named = [(n, torch.randn(s, generator=gen)) for n, s in SPEC]
    before = [t.clone() for _, t in named]
    killer = _kill_when_ready(proc, ready, how)
    start = time.monotonic()
    try:
        with pytest.raises(WeightSyncError, match="rollout worker rank.*1.*timeout 5 s"):
            tx.send(named, version=1)
        elapsed = time.monotonic() - start
        assert ready.is_set()  # it failed where the receiver stopped, not before
        assert _segments(tmp_path) == []  # before close: nothing left if the trainer dies
    finally:
        killer.join(JOIN_S)
        _reap(proc)
        tx.close()
    assert elapsed < JOIN_S  # bounded: the timeout, or the dropped connection
    assert all(torch.equal(t, b) for (_, t), b in zip(named, before))
    assert proc.exitcode == -signal.SIGKILL


class _SenderEngine:
    """The engine the loop sees when its rollout worker is in another process: weights go
    through a gloo WeightSender (as RayEngines does, without Ray)."""

    def __init__(self, path: str, sender: WeightSender) -> None:
        from brorl.engine.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(path)
        self.sender = sender
        self.policy_version = 0

    def update_weights(self, named, version=None) -> None:
        self.sender.send(named, version)
        self.policy_version = version


def test_loop_checkpoints_the_trainer_state_when_a_receiver_dies_mid_sync(
        tiny_policy, tmp_path):
    from brorl.trainer.checkpoint import latest_checkpoint, load_state
    from brorl.trainer.loop import setup, sync_weights
    from brorl.trainer.policy import load_policy
    from tests.trainer.test_loop import _cfg

    spec = [(n, tuple(p.shape)) for n, p in load_policy(tiny_policy).named_parameters()]
    proc, port, ready = _start_receiver(None, 5, "kill", spec)
    sender = WeightSender(GlooChannel("127.0.0.1", port, 0, 2, 20.0, shared_memory=False),
                          bucket_bytes=4096)
    killer = _kill_when_ready(proc, ready, "kill")
    cfg = _cfg(tiny_policy, tmp_path / "run", steps=3)
    run = setup(cfg, None, make_engine=lambda path, cfg: _SenderEngine(path, sender))
    with torch.no_grad():
        for p in run.model.parameters():  # a trained state that differs from the policy's
            p.add_(0.01)
    trained = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    try:
        with pytest.raises(WeightSyncError, match="rollout worker rank.*1"):
            sync_weights(run, step=1)
    finally:
        killer.join(JOIN_S)
        _reap(proc)
        sender.close()
        run.pool.close()
        run.metrics.close()
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt is not None and ckpt.name == "step-000001"
    assert load_state(ckpt)["step"] == 1
    reloaded = load_policy(str(ckpt))
    for n, p in reloaded.named_parameters():
        assert torch.equal(p, trained[n]), n


def test_inprocess_sender_refuses_what_a_receiver_refuses_and_changes_nothing(qwen2):
    """The embedded transport checks like the others: a partial state (which
    Engine.update_weights alone would apply), an integer tensor or an older version is
    refused with the engine exactly as it was; a whole state applies and flushes."""
    from brorl.engine import Engine, SamplingParams
    from brorl.trainer.weight_sync import make_sender

    path, hf = qwen2
    engine = Engine(path, page_size=4, max_kv_tokens=256)
    engine.generate([list(range(3, 23))], SamplingParams(temperature=0, max_tokens=4))
    engine.policy_version = 2
    before = _engine_state(engine)
    named = [(n, p.detach() + 1) for n, p in hf.named_parameters()]
    tx = make_sender("inprocess", engine)
    for bad, version, match in (
            (named[:-1], 3, "missing parameters"),
            ([(n, t.long()) if n == "model.norm.weight" else (n, t) for n, t in named], 3,
             "model.norm.weight.*int64"),
            (named, 1, "version 1 is older")):
        with pytest.raises(ManifestRefused, match=match):
            tx.send(bad, version=version)
        _assert_same_state(before, engine, match)
    assert tx.send(named, version=3)["bytes"] == sum(t.numel() * 4 for _, t in named)
    assert engine.stats()["policy_version"] == 3 and engine.stats()["cached_pages"] == 0
    slot = engine.model.slots["model.norm.weight"]
    assert torch.equal(engine.model.params[slot.name], dict(named)["model.norm.weight"])


def _sender_process(port, shm_dir, die_at, joining):
    """A trainer that SIGKILLs itself at its `die_at`-th broadcast (3: the shared-memory
    header, 4+: the per-bucket notices)."""
    torch.set_num_threads(1)
    joining.set()
    channel = GlooChannel("127.0.0.1", port, 0, 2, 60.0, shared_memory=True, shm_dir=shm_dir)
    broadcast, count = channel.broadcast, [0]

    def counted(t, src):
        count[0] += 1
        if count[0] == die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        broadcast(t, src)

    channel.broadcast = counted
    gen = torch.Generator().manual_seed(1)
    WeightSender(channel, bucket_bytes=300_000).send(
        [(n, torch.randn(s, generator=gen)) for n, s in SPEC], version=1)


def test_sender_killed_mid_sync_leaves_the_receivers_engine_unchanged(tmp_path):
    """The trainer dies after two buckets reached the shared segment: the worker raises a
    WeightSyncError naming the trainer, its engine never saw an update_weights, and the
    segment's name is gone (it was unlinked once mapped)."""
    ctx = mp.get_context("spawn")
    port, joining = free_port(), ctx.Event()
    proc = ctx.Process(target=_sender_process, args=(port, str(tmp_path), 6, joining),
                       daemon=True)
    proc.start()
    assert joining.wait(JOIN_S)
    engine = FakeEngine(SPEC)
    calls = []
    engine.update_weights = lambda named, version=None: calls.append(version)
    rx = WeightReceiver(GlooChannel("127.0.0.1", port, 1, 2, 20.0, shared_memory=True,
                                    shm_dir=str(tmp_path)), engine)
    try:
        with pytest.raises(WeightSyncError, match="rank 1 of 2.*with trainer rank 0 failed"):
            rx.receive()
        assert rx.channel._segment is not None  # it got as far as the shared buckets
    finally:
        _reap(proc)
        rx.close()
    assert calls == [] and engine.policy_version == 0
    assert _segments(tmp_path) == []
    assert proc.exitcode == -signal.SIGKILL
