"""Host <-> device synchronisations of one engine decode step on the GPU code path, counted
on the CPU.

The engine runs as it would on CUDA: the Triton attention backend (under TRITON_INTERPRET=1),
the Triton RMSNorm and RoPE kernels (the decoder picks them for CUDA tensors), torch's
F.linear and the fused Triton sampler. A TorchFunctionMode records every call that would
make the host wait for the GPU there:

- "d2h": reading device values on the host (item, tolist, bool/int/float of a tensor,
  numpy, cpu, printing) or an op whose output size depends on device values (nonzero,
  masked_select, boolean-mask indexing, unique). Always a sync.
- "h2d": a blocking copy of host data to the device: torch.tensor(..., device=...), a host
  tensor's .to(device) without non_blocking, indexing a device tensor with a Python list.
  From pageable memory torch waits for the stream (memcpy_and_sync), so on CUDA each one
  waits for every kernel queued before it.
- "h2d_async": a host tensor's .to(device, non_blocking=True); the engine pins such buffers
  on CUDA (kernels/transfer.py), so the copy is queued and nothing waits.

On the CPU every tensor is a host tensor, so "host tensor" means one made on the host
(torch.tensor without a device, torch.from_numpy, pin_memory). The Triton interpreter's own
copies of kernel arguments are not counted (on CUDA a launch copies nothing).
"""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from brorl.engine import Engine, SamplingParams
from tests.helpers import make_checkpoint

triton = pytest.importorskip("triton")

ROOT = str(Path(__file__).resolve().parents[2]) + "/"  # the checkout, wherever it lies

_D2H = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu",
        "__array__", "__repr__", "__format__", "__str__", "nonzero", "argwhere",
        "masked_select", "unique", "unique_consecutive"}
_FACTORIES = {"tensor", "as_tensor", "asarray", "empty", "zeros", "ones", "full", "arange"}
_INDEXING = {"__getitem__", "__setitem__", "index_put_", "index_put"}


def _is_device_arg(a) -> bool:
    return isinstance(a, (torch.device, str)) and not isinstance(a, bool)


def _flat(index):
    return index if isinstance(index, tuple) else (index,)


class SyncCounter(TorchFunctionMode):
    """Records (kind, where) of each call that would synchronise on CUDA (see above)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []
        self._host: dict[int, weakref.ref] = {}  # tensors made on the host, by id
        self.paused = 0

    def host_tensor(self, t: torch.Tensor) -> torch.Tensor:
        self._host[id(t)] = weakref.ref(t)
        return t

    def is_host(self, t) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    def _record(self, kind: str, name: str) -> None:
        import traceback

        frames = [f for f in traceback.extract_stack()[:-2]
                  if f.filename.startswith(ROOT) and not f.filename[len(ROOT):].startswith("tests/")
                  and not f.filename.endswith("kernels/transfer.py")]
        where = f"{frames[-1].filename[len(ROOT):]}:{frames[-1].lineno}" \
            if frames else "?"
        self.events.append((kind, f"{name} @ {where}"))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        name = getattr(func, "__name__", str(func))
        if name in _D2H:
            if not (args and self.is_host(args[0])):
                self._record("d2h", name)
            if name == "cpu":
                self.host_tensor(out)
        elif name in _FACTORIES:
            if kwargs.get("device") is not None:
                if name in ("tensor", "as_tensor", "asarray"):
                    self._record("h2d", name)
            elif isinstance(out, torch.Tensor):
                self.host_tensor(out)
        elif name in ("to", "cuda"):
            src = args[0]
            moves = name == "cuda" or "device" in kwargs or any(
                _is_device_arg(a) or isinstance(a, torch.Tensor) for a in args[1:])
            if moves and self.is_host(src):
                self._record("h2d_async" if kwargs.get("non_blocking") else "h2d", name)
        elif name == "pin_memory":
            self.host_tensor(out)
        elif name == "copy_" and len(args) > 1 and self.is_host(args[1]):
            self._record("h2d_async" if kwargs.get("non_blocking") else "h2d", name)
        elif name in _INDEXING and args and not self.is_host(args[0]):
            for ix in _flat(args[1]) if len(args) > 1 else ():
                if isinstance(ix, list) or (isinstance(ix, torch.Tensor) and self.is_host(ix)):
                    self._record("h2d", name + "[list]")
                elif isinstance(ix, torch.Tensor) and ix.dtype == torch.bool:
                    self._record("d2h", name + "[mask]")
        return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """num_hidden_layers -> checkpoint dir of the tiny qwen2 (same shapes otherwise)."""
    out = {}
    for layers in (2, 4):
        path = tmp_path_factory.mktemp(f"qwen2_{layers}l")
        make_checkpoint(path, "qwen2", num_hidden_layers=layers)
        out[layers] = str(path)
    return out


def _gpu_path_engine(path, monkeypatch, **options) -> Engine:
    """An engine on the code path it takes on CUDA (see the module docstring)."""
    import brorl.engine.models.decoder as dec
    from brorl.kernels.norm_triton import rms_norm_triton
    from brorl.kernels.rope_triton import apply_rope_triton

    monkeypatch.setattr(dec, "rms_norm", rms_norm_triton)
    monkeypatch.setattr(dec, "apply_rope", apply_rope_triton)
    engine = Engine(path, page_size=4, max_kv_tokens=1024, attention_backend="triton",
                    linear_backend="torch", **options)
    engine.sampler.impl = "triton"  # what "auto" picks on CUDA
    return engine


def _count_decode_steps(engine: Engine, monkeypatch, prompts, params, kind="decode"):
    """Runs generate; returns the tokens and, for each decode-only step (kind "extend":
    each step that prefilled), its events."""
    from triton.runtime import interpreter

    counter = SyncCounter()
    launches = []
    grid_call = interpreter.GridExecutor.__call__

    def launch(self, *a, **k):  # the interpreter's argument copies are not a GPU's
        counter.paused += 1
        try:
            return grid_call(self, *a, **k)
        finally:
            counter.paused -= 1
            launches.append(1)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", launch)
    from_numpy = torch.from_numpy
    monkeypatch.setattr(torch, "from_numpy", lambda a: counter.host_tensor(from_numpy(a)))

    steps = []
    step = engine._step

    def counted_step():
        counter.events = []
        before = dict(engine._counters)
        with counter:
            done = step()
        after = engine._counters
        extended = after["extend_steps"] > before["extend_steps"]
        if kind == "extend" and extended:
            steps.append(list(counter.events))
        elif (kind == "decode" and not extended
              and after["decode_steps"] > before["decode_steps"]
              and after["samples"] >= before["samples"]):
            steps.append(list(counter.events))
        return done

    monkeypatch.setattr(engine, "_step", counted_step)
    res = engine.generate(prompts, params)
    assert launches  # the Triton kernels ran
    return [[c.token_ids for c in o.outputs] for o in res], steps


def _kinds(events) -> dict[str, int]:
    out: dict[str, int] = {}
    for kind, _ in events:
        out[kind] = out.get(kind, 0) + 1
    return out


SCENARIOS = {
    # two prompts x 3 samples, greedy: cascade groups, merged rows expanded per sample
    "greedy": ([list(range(3, 14)), list(range(20, 28))],
               SamplingParams(n=3, max_tokens=5, temperature=0.0, ignore_eos=True), {}),
    # sampled with truncation and a min_tokens ban, no merging, plain paged decode
    "sampled-paged": ([list(range(3, 14)), list(range(20, 28))],
                      [SamplingParams(n=3, max_tokens=5, temperature=0.9, top_k=20,
                                      top_p=0.8, seed=11, ignore_eos=True),
                       SamplingParams(n=2, max_tokens=5, temperature=1.3, min_p=0.05,
                                      min_tokens=4, stop_token_ids=[5, 6], seed=12)],
                      dict(merge_identical_samples=False, cascade_decode=False)),
    # 32 greedy samples of one prompt: merged rows sampled per row (sample_rows_ref)
    "shared-rows": ([list(range(3, 10))],
                    SamplingParams(n=32, max_tokens=4, temperature=0.0, ignore_eos=True), {}),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_decode_step_syncs_do_not_grow_with_layers(models, monkeypatch, scenario):
    """Each decode step waits on the device once (the sampled tokens and their logprobs
    come back in one copy) and copies to it only asynchronously, a few times a step,
    whether the model has 2 layers or 4."""
    prompts, params, options = SCENARIOS[scenario]
    counts = {}
    for layers, path in models.items():
        engine = _gpu_path_engine(path, monkeypatch, **options)
        _, steps = _count_decode_steps(engine, monkeypatch, prompts, params)
        assert len(steps) >= 3, "too few decode steps ran"
        for events in steps:
            kinds = _kinds(events)
            assert kinds.get("d2h") == 1, events
            assert "h2d" not in kinds, events
            assert kinds.get("h2d_async", 0) <= 5, events
            assert [w for k, w in events if k == "d2h"][0].startswith("cpu @ engine/sampler.py")
        counts[layers] = [_kinds(s) for s in steps]
    assert counts[2] == counts[4]


def test_prefill_step_copies_to_the_device_once_whatever_its_prompts(models, monkeypatch):
    """A step that prefills one prompt or three (each with its own page table) waits on
    nothing: its ids, positions, slots, page tables and kept rows go up in one copy, and
    the Triton extend metadata in one more."""
    prompts = [list(range(3, 14)), list(range(20, 28)), list(range(30, 45))]
    params = SamplingParams(n=2, max_tokens=2, temperature=0.0, ignore_eos=True)
    for batch in (prompts[:1], prompts):
        engine = _gpu_path_engine(models[2], monkeypatch)
        _, steps = _count_decode_steps(engine, monkeypatch, batch, params, kind="extend")
        assert len(steps) == 1, "the prompts should prefill in one step"
        assert _kinds(steps[0]) == {"h2d_async": 2}, steps[0]


def test_the_counter_sees_the_syncs_it_claims_to():
    """The counter itself: each kind of call is recorded as the kind of transfer it is."""
    x = torch.arange(6.0)
    counter = SyncCounter()
    with counter:
        x.sum().item()
        x.tolist()
        bool(x[0])
        x[x > 2]
        x.nonzero()
        torch.tensor([1, 2], device=x.device)
        x[[0, 1]]
        h = torch.tensor([1, 2])
        h.to(x.device)
        h.to(x.device, non_blocking=True)
        h.tolist()  # a host tensor: no transfer
        x.to(torch.float64)  # no device given: not a transfer
    assert [k for k, _ in counter.events] == ["d2h", "d2h", "d2h", "d2h", "d2h", "h2d",
                                             "h2d", "h2d", "h2d_async"]


def _flags(temperature, top_k, top_p, min_p, rows=None, num_rows=0):
    from brorl.kernels.sampling import HostFlags

    p_rows = torch.nonzero(top_p < 1.0)[:, 0]
    return HostFlags(top_k_max=int(top_k.max()), top_p_rows=p_rows if len(p_rows) else None,
                     min_p=bool((min_p > 0).any()), greedy=bool((temperature == 0).any()),
                     row_counts=None if rows is None else
                     torch.bincount(rows, minlength=num_rows).tolist())


@pytest.mark.parametrize("ban", [False, True])
def test_host_flags_take_the_branches_the_device_values_take(ban):
    """The reference samplers (and numba's, which takes its truncation branch from them)
    given HostFlags (the engine's sampler builds them from the host's parameters) draw the
    same tokens and logprobs, bit for bit, as when they read the parameter tensors;
    including batches where no row truncates."""
    import importlib.util

    from brorl.kernels.sampling import row_keys, sample, sample_ref, sample_rows_ref

    torch.manual_seed(3)
    R, V = 8, 300
    logits = torch.randn(R, V) * 3
    banned = None
    if ban:
        banned = torch.zeros(R, V, dtype=torch.bool)
        banned[::2, :9] = True
    rows = torch.tensor([0, 3, 0, 1, 2, 2, 2, 7, 5, 5, 4, 6, 0, 3, 6, 5] * 2)
    keys = row_keys([5] * len(rows), [0] * len(rows), list(range(len(rows))), [2] * len(rows))
    cases = [(torch.tensor([1.0, 0.0, 0.6, 1.4, 1.0, 1.0, 0.8, 1.0]),
              torch.tensor([-1, -1, 40, -1, 5, -1, -1, 400]),
              torch.tensor([1.0, 1.0, 0.9, 1.0, 1.0, 0.7, 1.0, 1.0]),
              torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.0])),
             (torch.full((R,), 0.9), torch.full((R,), -1), torch.ones(R), torch.zeros(R))]
    for p in cases:
        ref = sample_ref(logits, *p, keys[:R], banned)
        got = sample_ref(logits, *p, keys[:R], banned, host=_flags(*p))
        assert all(torch.equal(a, b) for a, b in zip(ref, got))
        if importlib.util.find_spec("numba") is not None:  # numba's truncation branch
            flat = logits * 0.2  # where truncation moves the draws
            ref = sample(flat, *p, keys[:R], banned, impl="numba")
            got = sample(flat, *p, keys[:R], banned, impl="numba", host=_flags(*p))
            assert all(torch.equal(a, b) for a, b in zip(ref, got))
        ref = sample_rows_ref(logits, rows, *p, keys, banned)
        got = sample_rows_ref(logits, rows, *p, keys, banned,
                              host=_flags(*p, rows=rows, num_rows=R))
        assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_engine_sampler_reports_what_the_kernels_return(qwen2, monkeypatch):
    """The tokens and logprobs the engine's sampler brings back in its one copy are the
    sampling kernel's, exactly (logprobs as the float32 values, widened)."""
    import brorl.engine.sampler as es

    returned = []
    fused = es.sample

    def spy(*a, **k):
        out = fused(*a, **k)
        returned.append((out[0].tolist(), out[1].tolist()))
        return out

    monkeypatch.setattr(es, "sample", spy)
    path, _ = qwen2
    engine = Engine(path, page_size=4, max_kv_tokens=512, merge_identical_samples=False)
    engine.sampler.impl = "torch"
    params = SamplingParams(n=3, max_tokens=3, temperature=0.8, top_p=0.9, seed=3,
                            ignore_eos=True)
    res = engine.generate([list(range(3, 14))], params)[0]
    assert returned
    toks = [list(t) for t in zip(*[r[0] for r in returned])]
    lps = [list(lp) for lp in zip(*[r[1] for r in returned])]
    assert [c.token_ids for c in res.outputs] == toks
    assert [c.logprobs for c in res.outputs] == lps
