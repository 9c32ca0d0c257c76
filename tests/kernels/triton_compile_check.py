"""Compiles every Triton kernel for an H100 (sm_90) without a GPU, so GPU-only code cannot
rot between GPU sessions. Two steps, each in its own process (the interpreter is chosen
at import time):

  python tests/kernels/triton_compile_check.py capture OUT.json   # TRITON_INTERPRET=1
  python tests/kernels/triton_compile_check.py compile OUT.json   # TRITON_INTERPRET=0

`capture` runs each launcher once on small CPU inputs under the interpreter and records
every kernel launch's argument types and compile-time constants; `compile` builds each
recorded launch (plus a bfloat16 twin of every float16 one) with `triton.compile` for
GPUTarget("cuda", 90, 32) and prints one line per failure.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int64": "i64",
           "int32": "i32", "uint8": "u8", "float64": "fp64", "bool": "i1"}


def _arg_type(a) -> str:
    import torch

    if isinstance(a, torch.Tensor):
        return "*" + _DTYPES[str(a.dtype).split(".")[-1]]
    if isinstance(a, bool):
        return "i1"
    if isinstance(a, int):
        return "i64" if abs(a) >= 2**31 else "i32"
    if isinstance(a, float):
        return "fp32"
    if a is None:
        return "constexpr"
    raise TypeError(f"unexpected kernel argument of type {type(a).__name__}")


def _record_launches(records: list) -> None:
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.__getitem__

    def getitem(self, grid):
        def launch(*args, **kwargs):
            names = list(inspect.signature(self.fn).parameters)
            sig, const = {}, {}
            for name, a in [*zip(names, args), *kwargs.items()]:
                if name not in names:
                    continue  # launch options (num_warps, ...)
                if name in kwargs and not hasattr(a, "dtype") or a is None:
                    sig[name], const[name] = "constexpr", a
                else:
                    sig[name] = _arg_type(a)
            options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
            records.append(dict(module=self.fn.__module__, name=self.fn.__name__, sig=sig,
                                const=const, options=options))
            return original(self, grid)(*args, **kwargs)
        return launch

    InterpretedFunction.__getitem__ = getitem


def _run_launchers() -> None:
    import numpy as np
    import torch

    from kernels.decode_attention_triton import cascade_decode_triton, paged_decode_triton
    from kernels.extend_attention_triton import extend_attention_triton
    from kernels.norm_triton import add_rms_norm_triton, rms_norm_triton
    from kernels.rope_triton import apply_rope_triton
    from kernels.sampling import row_keys
    from kernels.sampling_triton import sample_triton
    from kernels.token_logprob import token_logprob_entropy

    g = torch.Generator().manual_seed(0)
    for dt in (torch.float32, torch.float16):
        kc = torch.randn(6, 4, 2, 16, generator=g).to(dt)
        vc = torch.randn(6, 4, 2, 16, generator=g).to(dt)
        q = torch.randn(3, 4, 16, generator=g).to(dt)
        pt = torch.tensor([[0, 1], [2, 3], [4, 5]])
        lens = torch.tensor([5, 8, 1])
        paged_decode_triton(q, kc, vc, pt, lens, 0.25)
        paged_decode_triton(q, kc, vc, pt, lens, 0.25, splits=2)
        cascade_decode_triton(q, kc, vc, torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1]]),
                              torch.tensor([6]), torch.tensor([[2], [3], [4]]),
                              torch.tensor([1, 2, 0]), 0.25)
        extend_attention_triton(torch.randn(5, 4, 16, generator=g).to(dt), kc, vc,
                                [torch.tensor([0, 1]), torch.tensor([2])], [3, 0], [4, 1], 0.25)
        x = torch.randn(3, 40, generator=g).to(dt)
        w = torch.randn(40, generator=g).to(dt)
        rms_norm_triton(x, w, 1e-6)
        add_rms_norm_triton(x, x.clone(), w, 1e-6)
        cs = torch.randn(3, 16, generator=g).to(dt)
        apply_rope_triton(q, cs, cs)
        logits = torch.randn(4, 300, generator=g).to(dt)
        temp = torch.tensor([0.0, 0.5, 1.0, 1.3])
        for top_k, top_p, ban in ((0, 1.0, None), (5, 0.9, torch.zeros(4, 300, dtype=bool))):
            sample_triton(logits, temp, torch.full((4,), top_k), torch.full((4,), top_p),
                          torch.full((4,), 0.05), np.asarray(row_keys(0, 0, [0, 1, 2, 3], 0)),
                          ban)
        h = torch.randn(7, 24, generator=g).to(dt)
        token_logprob_entropy(h, torch.randn(50, 24, generator=g).to(dt),
                              torch.randint(0, 50, (7,), generator=g), impl="triton")


def capture(out: str) -> None:
    records: list = []
    _record_launches(records)
    _run_launchers()
    unique = {json.dumps(r, sort_keys=True, default=str): r for r in records}
    Path(out).write_text(json.dumps(list(unique.values())))
    print(f"captured {len(unique)} distinct launches")


def compile_all(path: str) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launches = json.loads(Path(path).read_text())
    twins = [{**r, "sig": {k: "*bf16" if v == "*fp16" else v for k, v in r["sig"].items()}}
             for r in launches if "*fp16" in r["sig"].values()]
    failures = 0
    for r in launches + twins:
        fn = getattr(importlib.import_module(r["module"]), r["name"])
        try:
            src = ASTSource(fn, r["sig"], constexprs=r["const"])
            triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 4, "num_stages": 3, **r["options"]})
        except Exception as exc:  # noqa: BLE001 - report every failing kernel
            failures += 1
            print(f"FAIL {r['name']} {r['sig']}: {str(exc).splitlines()[-1][:300]}")
    print(f"compiled {len(launches) + len(twins) - failures} of {len(launches) + len(twins)}")
    return failures


if __name__ == "__main__":
    step, out_path = sys.argv[1], sys.argv[2]
    if step == "capture":
        capture(out_path)
    else:
        sys.exit(1 if compile_all(out_path) else 0)
