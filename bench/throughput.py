"""Rollout throughput against N (samples per prompt) at a fixed total number of samples.

    python bench/throughput.py                 # full sweep, writes bench/results/
    python bench/throughput.py --quick         # smaller, for a smoke run
    python bench/throughput.py --device cuda --model qwen2-0.5b --dtype bfloat16   # a GPU

The workload follows the BroRL systems claim: the same number of samples drawn as few
prompts x many samples (large N) or many prompts x few samples. Each configuration draws
`--total` samples of `--new-tokens` tokens after a `--prompt-len`-token prompt, on a
Qwen2-shaped random model (~5M parameters) built from a config and saved to a temp dir,
so nothing is downloaded. Rows:

- engine/cascade: our engine, shared-prefix (cascade) decode attention (the default)
- engine/paged:   our engine, plain paged decode attention (each sample reads the prefix)
- transformers:   `generate(num_return_sequences=N)` on the same checkpoint and workload

`--backends torch numba cpp cpp-bf16` adds engine/cascade rows with that attention backend
forced (engine/cascade[torch] is the plain-torch reference; cpp-bf16 runs the cpp backend
with a bfloat16 model and KV), and the ratios cpp_over_torch_n<N>:

    python bench/throughput.py --ns 16 512 --hf-ns --backends torch numba cpp cpp-bf16

samples/s = samples / wall seconds; tokens/s counts generated tokens only. The headline
figures are ratios measured in this one run (engine/transformers at each N, and engine
N=512 over N=16); absolute figures only mean something on the device they name.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from brorl.engine.models.weights import matrix_shapes  # noqa: E402

MODEL = dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
             tie_word_embeddings=True, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
# --model: the CPU workload of the issue (5m), or Qwen2-0.5B's shapes (random weights) for a
# GPU, where a 5M-parameter model measures launch overhead rather than the decode regime
MODELS = {"5m": MODEL,
          "qwen2-0.5b": dict(MODEL, vocab_size=151936, hidden_size=896,
                             intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2,
                             max_position_embeddings=32768)}


def make_model(path: str, seed: int, model_cfg: dict = MODEL) -> int:
    """Saves the random bench model to path; returns its parameter count."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**model_cfg), dtype=torch.float32)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def make_prompts(num_prompts: int, prompt_len: int, seed: int,
                 vocab_size: int = MODEL["vocab_size"]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (num_prompts, prompt_len), generator=g)
    return ids.tolist()


BACKENDS = {"torch": ("torch", "float32"), "numba": ("numba", "float32"),
            "cpp": ("cpp", "float32"), "cpp-bf16": ("cpp", "bfloat16")}


def run_engine(path: str, prompts, n: int, new_tokens: int, cascade: bool, seed: int,
               backend: str = "auto", dtype: str = "float32", **options) -> dict:
    """One timed generate on a fresh Engine (options: further Engine keyword arguments)."""
    from brorl.engine import Engine, SamplingParams

    engine = Engine(path, cascade_decode=cascade, attention_backend=backend, dtype=dtype,
                    **options)
    params = SamplingParams(n=n, temperature=1.0, max_tokens=new_tokens, ignore_eos=True,
                            seed=seed)
    engine.generate(prompts[:1], SamplingParams(n=2, max_tokens=2, seed=seed))  # warm-up
    engine.cache.flush()
    before = engine.stats()
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    after = engine.stats()
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    delta = {k: after[k] - before[k] for k in ("prefill_tokens", "cached_prompt_tokens",
                                               "decode_steps", "preemptions",
                                               "prefill_seconds",
                                               "decode_step_seconds", "decode_host_seconds")}
    # host share of a decode step: scheduling, radix cache, allocator, page tables and
    # bookkeeping, i.e. everything outside the model forward and the sampling kernel
    delta["decode_host_fraction"] = (delta["decode_host_seconds"]
                                     / max(delta["decode_step_seconds"], 1e-9))
    return dict(seconds=seconds, samples=sum(len(o.outputs) for o in outs), tokens=tokens,
                attention_backend=after["attention_backend"], dtype=dtype,
                cache_impl=after.get("cache_impl"), **delta)


def run_transformers(path: str, prompts, n: int, new_tokens: int, seed: int,
                     dtype: str = "float32", device: str = "cpu") -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    ids = torch.tensor(prompts, device=device)
    kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, num_return_sequences=n, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.inference_mode():
        model.generate(ids[:1], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2,
                                   "num_return_sequences": 2})
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        seconds = time.perf_counter() - start
    samples = out.shape[0]
    return dict(seconds=seconds, samples=samples, tokens=samples * (out.shape[1] - ids.shape[1]))


def device_name(device: str = "cpu") -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0).replace(" ", "-").lower()
    return "cpu"


def engine_model_config(model: dict = MODEL):
    """The bench model as the engine sees it (brorl.engine.config.ModelConfig)."""
    from brorl.engine.config import ModelConfig

    return ModelConfig.from_hf({"model_type": "qwen2", **model})


def workload_flops(num_prompts: int, n: int, prompt_len: int, new_tokens: int,
                   model: dict = MODEL) -> dict:
    """Matmul FLOPs of one row's work (2 per multiply-add): prefill of each prompt once
    (causal attention; the LM head at its last position), then new_tokens - 1 decode steps
    per sample (the first token comes from the prefill's logits), each a forward of every
    weight plus attention over its context. Elementwise work is left out. On a device that
    is compute-bound at every N, rate(N=hi) / rate(N=lo) can reach at most
    flops(lo) / flops(hi) (the same number of samples), whatever the attention kernel."""
    cfg = engine_model_config(model)
    layers, q = cfg.num_layers, cfg.q_size
    shapes = matrix_shapes(cfg)
    layer_params = sum(o * i for name, (o, i) in shapes.items() if name.startswith("layers.0."))
    head = shapes["lm_head"][0] * shapes["lm_head"][1]
    prefill = num_prompts * (2 * layers * layer_params * prompt_len + 2 * head
                             + layers * 4 * q * prompt_len * (prompt_len + 1) // 2)
    steps = new_tokens - 1
    # decode step j (1..steps) attends to prompt_len + j keys
    ctx = steps * prompt_len + steps * (steps + 1) // 2
    decode = num_prompts * n * (2 * (layers * layer_params + head) * steps
                                + layers * 4 * q * ctx)
    return {"prefill": prefill, "decode": decode, "total": prefill + decode}


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "triton", "numba"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ns", type=int, nargs="+", default=[16, 64, 128, 256, 512])
    ap.add_argument("--total", type=int, default=512, help="samples per configuration")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--hf-ns", type=int, nargs="*", default=None,
                    help="N values also run through transformers (default: all)")
    ap.add_argument("--quick", action="store_true",
                    help="total 128, N in {16, 128}, 32 new tokens: a smoke run")
    ap.add_argument("--backends", nargs="*", default=[], choices=list(BACKENDS),
                    help="also run engine/cascade with these attention backends forced")
    ap.add_argument("--unmerged", action="store_true",
                    help="also run engine/cascade with merge_identical_samples off (what "
                         "merging costs when samples part at once, as a random model's do)")
    ap.add_argument("--hf-bf16", action="store_true",
                    help="also run transformers in bfloat16 (the fair baseline for cpp-bf16)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of each engine row; the row reports the median (all kept in "
                         "the JSON). transformers rows run once (they take ~30 s each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where the engine and transformers rows run (default: cpu, the "
                         "issue's workload)")
    ap.add_argument("--model", default="5m", choices=list(MODELS),
                    help="bench model shape: 5m (the CPU workload) or qwen2-0.5b (for a GPU)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of the engine/cascade, engine/paged and transformers rows")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/"
                    "throughput-<device>.json; --quick writes nothing unless given)")
    args = ap.parse_args(argv)
    if args.quick:
        args.ns, args.total, args.new_tokens, args.repeats = [16, 128], 128, 32, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here")
    model_cfg, dev, dt = MODELS[args.model], args.device, args.dtype
    bad = [n for n in args.ns if n < 1 or args.total % n]
    if bad:
        ap.error(f"every N must divide --total={args.total}; these do not: {bad}")
    hf_ns = args.ns if args.hf_ns is None else args.hf_ns
    threads = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        num_params = make_model(tmp, args.seed, model_cfg)
        print(f"model: Qwen2-shaped ({args.model}), {num_params / 1e6:.2f}M parameters, "
              f"{dt}; prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
              f"{args.total} samples per row; device {device_name(dev)}, {threads} torch "
              f"threads", flush=True)
        for n in args.ns:
            prompts = make_prompts(args.total // n, args.prompt_len, args.seed + n,
                                   model_cfg["vocab_size"])
            runs = [("engine/cascade", partial(run_engine, tmp, prompts, n, args.new_tokens,
                                               True, args.seed, dtype=dt, device=dev)),
                    ("engine/paged", partial(run_engine, tmp, prompts, n, args.new_tokens,
                                             False, args.seed, dtype=dt, device=dev))]
            for name in args.backends:
                backend, dtype = BACKENDS[name]
                runs.append((f"engine/cascade[{name}]",
                             partial(run_engine, tmp, prompts, n, args.new_tokens, True,
                                     args.seed, backend, dtype, device=dev)))
            if args.unmerged:
                runs.append(("engine/cascade[unmerged]",
                             partial(run_engine, tmp, prompts, n, args.new_tokens, True,
                                     args.seed, dtype=dt, device=dev,
                                     merge_identical_samples=False)))
            if n in hf_ns:
                runs.append(("transformers", partial(run_transformers, tmp, prompts, n,
                                                     args.new_tokens, args.seed, dt, dev)))
            if n in hf_ns and args.hf_bf16:
                runs.append(("transformers[bf16]", partial(run_transformers, tmp, prompts, n,
                                                           args.new_tokens, args.seed,
                                                           "bfloat16", dev)))
            for system, fn in runs:
                r = _median_run(fn, 1 if system.startswith("transformers") else args.repeats)
                r.update(system=system, n=n, num_prompts=len(prompts),
                         samples_per_s=r["samples"] / r["seconds"],
                         tokens_per_s=r["tokens"] / r["seconds"])
                rows.append(r)
                print(f"  N={n:4d} {system:25s} {r['samples_per_s']:8.1f} samples/s "
                      f"({r['seconds']:.2f} s)", flush=True)
    result = dict(benchmark="throughput", device=device_name(dev), cpu=platform.processor() or
                  platform.machine(), cpu_count=os.cpu_count(), torch_threads=threads,
                  versions=versions(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  config=dict(model=model_cfg, model_name=args.model, num_params=num_params,
                              total=args.total,
                              prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                              ns=args.ns, backends=args.backends, hf_bf16=args.hf_bf16,
                              unmerged=args.unmerged,
                              repeats=args.repeats,
                              seed=args.seed,
                              dtype=dt, temperature=1.0),
                  rows=rows, ratios=ratios(rows, args.ns))
    flops = {n: workload_flops(args.total // n, n, args.prompt_len, args.new_tokens, model_cfg)
             for n in args.ns}
    result["flops"] = {str(n): f for n, f in flops.items()}
    lo, hi = min(args.ns), max(args.ns)
    if lo != hi:  # the compute-bound ceiling of the N ratio (see workload_flops)
        result["ratios"][f"flop_ceiling_n{hi}_over_n{lo}"] = (flops[lo]["total"]
                                                             / flops[hi]["total"])
    print_table(rows, result["ratios"])
    out = args.out or (None if args.quick else
                       str(ROOT / "bench" / "results" / f"throughput-{device_name(dev)}.json"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    return result


def _median_run(fn, repeats: int) -> dict:
    """Runs fn `repeats` times; returns the run with the median time, with every run's
    seconds under "all_seconds"."""
    runs = sorted((fn() for _ in range(max(1, repeats))), key=lambda r: r["seconds"])
    out = runs[len(runs) // 2]
    out["all_seconds"] = [r["seconds"] for r in runs]
    return out


def ratios(rows: list[dict], ns: list[int]) -> dict:
    rate = {(r["system"], r["n"]): r["samples_per_s"] for r in rows}
    out = {}
    for n in ns:
        if ("transformers", n) in rate:
            out[f"cascade_over_transformers_n{n}"] = (rate["engine/cascade", n]
                                                      / rate["transformers", n])
        out[f"cascade_over_paged_n{n}"] = rate["engine/cascade", n] / rate["engine/paged", n]
        host = [r["decode_host_fraction"] for r in rows
                if r["system"] == "engine/cascade" and r["n"] == n]
        if host:
            out[f"cascade_decode_host_fraction_n{n}"] = host[0]
        for name in ("numba", "cpp", "cpp-bf16"):
            if (f"engine/cascade[{name}]", n) in rate and ("engine/cascade[torch]", n) in rate:
                out[f"{name}_over_torch_n{n}"] = (rate[f"engine/cascade[{name}]", n]
                                                  / rate["engine/cascade[torch]", n])
        if ("engine/cascade[unmerged]", n) in rate:
            out[f"merged_over_unmerged_n{n}"] = (rate["engine/cascade", n]
                                                 / rate["engine/cascade[unmerged]", n])
        if ("engine/cascade[cpp-bf16]", n) in rate and ("transformers[bf16]", n) in rate:
            out[f"cpp-bf16_over_transformers-bf16_n{n}"] = (
                rate["engine/cascade[cpp-bf16]", n] / rate["transformers[bf16]", n])
    lo, hi = min(ns), max(ns)
    for system in dict.fromkeys(r["system"] for r in rows):
        if (system, lo) in rate and (system, hi) in rate and lo != hi:
            out[f"{system.split('/')[-1]}_n{hi}_over_n{lo}"] = rate[system, hi] / rate[system, lo]
    return out


def print_table(rows: list[dict], ratio: dict) -> None:
    systems = list(dict.fromkeys(r["system"] for r in rows))
    ns = list(dict.fromkeys(r["n"] for r in rows))
    rate = {(r["system"], r["n"]): r["samples_per_s"] for r in rows}
    print(f"\n{'samples/s':25s}" + "".join(f"{'N=' + str(n):>10s}" for n in ns))
    for s in systems:
        cells = [f"{rate[s, n]:10.1f}" if (s, n) in rate else f"{'-':>10s}" for n in ns]
        print(f"{s:25s}" + "".join(cells))
    print("\n" + "\n".join(f"{k:36s} {v:6.2f}x" for k, v in ratio.items()))


if __name__ == "__main__":
    main()
