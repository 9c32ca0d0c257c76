"""How far the engine's behaviour logprobs are from the trainer's logprobs of the same
tokens: the off-policy gap that truncated importance sampling (algorithm.tis) corrects.

    python bench/logprob_mismatch.py                  # the demo's policy on CPU
    python bench/logprob_mismatch.py --device cuda    # the same on a GPU

The demo's warm-start policy samples its own task (chain_sum) at the rollout temperature;
the trainer's Hugging Face model (float32 master weights, and a bfloat16 copy) scores the
same tokens. Each engine configuration (dtype x attention backend) draws the same prompts
with the same seed. Per configuration: mean and max |delta logprob| and mean |delta p| over
response tokens (brorl.trainer.update.logprob_mismatch, what `mismatch/*` logs in training), the
share of tokens whose importance weight exp(trainer - engine) leaves [0.5, 2], and the
largest |sum of delta logprob| over a response (a sequence-level importance ratio). Writes
bench/results/logprob-mismatch-<device>.json. It measures no time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _trainer_logprobs(model, outs, prompts, temperature: float, device) -> list[list[float]]:
    """The trainer's logprob of every response token, one list per sample."""
    from brorl.trainer.policy import pad_batch, token_logprobs

    seqs, starts, lens = [], [], []
    for prompt, out in zip(prompts, outs):
        for c in out.outputs:
            seqs.append(prompt + c.token_ids)
            starts.append(len(prompt))
            lens.append(len(c.token_ids))
    result = []
    with torch.no_grad():
        for i in range(0, len(seqs), 64):
            ids, targets, mask = pad_batch(seqs[i:i + 64], starts[i:i + 64], 0, device)
            lp, _ = token_logprobs(model, ids, targets, mask, temperature, with_entropy=False)
            for row, (start, n) in enumerate(zip(starts[i:i + 64], lens[i:i + 64])):
                result.append(lp[row, start - 1:start - 1 + n].float().tolist())
    return result


def _row(outs, trainer: list[list[float]]) -> dict:
    from brorl.trainer.update import Sample, logprob_mismatch

    samples = []
    for c, old in zip((c for o in outs for c in o.outputs), trainer):
        s = Sample([0] * (1 + len(old)), 1, 0.0, c.logprobs)
        s.old_logprobs = old
        samples.append(s)
    stats = logprob_mismatch(samples, [1] * len(samples))
    delta = [torch.tensor(s.old_logprobs, dtype=torch.float64)
             - torch.tensor(s.behaviour_logprobs, dtype=torch.float64) for s in samples]
    flat = torch.cat(delta)
    stats["weight_outside_0.5_2"] = float((flat.abs() > torch.log(torch.tensor(2.0))).double()
                                          .mean())
    stats["sequence_logratio_abs_max"] = max(float(d.sum().abs()) for d in delta)
    stats["tokens"] = int(flat.numel())
    return {k.removeprefix("mismatch/"): v for k, v in stats.items()}


def main() -> None:
    from bench.throughput import device_name, versions
    from brorl.engine import Engine, SamplingParams
    from brorl.kernels.decode_attention_cpp import attention_ext_built
    from brorl.trainer.config_load import load_config
    from brorl.trainer.data import gym_problems, render_prompt
    from brorl.trainer.demo import demo_policy
    from brorl.trainer.policy import load_policy

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=32, help="samples per prompt")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here")
    out = args.out or ROOT / "bench" / "results" / \
        f"logprob-mismatch-{device_name(args.device)}.json"
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cfg = load_config(None, [])
    path = demo_policy(cfg.demo)
    problems = gym_problems("chain_sum", args.prompts, 777, cfg.data.gym_kwargs, "auto")
    params = SamplingParams(n=args.n, temperature=cfg.rollout.temperature,
                            max_tokens=cfg.rollout.max_tokens, seed=3)
    backends = ["triton"] if args.device == "cuda" else \
        ["torch", *(["cpp"] if attention_ext_built() else [])]
    trainers = {"float32": load_policy(path, args.device).eval()}
    trainers["bfloat16"] = load_policy(path, args.device).to(torch.bfloat16).eval()
    rows = []
    for dtype in ("float32", "bfloat16"):
        for backend in backends:
            engine = Engine(path, device=args.device, dtype=dtype, attention_backend=backend)
            prompts = [render_prompt(p, engine.tokenizer) for p in problems]
            outs = engine.generate(prompts, params)
            for tdtype, model in trainers.items():
                lp = _trainer_logprobs(model, outs, prompts, params.temperature, args.device)
                row = dict(engine_dtype=dtype, attention_backend=backend,
                           trainer_dtype=tdtype, **_row(outs, lp))
                rows.append(row)
                print(f"engine {dtype:8s} {backend:6s} trainer {tdtype:8s}: |dlogp| mean "
                      f"{row['logprob_abs_mean']:.2e} max {row['logprob_abs_max']:.2e}, "
                      f"|dp| mean {row['prob_abs_mean']:.2e}, w outside [0.5, 2] "
                      f"{row['weight_outside_0.5_2']:.4f}", flush=True)
    result = dict(benchmark="logprob_mismatch", device=device_name(args.device),
                  versions=versions(), date=datetime.datetime.now(datetime.timezone.utc)
                  .isoformat(timespec="seconds"),
                  config=dict(policy=str(path), task="chain_sum", prompts=args.prompts,
                              n=args.n, temperature=params.temperature,
                              max_tokens=params.max_tokens, seed=params.seed),
                  rows=rows)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
