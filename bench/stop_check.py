"""Host time of one decode step's stop-string check (`StopChecker.stopped`): 4096
samples with ~200-token completions, each window decoded one by one against the step's
first windows decoded in one call to the fast tokenizer's Rust backend, and that with the
byte-level filter (samples whose last token holds no stop string's last byte skip the
check), in one run.

    python bench/stop_check.py
    python bench/stop_check.py --old ac4a268 --repeats 32   # also engine/stop.py at ac4a268

The tokenizer is byte-level BPE (GPT-2's byte map) over 4096 tokens of 1 to 6 bytes built
here (no download); the samples' tokens are drawn uniformly with a fixed seed, so no two
share a window. Every variant must give the same decisions. Reports ms per step and us
per sample (median of --repeats steps); writes bench/results/stop-check-cpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SPECIAL = ["<pad>", "<s>", "</s>"]
STOP = ("</answer>", "\n\nUser:")


def byte_tokenizer(vocab_size: int, seed: int):
    """Byte-level BPE: the 256 bytes, then random 2- to 6-byte pieces of printable ASCII."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from brorl.engine.stop import gpt2_byte_chars

    chars = gpt2_byte_chars()
    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for b in range(256):
        vocab[chars[b]] = len(vocab)
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz    \n.,<>/"
    while len(vocab) < vocab_size:
        piece = "".join(rng.choice(letters) for _ in range(rng.randrange(2, 7)))
        vocab.setdefault("".join(chars[b] for b in piece.encode()), len(vocab))
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def stop_module_at(rev: str):
    """engine/stop.py as of git revision rev, imported as a module, and rev's full hash."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout

    full = git("rev-parse", "--verify", f"{rev}^{{commit}}").strip()
    module = types.ModuleType("stop_old")
    exec(compile(git("show", f"{full}:engine/stop.py"), f"{full[:7]}:engine/stop.py", "exec"),
         module.__dict__)
    return module, full


def steps(num: int, vocab_size: int, seed: int, num_steps: int) -> list[list]:
    """num_steps consecutive decode steps of num samples (stand-ins for
    brorl.engine.request.Sequence: token_ids and group), one token longer at each step."""
    rng = random.Random(seed)
    params = SimpleNamespace(min_tokens=0, stop=STOP)
    prompt_len, group = 100, SimpleNamespace(prompt_len=100, params=params)
    runs = [(rng.randrange(150, 251), [rng.randrange(len(SPECIAL), vocab_size)
                                      for _ in range(prompt_len + 250 + num_steps)])
            for _ in range(num)]
    return [[SimpleNamespace(token_ids=ids[:prompt_len + n + t], group=group)
             for n, ids in runs] for t in range(num_steps)]


def time_steps(checker, batches: list[list]) -> tuple[float, list[list[bool]]]:
    """Median seconds of one stopped() call over the steps but the first (a warm-up that
    also fills the checker's memo of the last step), and every step's decisions."""
    times, hits = [], []
    for seqs in batches:
        t0 = time.perf_counter()
        hits.append(checker.stopped(seqs))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]), hits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=16, help="timed steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--filter-vocab", type=int, default=151936,
                    help="vocabulary size at which the byte filter's table build is timed")
    ap.add_argument("--old", default=None, metavar="REV",
                    help="also time engine/stop.py as of this git revision (ac4a268: "
                         "before the one decode per step and the batched backend)")
    ap.add_argument("--out", type=Path,
                    default=ROOT / "bench" / "results" / "stop-check-cpu.json")
    args = ap.parse_args()
    import tokenizers
    import transformers

    from brorl.engine.stop import StopChecker, batch_decoder

    tok = byte_tokenizer(args.vocab, args.seed)
    assert batch_decoder(tok) is not None
    batches = steps(args.samples, args.vocab, args.seed + 1, args.repeats + 1)
    variants = {}
    old_rev = None
    if args.old is not None:
        old, old_rev = stop_module_at(args.old)
        variants[f"old ({old_rev[:7]})"] = lambda: old.StopChecker(tok)
    variants["one by one"] = lambda: StopChecker(tok, batch=False, filter=False)
    variants["batched"] = lambda: StopChecker(tok, filter=False)
    variants["batched + byte filter"] = lambda: StopChecker(tok)
    rows, want = [], None
    for name, make in variants.items():
        for parallel in ("true", "false") if name == "batched" else ("",):
            if parallel:
                os.environ["TOKENIZERS_PARALLELISM"] = parallel
                name = f"batched, parallel={parallel}"
            seconds, hits = time_steps(make(), batches)
            want = hits if want is None else want
            assert hits == want, f"{name} decides differently"
            rows.append(dict(variant=name, ms_per_step=round(seconds * 1e3, 2),
                             us_per_sample=round(seconds * 1e6 / args.samples, 2)))
    base = rows[0]["ms_per_step"]
    print(f"{'variant':>28} {'ms/step':>9} {'us/sample':>10} {'speed-up':>9}")
    for r in rows:
        r["speedup"] = round(base / r["ms_per_step"], 2)
        print(f"{r['variant']:>28} {r['ms_per_step']:9.2f} {r['us_per_sample']:10.2f} "
              f"{r['speedup']:8.2f}x")
    table = StopChecker(tok).byte_filter(STOP)
    checked = sum(table[s.token_ids[-1]] for s in batches[-1]) / len(batches[-1])
    big = StopChecker(byte_tokenizer(args.filter_vocab, args.seed))
    t0 = time.perf_counter()
    big.byte_filter(STOP)
    filter_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    big.byte_filter(("\n\n",))  # a new set with a new last byte
    another_s = time.perf_counter() - t0
    print(f"byte filter: {checked:.1%} of the samples' last tokens need a window; at a "
          f"{args.filter_vocab}-token vocabulary its first table took {filter_s * 1e3:.0f} ms "
          f"(once per tokenizer), a new set of stop strings {another_s * 1e3:.1f} ms")
    result = dict(benchmark="stop_check", device="cpu", cpu=platform.machine(),
                  cpu_count=os.cpu_count(),
                  versions={"python": platform.python_version(),
                            "transformers": transformers.__version__,
                            "tokenizers": tokenizers.__version__},
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds"),
                  config=dict(samples=args.samples, vocab=args.vocab, prompt_len=100,
                              completion_len=[150, 250], stop=list(STOP),
                              repeats=args.repeats, seed=args.seed,
                              old_rev=old_rev),
                  num_stopped=sum(map(sum, want)),
                  byte_filter=dict(build_ms=round(filter_s * 1e3, 1),
                                   new_stop_set_ms=round(another_s * 1e3, 2),
                                   build_vocab=args.filter_vocab,
                                   vocab_tokens_kept=round(sum(table) / len(table), 4),
                                   samples_checked=round(checked, 4)),
                  rows=rows)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
