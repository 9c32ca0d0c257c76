"""`brorl info` / `python -m brorl.engine.info`: the JSON has every key, and the implementations it
names are the ones an Engine on this machine actually runs."""

import json
import subprocess
import sys

import pytest
import torch

import brorl.kernels.sampling
from brorl.engine import Engine, SamplingParams
from brorl.engine.cache_ext import extension_built
from brorl.trainer.cli import main as cli_main

KEYS = {"python", "torch", "triton", "transformers", "numba", "cupy", "torch_cuda",
        "cuda_available", "gpu", "extensions", "device", "dtype", "radix_cache", "allocator",
        "attention_backend", "linear_backend", "sampler"}
IMPLS = ["python", pytest.param("cpp", marks=pytest.mark.skipif(
    not extension_built(), reason="brorl.engine._cache_ext is not built"))]


def info_json(capsys, *args) -> dict:
    assert cli_main(["info", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_info_names_what_an_engine_runs(qwen2, capsys, monkeypatch, impl, dtype):
    monkeypatch.setenv("BRORL_CACHE_IMPL", impl)
    info = info_json(capsys, "--device", "cpu", "--dtype", dtype)
    assert set(info) == KEYS
    assert info["torch"] == torch.__version__ and info["cuda_available"] is False
    assert info["extensions"]["brorl.engine._cache_ext"] is extension_built()
    assert info["radix_cache"] == info["allocator"] == impl

    chosen = []  # the sampler implementation the engine resolves while it runs
    auto = brorl.kernels.sampling._auto_impl
    monkeypatch.setattr(brorl.kernels.sampling, "_auto_impl",
                        lambda device: chosen.append(auto(device)) or chosen[-1])
    engine = Engine(qwen2[0], dtype=dtype, page_size=4, max_kv_tokens=64)
    engine.generate([[5, 6, 7]], SamplingParams(n=2, max_tokens=2, seed=0))
    stats = engine.stats()
    assert stats["cache_impl"] == info["radix_cache"]
    assert stats["attention_backend"] == info["attention_backend"]
    assert stats["linear_backend"] == info["linear_backend"]
    assert chosen and set(chosen) == {info["sampler"]}


def test_info_reports_a_forced_implementation_error_and_bad_arguments(capsys, monkeypatch):
    monkeypatch.setenv("BRORL_CACHE_IMPL", "fortran")
    info = info_json(capsys)
    assert info["radix_cache"].startswith("error: unknown cache implementation 'fortran'")
    assert cli_main(["info", "--dtype", "float64"]) == 2
    assert "dtype must be one of" in capsys.readouterr().err
    assert cli_main(["info", "--device", "toaster"]) == 2
    assert "bad device" in capsys.readouterr().err


def test_text_report_and_module_entry_point(capsys):
    assert cli_main(["info"]) == 0
    text = capsys.readouterr().out
    assert "radix_cache:" in text and "brorl.engine._cache_ext " in text
    out = subprocess.run([sys.executable, "-m", "brorl.engine.info", "--json"], check=True,
                         capture_output=True, text=True).stdout
    assert set(json.loads(out)) == KEYS
