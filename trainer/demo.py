"""The shipped demo's policy: a small Qwen2-architecture model with its own tokenizer,
warm-started by a short supervised phase on worked solutions of reasoning-gym's
`chain_sum` task, so that `brorl train` runs end to end on a fresh CPU with no download.
Most of those worked solutions are cut short (`DemoConfig.sft_cut_short`): they answer
after the first operation, so the policy usually stops early on longer chains, and the RL
phase has a behaviour to find that carries over to problems it never trained on.

Everything is deterministic by seed and cached: the checkpoint is written (atomically) as
a Hugging Face directory (config.json + model.safetensors + tokenizer.json) and every
later stage loads it back through the real loading code, as it would a user checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import string
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from brorl.trainer.config import DemoConfig

log = logging.getLogger(__name__)

EOS, PAD, UNK = "<|endoftext|>", "<|pad|>", "<unk>"
# Pieces keep their leading space, so decoding is plain concatenation (exact round trip);
# digits are single tokens, as in Qwen's tokenizer, so arithmetic is digit by digit.
_PIECES = r" ?<[/a-z]+>| ?[A-Za-z]+| ?\d| ?[^\sA-Za-z\d]|\s+"


def worked_solution(expression: str, clauses_written: int | None = None) -> str:
    """'12 + 7 - 5' -> ' 12 + 7 = 19 , 19 - 5 = 14 <answer>14</answer>': left to right,
    one operation per clause, the answer in the tags reasoning-gym's scorers read.

    `clauses_written=k` cuts the solution short, as a careless solver does: it answers
    with the running total after k operations ('12 + 7 = 19 <answer>19</answer>'), which
    is wrong unless the operations left add up to 0."""
    parts = expression.split()
    if len(parts) < 3 or len(parts) % 2 == 0:
        raise ValueError(f"not a chain_sum expression: {expression!r}")
    if clauses_written is not None and clauses_written < 1:
        raise ValueError(f"clauses_written must be at least 1, got {clauses_written}")
    for op in parts[1::2]:
        if op not in ("+", "-"):
            raise ValueError(f"unknown operator {op!r} in {expression!r}")
    total, clauses = int(parts[0]), []
    for op, num in list(zip(parts[1::2], parts[2::2]))[:clauses_written]:
        new = total + int(num) if op == "+" else total - int(num)
        clauses.append(f"{total} {op} {num} = {new}")
        total = new
    return " " + " , ".join(clauses) + f" <answer>{total}</answer>"


_OPERATION = re.compile(r"-?\d+ [+-] \d+ = -?\d+")


def worked_operations(text: str) -> int:
    """How many operations a response works out ('a + b = c' clauses): a chain of t terms
    is worked whole at t - 1."""
    return len(_OPERATION.findall(text))


def warm_start_targets(expressions: list[str], cfg: DemoConfig) -> list[str]:
    """The warm start's worked solutions: a `cfg.sft_cut_short` fraction of them (drawn by
    seed) answer after the first operation, the rest work the whole chain."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    cut = (torch.rand(len(expressions), generator=g) < cfg.sft_cut_short).tolist()
    return [worked_solution(e, 1 if c else None) for e, c in zip(expressions, cut)]


def build_tokenizer(texts: list[str]):
    """A word-level fast tokenizer over the pieces of `texts` plus every printable ASCII
    character (with and without a leading space), with an exact decode."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = {p for t in texts for p in re.findall(_PIECES, t)}
    pieces |= {c for c in string.printable if not c.isspace() or c == " "}
    pieces |= {" " + c for c in string.printable if not c.isspace()}
    vocab = {tok: i for i, tok in enumerate([EOS, PAD, UNK, *sorted(pieces)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECES), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, clean_up_tokenization_spaces=False)


def task_problems(cfg: DemoConfig, size: int, seed: int) -> list[dict]:
    """reasoning-gym chain_sum entries at the demo's difficulty."""
    import reasoning_gym

    ds = reasoning_gym.create_dataset("chain_sum", size=size, seed=seed, **cfg.task_kwargs)
    return [ds[i] for i in range(size)]


# Bump when the warm-start recipe (code, not config) changes, so stale caches are rebuilt.
RECIPE_VERSION = 2


def cache_key(cfg: DemoConfig) -> str:
    blob = json.dumps({"recipe": RECIPE_VERSION, **asdict(cfg)}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def demo_policy(cfg: DemoConfig, progress: bool = True) -> str:
    """Path of the warm-started demo checkpoint, building it on the first call."""
    root = Path(os.path.expanduser(cfg.cache_dir))
    path = root / f"chain_sum-{cache_key(cfg)}"
    if (path / "config.json").is_file():
        log.info("demo policy: cached at %s", path)
        return str(path)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        start = time.perf_counter()
        build_demo_policy(cfg, str(tmp), progress)
        os.replace(tmp, path)  # atomic: a half-built directory is never seen as cached
        log.info("demo policy: built in %.0f s at %s", time.perf_counter() - start, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (path / "config.json").is_file():  # another process won the race
            return str(path)
        raise
    return str(path)


def build_demo_policy(cfg: DemoConfig, out_dir: str, progress: bool = True) -> None:
    """Builds the tokenizer and model, runs the supervised warm start, saves HF files."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    problems = task_problems(cfg, cfg.sft_examples, cfg.seed)
    prompts = [p["question"] for p in problems]
    targets = warm_start_targets([p["metadata"]["expression"] for p in problems], cfg)
    tokenizer = build_tokenizer(prompts + targets)
    torch.manual_seed(cfg.seed)
    model_cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id, rope_theta=10000.0)
    model = AutoModelForCausalLM.from_config(model_cfg, dtype=torch.float32)
    examples = [(tokenizer(p)["input_ids"], tokenizer(t)["input_ids"] + [tokenizer.eos_token_id])
                for p, t in zip(prompts, targets)]
    supervised_warm_start(model, examples, cfg, tokenizer.pad_token_id, progress)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def supervised_warm_start(model, examples: list[tuple[list[int], list[int]]], cfg: DemoConfig,
                          pad_id: int, progress: bool = True) -> list[float]:
    """Cross-entropy on the solution tokens only (the prompt is context; optional label
    smoothing), AdamW with a linear warm-up and cosine decay. Returns each step's loss."""
    from tqdm import tqdm

    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0,
                            betas=(0.9, 0.98))
    warmup = max(1, cfg.sft_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5
                                              * (1 + torch.cos(torch.tensor(
                                                  torch.pi * s / cfg.sft_steps)).item()))
    model.train()
    losses = []
    bar = tqdm(range(cfg.sft_steps), desc="warm start (SFT)", disable=not progress)
    for _ in bar:
        idx = torch.randint(len(examples), (cfg.sft_batch_size,), generator=g).tolist()
        ids, labels = _pad_batch([examples[i] for i in idx], pad_id)
        logits = model(input_ids=ids).logits[:, :-1]  # right padding: causal mask suffices
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
            ignore_index=-100, label_smoothing=cfg.sft_label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def _pad_batch(batch: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded input ids, and labels that are -100 on prompt and padding tokens
    (aligned with ids; the loss shifts them by one)."""
    width = max(len(p) + len(t) for p, t in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, (p, t) in enumerate(batch):
        ids[row, :len(p) + len(t)] = torch.tensor(p + t)
        labels[row, len(p):len(p) + len(t)] = torch.tensor(t)
    return ids, labels
