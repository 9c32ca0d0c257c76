"""Compiles every Triton kernel for a GPU that is not here (default an H100, sm_90) and
reports what each compiled kernel needs: shared memory, registers, spills. So GPU-only code
cannot rot between GPU sessions, and a tile that would not fit, or would spill, shows up on
a CPU machine. Two steps, each in its own process (the interpreter is chosen at import):

  TRITON_INTERPRET=1 python -m brorl.kernels.triton_aot capture OUT.json [--shapes small|real]
  TRITON_INTERPRET=0 python -m brorl.kernels.triton_aot compile OUT.json [--arch 90]
                                                  [--resources RES.json]

`capture` runs each launcher once on CPU inputs under the interpreter and records every
kernel launch as the GPU's JIT would see it: argument types, compile-time constants, and
Triton's own specialization of the runtime arguments (ints equal to 1 become constants;
ints and pointers divisible by 16 carry that divisibility, which decides vectorized loads
and so registers). `--shapes small` is the tiny test shapes; `--shapes real` launches at
real models' shapes (head dim, query and KV heads, hidden size, page size 16; the
vocabulary and row counts are runtime sizes, kept small, with the divisibility of the real
ones) in float16 and float32, with the GPU's tile choices.

`compile` builds each recorded launch with `triton.compile` for GPUTarget("cuda", arch, 32)
(small shapes: plus a bfloat16 twin of every float16 launch; real shapes: the float16
launches as bfloat16, the GPU's dtype) and prints one line per failure. With `--resources`
it also runs ptxas -v on each kernel's PTX (Triton's own ptxas) and writes a JSON row per
kernel: shared memory against the target's per-block limit, registers per thread, spill
stores and loads. Launching would fail on a kernel over the shared-memory limit; spills put
the kernel's working set in local memory.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# shared memory one block may use (opt-in maximum), bytes
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

# real shapes: query heads, KV heads, head dim, hidden size
REAL_SHAPES = {
    "qwen2-1.5b": dict(heads=12, kv_heads=2, head_dim=128, hidden=1536),
    "qwen2-0.5b": dict(heads=14, kv_heads=2, head_dim=64, hidden=896),
    "llama3-8b": dict(heads=32, kv_heads=8, head_dim=128, hidden=4096),
}
PAGE_SIZE = 16  # EngineConfig.page_size's default
VOCAB = 4096  # a runtime size: divisible by 16 like 151936 (Qwen2) and 128256 (Llama 3)


def _record_launches(records: list, context: dict) -> None:
    """Wraps the interpreter's launch so each launch is recorded (tagged with
    context["model"]) before it runs."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.__getitem__

    def getitem(self, grid):
        def launch(*args, **kwargs):
            names = list(inspect.signature(self.fn).parameters)
            sig, const, aligned = {}, {}, []
            for name, a in [*zip(names, args), *kwargs.items()]:
                if name not in names:
                    continue  # launch options (num_warps, ...)
                if name in kwargs and not hasattr(a, "dtype") or a is None:
                    sig[name], const[name] = "constexpr", a
                    continue
                # the JIT's own specialization (align=True as in a launch)
                kind, attr = native_specialize_impl(BaseBackend, a, False, True, True)
                sig[name] = kind
                if kind == "constexpr":  # an int equal to 1
                    const[name] = a
                elif attr == "D":
                    aligned.append(name)
            options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
            records.append(dict(module=self.fn.__module__, name=self.fn.__name__, sig=sig,
                                const=const, aligned=aligned, options=options,
                                model=context["model"]))
            return original(self, grid)(*args, **kwargs)
        return launch

    InterpretedFunction.__getitem__ = getitem


def _launch_small() -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    for dt in (torch.float32, torch.float16):
        kc = torch.randn(6, 4, 2, 16, generator=g).to(dt)
        vc = torch.randn(6, 4, 2, 16, generator=g).to(dt)
        q = torch.randn(3, 4, 16, generator=g).to(dt)
        _attention(q, kc, vc, splits=2, gen=g)
        _rows(torch.randn(3, 40, generator=g).to(dt), q, vocab=300, hidden=24, gen=g)


def _attention(q, kc, vc, splits: int, gen) -> None:
    """Paged decode (one and `splits` splits), cascade decode and extend on 3 rows."""
    import torch

    from brorl.kernels.decode_attention_triton import cascade_decode_triton, paged_decode_triton
    from brorl.kernels.extend_attention_triton import extend_attention_triton

    ps = kc.shape[1]
    pt = torch.tensor([[0, 1], [2, 3], [4, 5]])
    lens = torch.tensor([ps + 1, 2 * ps, 1])
    paged_decode_triton(q, kc, vc, pt, lens, 0.25)
    paged_decode_triton(q, kc, vc, pt, lens, 0.25, splits=splits)
    for sp, ss in ((None, None), (splits, splits)):
        cascade_decode_triton(q, kc, vc, torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1]]),
                              torch.tensor([ps + 2]), torch.tensor([[2], [3], [4]]),
                              torch.tensor([1, 2, 0]), 0.25, prefix_splits=sp,
                              suffix_splits=ss)
    h, d = q.shape[1:]
    extend_attention_triton(torch.randn(5, h, d, generator=gen).to(q.dtype), kc, vc,
                            [torch.tensor([0, 1]), torch.tensor([2])], [ps - 1, 0], [4, 1],
                            0.25)


def _rows(x, q, vocab: int, hidden: int, gen) -> None:
    """RMSNorm (plain and with residual) of x [T, hidden], RoPE of q, the fused sampler on
    [4, vocab] logits, token logprob + entropy of 7 positions."""
    import numpy as np
    import torch

    from brorl.kernels.norm_triton import add_rms_norm_triton, rms_norm_triton
    from brorl.kernels.rope_triton import apply_rope_triton
    from brorl.kernels.sampling import row_keys
    from brorl.kernels.sampling_triton import sample_triton
    from brorl.kernels.token_logprob import token_logprob_entropy

    dt = x.dtype
    w = torch.randn(x.shape[1], generator=gen).to(dt)
    rms_norm_triton(x, w, 1e-6)
    add_rms_norm_triton(x, x.clone(), w, 1e-6)
    cs = torch.randn(q.shape[0], q.shape[2], generator=gen).to(dt)
    apply_rope_triton(q, cs, cs)
    logits = torch.randn(4, vocab, generator=gen).to(dt)
    temp = torch.tensor([0.0, 0.5, 1.0, 1.3])
    for top_k, top_p, ban in ((0, 1.0, None), (5, 0.9, torch.zeros(4, vocab, dtype=bool))):
        sample_triton(logits, temp, torch.full((4,), top_k), torch.full((4,), top_p),
                      torch.full((4,), 0.05), np.asarray(row_keys(0, 0, [0, 1, 2, 3], 0)),
                      ban)
    h = torch.randn(7, hidden, generator=gen).to(dt)
    token_logprob_entropy(h, torch.randn(vocab, hidden, generator=gen).to(dt),
                          torch.randint(0, vocab, (7,), generator=gen), impl="triton")


def _launch_real(models: list[str], context: dict) -> None:
    import torch

    import brorl.kernels.token_logprob_triton as tlt

    tlt.interpreted = lambda: False  # record the GPU's tiles, not the interpreter's
    g = torch.Generator().manual_seed(0)
    for model in models:
        context["model"] = model
        s = REAL_SHAPES[model]
        for dt in (torch.float32, torch.float16):
            kv = [torch.randn(6, PAGE_SIZE, s["kv_heads"], s["head_dim"], generator=g).to(dt)
                  for _ in range(2)]
            q = torch.randn(3, s["heads"], s["head_dim"], generator=g).to(dt)
            _attention(q, *kv, splits=8, gen=g)
            _rows(torch.randn(3, s["hidden"], generator=g).to(dt), q, vocab=VOCAB,
                  hidden=s["hidden"], gen=g)


def capture(out: str, shapes: str, models: list[str]) -> None:
    records: list = []
    context = {"model": "small"}
    _record_launches(records, context)
    if shapes == "small":
        _launch_small()
    else:
        _launch_real(models, context)
    unique = {json.dumps(r, sort_keys=True, default=str): r for r in records}
    Path(out).write_text(json.dumps(dict(shapes=shapes, launches=list(unique.values()))))
    print(f"captured {len(unique)} distinct launches")


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers, spill stores / loads and stack frame (bytes) from ptxas -v, run as
    Triton runs it for this target (its own ptxas, the same register-allocation flag)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        run = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o",
                              str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"ptxas failed: {run.stderr.strip()[-300:]}")
    text = run.stderr + run.stdout

    def grab(pattern: str) -> int:
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    return dict(registers=grab(r"Used (\d+) registers"),
                spill_stores=grab(r"(\d+) bytes spill stores"),
                spill_loads=grab(r"(\d+) bytes spill loads"),
                stack_frame=grab(r"(\d+) bytes stack frame"))


def _variants(launches: list, shapes: str) -> list:
    """Small shapes: each launch plus a bfloat16 twin of the float16 ones; real shapes:
    float16 becomes bfloat16 (the GPU engine's dtype)."""
    def bf16(r):
        return {**r, "sig": {k: "*bf16" if v == "*fp16" else v for k, v in r["sig"].items()}}

    if shapes == "real":
        out = [bf16(r) for r in launches]
    else:
        out = launches + [bf16(r) for r in launches if "*fp16" in r["sig"].values()]
    unique = {json.dumps(r, sort_keys=True, default=str): r for r in out}
    return list(unique.values())


def _dtype(sig: dict) -> str:
    kinds = [v for v in sig.values() if v in ("*fp32", "*fp16", "*bf16")]
    return next((k[1:] for k in kinds if k != "*fp32"), "fp32")


def compile_all(path: str, arch: int, resources: str | None) -> int:
    """Compiles every recorded launch; returns the number of failures."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    data = json.loads(Path(path).read_text())
    launches = _variants(data["launches"], data["shapes"])
    failures, rows = 0, []
    for r in launches:
        fn = getattr(importlib.import_module(r["module"]), r["name"])
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in r["aligned"]}
        options = {"num_warps": 4, "num_stages": 3, **r["options"]}
        try:
            src = ASTSource(fn, r["sig"], constexprs=r["const"], attrs=attrs)
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
            if resources:
                rows.append(dict(kernel=r["name"], dtype=_dtype(r["sig"]), model=r["model"],
                                 constants={k: v for k, v in r["const"].items()
                                            if isinstance(v, (int, str)) and k.isupper()},
                                 num_warps=options["num_warps"],
                                 num_stages=options["num_stages"],
                                 shared_bytes=kernel.metadata.shared,
                                 **_ptxas_usage(kernel.asm["ptx"], arch)))
        except Exception as exc:  # noqa: BLE001 - report every failing kernel
            failures += 1
            print(f"FAIL {r['name']} {r['sig']}: {str(exc).splitlines()[-1][:300]}")
    print(f"compiled {len(launches) - failures} of {len(launches)} for sm_{arch}")
    if resources:
        _write_resources(resources, rows, arch, data["shapes"])
    return failures


def _write_resources(path: str, rows: list, arch: int, shapes: str) -> None:
    import torch
    import triton

    limit = SHARED_LIMIT.get(arch)
    for row in rows:
        row["fits_shared"] = limit is None or row["shared_bytes"] <= limit
    result = dict(benchmark="triton_resources", device=f"none (compiled offline for sm_{arch})",
                  target=f"cuda sm_{arch}", shared_limit_bytes=limit, shapes=shapes,
                  page_size=PAGE_SIZE, versions={"triton": triton.__version__,
                                                 "torch": torch.__version__},
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds"),
                  kernels=sorted(rows, key=lambda r: (r["kernel"], r["model"], r["dtype"])))
    Path(path).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'kernel':<24}{'model':<12}{'dtype':<6}{'warps':>6}{'shared':>9}{'regs':>6}"
          f"{'spill st/ld':>13}")
    for r in result["kernels"]:
        print(f"{r['kernel']:<24}{r['model']:<12}{r['dtype']:<6}{r['num_warps']:>6}"
              f"{r['shared_bytes']:>9}{r['registers']:>6}"
              f"{r['spill_stores']:>7}/{r['spill_loads']:<5}"
              f"{'' if r['fits_shared'] else '  OVER THE SHARED-MEMORY LIMIT'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=("capture", "compile"), metavar="{capture,compile}")
    p.add_argument("path", help="the launches JSON (capture writes it, compile reads it)")
    p.add_argument("--shapes", choices=("small", "real"), default="small")
    p.add_argument("--models", nargs="+", choices=sorted(REAL_SHAPES),
                   default=["qwen2-1.5b"], help="real shapes to launch (--shapes real)")
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    p.add_argument("--resources", help="write each kernel's resource usage here (JSON)")
    a = p.parse_args(argv)
    want = "1" if a.step == "capture" else "0"
    if os.environ.get("TRITON_INTERPRET", "0") != want:
        p.error(f"{a.step} needs TRITON_INTERPRET={want} (set before Python starts)")
    if a.step == "capture":
        capture(a.path, a.shapes, a.models)
        return 0
    return 1 if compile_all(a.path, a.arch, a.resources) else 0


if __name__ == "__main__":
    sys.exit(main())
