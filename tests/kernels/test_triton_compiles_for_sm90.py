"""Every Triton kernel compiles for an H100 (sm_90) on a machine without a GPU: the GPU-only
code path (real compiler, bf16 included) is checked in every CI run, not only when a GPU
session happens (kernels/triton_aot.py records the launches under the interpreter, with
the JIT's own argument specialization, and compiles them). At a real model's shapes, the
attention kernels also fit the H100's shared memory and do not spill registers."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.compiler")

ATTENTION = {"_paged_decode_kernel", "_shared_prefix_kernel", "_merge_splits_kernel",
             "_extend_kernel"}


def _run(step: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1" if step == "capture" else "0",
           "TRITON_CACHE_DIR": str(tmp_path / "cache"), "TRITON_DEFAULT_FP_FUSION": "1"}
    return subprocess.run([sys.executable, "-m", "brorl.kernels.triton_aot", step, *args], env=env,
                          capture_output=True, text=True, timeout=900)


def test_every_kernel_launch_compiles_for_sm90(tmp_path):
    out = tmp_path / "launches.json"
    cap = _run("capture", tmp_path, str(out))
    assert cap.returncode == 0, cap.stdout + cap.stderr
    launches = json.loads(out.read_text())["launches"]
    assert len({r["name"] for r in launches}) >= 8  # every kernel family launched
    # the JIT's specialization is recorded: a stride of 1 is a constant, a pointer aligned
    assert any(v == 1 for r in launches for v in r["const"].values())
    assert all("q" in r["aligned"] for r in launches if r["name"] == "_paged_decode_kernel")
    comp = _run("compile", tmp_path, str(out))
    assert comp.returncode == 0, comp.stdout + comp.stderr
    assert "compiled" in comp.stdout


def test_attention_kernels_fit_an_h100_without_spills_at_qwen2_1_5b_shapes(tmp_path):
    out, res = tmp_path / "launches.json", tmp_path / "resources.json"
    cap = _run("capture", tmp_path, str(out), "--shapes", "real", "--models", "qwen2-1.5b")
    assert cap.returncode == 0, cap.stdout + cap.stderr
    comp = _run("compile", tmp_path, str(out), "--resources", str(res))
    assert comp.returncode == 0, comp.stdout + comp.stderr
    rows = json.loads(res.read_text())["kernels"]
    assert {r["dtype"] for r in rows} == {"bf16", "fp32"}
    assert {r["kernel"] for r in rows} >= ATTENTION
    assert all(r["fits_shared"] for r in rows), [r for r in rows if not r["fits_shared"]]
    prefix = [r for r in rows if r["kernel"] == "_shared_prefix_kernel"]
    assert {r["constants"]["D"] for r in prefix} == {128}  # the real head dim, not a toy one
    spilling = [r for r in rows if r["kernel"] in ATTENTION and r["spill_stores"]]
    assert not spilling, spilling
