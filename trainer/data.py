"""Problems for RL: reasoning-gym datasets by name (procedural, offline) or local
jsonl/parquet files, a held-out split, prompt rendering, and a resumable shuffled stream."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from brorl.trainer.config import DataConfig
from brorl.trainer.verifiers import get_verifier

GYM_PREFIX = "gym:"


@dataclass(frozen=True)
class Problem:
    """One prompt with what its verifier needs. `metadata` holds e.g. the reasoning-gym
    entry ({"dataset", "entry"}) or a code problem's tests ({"tests"})."""

    prompt: str
    answer: str | None
    verifier: str
    metadata: dict = field(default_factory=dict)


def load_problems(cfg: DataConfig) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out eval). Held-out problems never appear in the training set."""
    if cfg.train.startswith(GYM_PREFIX):
        train = gym_problems(cfg.train[len(GYM_PREFIX):], cfg.size, cfg.seed, cfg.gym_kwargs,
                             cfg.verifier)
        held = _held_out(cfg, cfg.eval or cfg.train)
    else:
        rows = file_problems(cfg.train, cfg.verifier)
        if cfg.eval:
            train, held = rows, _held_out(cfg, cfg.eval)
        else:
            if len(rows) <= cfg.eval_size:
                raise ValueError(f"{cfg.train} has {len(rows)} rows; need more than "
                                 f"data.eval_size={cfg.eval_size} to split off a held-out set")
            order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed))
            held = [rows[i] for i in order[:cfg.eval_size].tolist()]
            train = [rows[i] for i in order[cfg.eval_size:].tolist()]
    if not held:
        raise ValueError(f"data.eval {cfg.eval!r} holds no problems")
    held_prompts = {p.prompt for p in held}
    train = [p for p in train if p.prompt not in held_prompts]
    if not train:
        raise ValueError("no training problems left after removing the held-out ones")
    system_prompt(cfg.system_prompt)  # an unknown gym:<name> fails here, before any work
    for name in sorted({p.verifier for p in train + held}):
        # an unknown name or a "module:function" that does not import would otherwise fail
        # in every sample's scoring, and the run would train on rewards that are all 0
        get_verifier(name)
    return train, held


def _held_out(cfg: DataConfig, source: str) -> list[Problem]:
    """The held-out problems of `source`: a file, or eval_size of a reasoning-gym task
    drawn with another seed than the training ones."""
    if source.startswith(GYM_PREFIX):
        return gym_problems(source[len(GYM_PREFIX):], cfg.eval_size, cfg.seed + 1_000_003,
                            cfg.gym_kwargs, cfg.verifier)
    return file_problems(source, cfg.verifier)


def gym_problems(name: str, size: int, seed: int, kwargs: dict, verifier: str
                 ) -> list[Problem]:
    import reasoning_gym

    try:
        ds = reasoning_gym.create_dataset(name, size=size, seed=seed, **kwargs)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"reasoning-gym dataset {name!r} with options {kwargs}: {e}") from e
    verifier = "reasoning_gym" if verifier == "auto" else verifier
    out = []
    for i in range(size):
        entry = ds[i]
        out.append(Problem(entry["question"], str(entry["answer"]), verifier,
                           {"dataset": name, "entry": _plain(entry)}))
    return out


def file_problems(path: str, verifier: str) -> list[Problem]:
    """Rows with `prompt` and `answer` (optional `verifier`, `tests`) from .jsonl or
    .parquet. A row without a prompt is an error naming the row."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if p.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n} (row {len(rows)}) is not JSON: {e}"
                                     ) from e
    elif p.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise RuntimeError("reading parquet needs pyarrow: pip install pyarrow") from e
        rows = pq.read_table(p).to_pylist()
    else:
        raise ValueError(f"data file must be .jsonl or .parquet, got {path}")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path} row {i}: needs a string `prompt`")
        if row.get("verifier") is not None and not isinstance(row["verifier"], str):
            raise ValueError(f"{path} row {i}: `verifier` must be a name (a string), got "
                             f"{row['verifier']!r}")
        name = verifier if verifier != "auto" else row.get("verifier") or "math"
        meta = {k: v for k, v in row.items() if k not in ("prompt", "answer", "verifier")}
        answer = row.get("answer")
        if answer is None and name == "math":  # else every sample of it scores an error
            raise ValueError(f"{path} row {i}: the math verifier needs an `answer`")
        out.append(Problem(row["prompt"], None if answer is None else str(answer), name, meta))
    return out


def render_prompt(problem: Problem, tokenizer, chat_template: bool = True,
                  system: str = "") -> list[int]:
    """Token ids of the prompt: through the tokenizer's chat template (as a user turn, after
    a system turn when `system` is set, with the generation prompt) when it has one and
    `chat_template`, else the plain text (after `system` and a blank line)."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        turns = [{"role": "user", "content": problem.prompt}]
        if system:
            turns.insert(0, {"role": "system", "content": system})
        ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    text = f"{system.rstrip()}\n\n{problem.prompt}" if system else problem.prompt
    return list(tokenizer(text)["input_ids"])


@functools.cache
def system_prompt(spec: str) -> str:
    """data.system_prompt as text: "gym:<name>" is reasoning-gym's SYSTEM_PROMPTS[name]."""
    if not spec.startswith(GYM_PREFIX):
        return spec
    from reasoning_gym.utils import SYSTEM_PROMPTS

    name = spec[len(GYM_PREFIX):]
    if name not in SYSTEM_PROMPTS:
        raise ValueError(f"data.system_prompt {spec!r}: reasoning-gym has no system prompt "
                         f"{name!r}; it has {', '.join(sorted(SYSTEM_PROMPTS))}")
    return SYSTEM_PROMPTS[name]


class ProblemStream:
    """Problems in a fresh seeded permutation each epoch; `state()` / `load_state()` make
    a resumed run draw exactly the same sequence."""

    def __init__(self, problems: list[Problem], seed: int) -> None:
        self.problems, self.seed = problems, seed
        self.epoch, self.pos = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.problems), generator=g).tolist()

    def take(self, k: int) -> list[Problem]:
        out = []
        for _ in range(k):
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self.problems[self._order[self.pos]])
            self.pos += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation()


def _plain(obj):
    """A reasoning-gym entry with numpy scalars as Python ones (plain to pickle for the
    verifier workers), and otherwise as the dataset made it: tuples stay tuples, since
    scorers compare with them (arc_agi's parsed board is a tuple of tuples; as lists its
    gold answer scored 0.05)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
