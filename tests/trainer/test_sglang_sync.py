"""The trainer's end of SGLang's distributed weight update (trainer/weight_sync/sglang.py)
against fake SGLang servers: each a spawned process whose receiving end is written from
SGLang's ModelRunner (a group built by torch's rendezvous + PrefixStore(group_name) +
_new_process_group_helper; per update, torch.empty per tensor, one async broadcast from
rank 0 each, wait for all, then load into the model, answering (ok, message)), reached from
this process through `SGLangEngine` over a pipe whose calls block as sglang.Engine's do.
Over gloo: synced engines generate what transformers generates with the new weights, over
several SGLang calls; names SGLang's loaders would skip are refused before anything is
sent; a load SGLang refuses is an error and the group stays usable; an engine that fails
before it receives ends the sync at once; an engine killed mid-sync is a clear error."""

import multiprocessing as mp
import os
import time
from datetime import timedelta

import pytest
import torch

from brorl.engine.backends.sglang import SGLangEngine
from brorl.trainer.weight_sync import ManifestRefused, WeightSyncError
from brorl.trainer.weight_sync.probe import probe_diff, trainer_logits
from brorl.trainer.weight_sync.sglang import SGLangSender
from tests.engine.test_models import hf_greedy
from tests.helpers import make_checkpoint

PROMPT = list(range(3, 23))
MAX_NEW = 8
TIMEOUT_S = 30.0


class _FakeModelRunner:
    """SGLang's receiving end of a distributed weight update, over our Engine. `mode`:
    "ok"; "oom" (the first update fails allocating its third tensor, after posting two
    broadcasts, as a CUDA out-of-memory would); "die" (the process exits once three
    tensors have arrived); "badload" (the first update's load fails once every tensor has
    arrived). Updates are staged and applied at the one that flushes the cache."""

    def __init__(self, engine, mode: str) -> None:
        self.engine, self.mode, self.groups, self.rank = engine, mode, {}, None
        self.staged, self.updates = [], []

    def init_weights_update_group(self, master_address, master_port, rank_offset, world_size,
                                  group_name, backend="nccl"):
        from torch.distributed import distributed_c10d as c10d

        try:
            timeout = timedelta(seconds=TIMEOUT_S)
            store, rank, size = next(c10d.rendezvous(
                f"tcp://{master_address}:{master_port}", rank_offset, world_size,
                timeout=timeout))
            store.set_timeout(timeout)
            group, _ = c10d._new_process_group_helper(
                size, rank, [], c10d.Backend(backend), c10d.PrefixStore(group_name, store),
                group_name=group_name, timeout=timeout)
            c10d._world.pg_group_ranks[group] = {i: i for i in range(size)}
            self.groups[group_name], self.rank = group, rank
            return True, "Succeeded to initialize custom process group."
        except Exception as err:  # noqa: BLE001 - SGLang answers failures
            return False, f"Failed to initialize custom process group: {err}."

    def update_weights_from_distributed(self, names, dtypes, shapes, group_name,
                                        flush_cache=True):
        group = self.groups[group_name]
        try:
            weights, handles = [], []
            for k, (name, dtype, shape) in enumerate(zip(names, dtypes, shapes)):
                if self.mode == "oom" and k == 2:
                    self.mode = "ok"
                    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
                weight = torch.empty(shape, dtype=getattr(torch, dtype))
                handles.append(torch.distributed.broadcast(weight, src=0, group=group,
                                                           async_op=True))
                weights.append((name, weight))
            for k, handle in enumerate(handles):
                handle.wait()
                if self.mode == "die" and k == 2:
                    os._exit(3)
            self.updates.append((len(names), flush_cache))
            if self.mode == "badload":
                self.mode = "ok"
                raise KeyError("model.layers.0.mlp.gate_proj.weight")
            self.staged += weights
            if flush_cache:  # our engine takes a whole state at once
                staged, self.staged = self.staged, []
                self.engine.update_weights(staged)  # checks names and shapes, flushes
            return True, "Succeeded to update parameter online."
        except Exception as err:  # noqa: BLE001
            return False, (f"Failed to update parameter online: {err}. The full weights of "
                           "the ModelRunner are partially updated.")

    def greedy(self):
        from brorl.engine import SamplingParams
        from brorl.trainer.weight_sync.probe import engine_logits

        greedy = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
        return {"tokens": self.engine.generate([PROMPT], greedy)[0].outputs[0].token_ids,
                "logits": engine_logits(self.engine, PROMPT).numpy(), "rank": self.rank,
                "updates": self.updates, "groups": sorted(self.groups)}

    def destroy_weights_update_group(self, group_name):
        torch.distributed.destroy_process_group(self.groups.pop(group_name))
        return True, "Succeeded to destroy custom process group."


def _http_front(runner) -> int:
    """SGLang's HTTP API over `runner` in this process (a thread per request, as SGLang
    answers: 200 or 400 with {"success", "message"}); returns the port."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            self._answer(200, {"tp_size": 1, "pp_size": 1, "dp_size": 1})

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            ok, message = getattr(runner, self.path.strip("/"))(**body)
            self._answer(200 if ok else 400, {"success": ok, "message": message})

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd.server_address[1]


def _serve(path, conn, mode, ready):
    torch.set_num_threads(1)
    from brorl.engine import Engine

    runner = _FakeModelRunner(Engine(path, page_size=4, max_kv_tokens=1024), mode)
    conn.send(_http_front(runner))
    ready.set()
    while True:
        method, kwargs = conn.recv()
        if method == "exit":
            return
        conn.send(getattr(runner, method)(**kwargs))


class _Client:
    """What the trainer's process holds, like sglang.Engine: each call blocks until the
    server process answers (EOFError once it is gone)."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.http_port = conn.recv()

    def _call(self, method, **kwargs):
        self.conn.send((method, kwargs))
        return self.conn.recv()

    def init_weights_update_group(self, **kwargs):
        return self._call("init_weights_update_group", **kwargs)

    def update_weights_from_distributed(self, **kwargs):
        return self._call("update_weights_from_distributed", **kwargs)

    def destroy_weights_update_group(self, **kwargs):
        return self._call("destroy_weights_update_group", **kwargs)

    def greedy(self):
        return self._call("greedy")


@pytest.fixture
def servers(qwen2):
    """start(*modes) -> one SGLangEngine per mode, each over its own server process."""
    ctx, procs = mp.get_context("spawn"), []

    def start(*modes, http=False):
        """http: the engines reach their servers over SGLang's HTTP API (SGLangServer)
        for the weight calls; the fake's own checks still go through the pipe."""
        out = []
        for mode in modes:
            here, there = ctx.Pipe()
            ready = ctx.Event()
            proc = ctx.Process(target=_serve, args=(qwen2[0], there, mode, ready),
                               daemon=True)
            proc.start()
            procs.append((proc, here))
            out.append((ready, SGLangEngine(qwen2[0], engine=_Client(here))))
        for ready, _ in out:
            assert ready.wait(120), "a fake SGLang server did not start"
        engines = [eng for _, eng in out]
        if http:
            from brorl.engine.backends.sglang_http import SGLangServer

            for eng in engines:
                client = eng._engine
                eng._engine = SGLangServer(f"http://127.0.0.1:{client.http_port}")
                eng._engine.greedy = client.greedy
        return engines

    yield start
    for proc, conn in procs:
        if proc.is_alive():
            conn.send(("exit", {}))
            proc.join(10)
        if proc.is_alive():
            proc.kill()


@pytest.fixture(scope="module")
def trainer_model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("new"), "qwen2", seed=1)


def _sender(engines, **kw):
    return SGLangSender(engines, backend="gloo", timeout_s=TIMEOUT_S, **kw)


def test_two_engines_synced_by_broadcast_generate_like_transformers(qwen2, trainer_model,
                                                                    servers):
    engines = servers("ok", "ok")
    tx = _sender(engines, bucket_bytes=20_000)  # several SGLang calls
    assert tx.world_size == 3 and tx.rank_offsets == [1, 2]
    named = list(trainer_model.named_parameters())
    stats = tx.send(named, version=5)
    assert stats["tensors"] == len(named) and stats["calls"] > 2
    assert stats["bytes"] == sum(p.numel() * 4 for _, p in named)
    expected, _ = hf_greedy(trainer_model, PROMPT, MAX_NEW)
    old, _ = hf_greedy(qwen2[1], PROMPT, MAX_NEW)
    assert expected != old  # the test can tell the weights apart
    reports = [e._engine.greedy() for e in engines]
    assert [r["rank"] for r in reports] == [1, 2]
    want = trainer_logits(trainer_model, PROMPT)
    for e, r in zip(engines, reports):
        assert e.policy_version == 5 and r["tokens"] == expected
        assert probe_diff(torch.from_numpy(r["logits"]), want, 1e-5) < 1e-5
        # every tensor once, in calls of at most 20 kB; only the last flushes the cache
        assert sum(k for k, _ in r["updates"]) == len(named)
        assert [f for _, f in r["updates"]] == [False] * (stats["calls"] - 1) + [True]
    assert reports[0]["groups"] == [tx.group_name]
    tx.close()  # SGLang drops its end too
    assert all(e._engine.greedy()["groups"] == [] for e in engines)


def test_a_sync_through_sglangs_http_api_generates_like_transformers(trainer_model,
                                                                     servers):
    (engine,) = servers("ok", http=True)
    assert engine.num_sync_ranks() == 1  # from GET /get_server_info
    tx = _sender([engine], bucket_bytes=50_000)
    named = list(trainer_model.named_parameters())
    assert tx.send(named, version=7)["calls"] > 1
    assert engine.policy_version == 7
    assert engine._engine.greedy()["tokens"] == hf_greedy(trainer_model, PROMPT, MAX_NEW)[0]
    tx.close()
    assert engine._engine.greedy()["groups"] == []  # POST /destroy_weights_update_group


def test_names_sglang_would_skip_are_refused_before_anything_is_sent(trainer_model,
                                                                      servers):
    """Many SGLang loaders log an unknown name and answer success: a wrapper's 'module.'
    prefix would leave the old weights in place under the new version."""
    (engine,) = servers("ok")
    tx = _sender([engine])
    named = list(trainer_model.named_parameters())
    with pytest.raises(ManifestRefused, match=r"not in .*checkpoint.*'module\.model"):
        tx.send([("module." + n, p) for n, p in named], version=3)
    with pytest.raises(ManifestRefused, match="model.norm.weight' has shape"):
        tx.send([(n, p[:3] if n == "model.norm.weight" else p) for n, p in named], version=3)
    assert engine._engine.greedy()["updates"] == [] and engine.policy_version == 0
    tx.send(named, version=4)  # nothing was sent: the group is in step
    assert engine.policy_version == 4
    tx.close()


def test_a_load_sglang_refuses_is_an_error_and_the_group_stays_in_step(qwen2, trainer_model,
                                                                       servers):
    (engine,) = servers("badload")
    tx = _sender([engine])
    named = list(trainer_model.named_parameters())
    with pytest.raises(WeightSyncError, match="Failed to update parameter online.*gate_proj"):
        tx.send(named, version=3)
    assert engine.policy_version == 0
    old, _ = hf_greedy(qwen2[1], PROMPT, MAX_NEW)
    assert engine._engine.greedy()["tokens"] == old
    tx.send(named, version=4)  # every broadcast had completed: the same group still works
    assert engine._engine.greedy()["tokens"] == hf_greedy(trainer_model, PROMPT, MAX_NEW)[0]
    assert engine.policy_version == 4
    tx.close()


def test_an_engine_failing_before_it_receives_ends_the_sync_at_once(qwen2, trainer_model,
                                                                    servers):
    (engine,) = servers("oom")
    tx = _sender([engine])
    named = list(trainer_model.named_parameters())
    before = {n: p.detach().clone() for n, p in named}
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match="out of memory"):
        tx.send(named, version=1)
    assert time.monotonic() - start < TIMEOUT_S / 2  # SGLang's answer, not the timeout
    with pytest.raises(WeightSyncError, match="build a new SGLangSender"):
        tx.send(named, version=1)  # its broadcasts are out of step with SGLang's
    tx.close()
    assert all(torch.equal(p, before[n]) for n, p in trainer_model.named_parameters())
    fresh = _sender([engine])  # a new group (a new name) with the same SGLang
    assert fresh.group_name != tx.group_name
    fresh.send(named, version=2)
    assert engine._engine.greedy()["tokens"] == hf_greedy(trainer_model, PROMPT, MAX_NEW)[0]
    fresh.close()


def test_an_engine_killed_mid_sync_is_a_clear_error(trainer_model, servers):
    (engine,) = servers("die")
    tx = _sender([engine])
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match="engine 0|gone"):
        tx.send(list(trainer_model.named_parameters()), version=1)
    assert time.monotonic() - start < TIMEOUT_S
    assert engine.policy_version == 0
    tx.close()


class _Refuses:
    def init_weights_update_group(self, **kwargs):
        return False, "Failed to initialize custom process group: NCCL error"


def test_a_refused_join_raises_sglangs_message_without_waiting(qwen2):
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match="engine 0 .*NCCL error"):
        SGLangSender([SGLangEngine(qwen2[0], engine=_Refuses())], backend="gloo",
                     timeout_s=5)
    assert time.monotonic() - start < 4


@pytest.mark.parametrize("kwargs, match", [
    ({"engines": []}, "at least one engine"),
    ({"tp_sizes": [1, 2]}, "one positive int per engine"),
    ({"tp_sizes": [0]}, "one positive int per engine"),
    ({"backend": "mpi"}, "unknown backend 'mpi'"),
    ({"timeout_s": 0}, "must be > 0"), ({"bucket_bytes": 0}, "must be > 0"),
    ({"dtype": "int8"}, "unknown dtype 'int8'"),
])
def test_bad_arguments_are_refused_before_anything_joins(qwen2, kwargs, match):
    kwargs = {"engines": [SGLangEngine(qwen2[0], engine=_Refuses())], **kwargs}
    with pytest.raises(ValueError, match=match):
        SGLangSender(kwargs.pop("engines"), **kwargs)
