"""Builds the per-row inputs of the sampling kernel for a list of samples: parameters,
noise keys (seed, request, sample, position) and min_tokens bans."""

from __future__ import annotations

import time

import numpy as np
import torch

from engine.request import Sequence
from kernels.sampling import row_keys, sample, sample_rows_ref


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, impl: str = "auto") -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.impl = impl
        self.last_seconds = 0.0  # the sampling kernel of the last call

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence],
                 rows: list[int] | None = None, owners: list[Sequence] | None = None
                 ) -> tuple[list[int], list[float]]:
        """Draws the next token of each sequence from its row of logits [B, vocab]. With
        `rows`, logits holds one row per distinct context [R, vocab], owners[r] is the
        sequence row r was computed for, and seqs[i] draws from row rows[i] with its own
        noise (samples of a row share group and length, so their parameters and bans)."""
        dev = self.device

        def col(values, dtype):
            return torch.tensor(values, dtype=dtype, device=dev)

        seeds, requests, samples, positions = [], [], [], []
        for s in seqs:  # one pass: this runs over every sample, each step
            g = s.group
            seeds.append(g.seed)
            requests.append(g.index)
            samples.append(s.index)
            positions.append(len(s.token_ids) - g.prompt_len)
        keys = row_keys(seeds, requests, samples, positions)
        owners = seqs if rows is None else owners  # whose parameters and bans each row takes
        params = [s.group.params for s in owners]
        banned = None
        for row, s in enumerate(owners):
            if len(s.token_ids) < s.group.ban_below:  # stop tokens before min_tokens
                if banned is None:
                    banned = torch.zeros(logits.shape, dtype=torch.bool, device=dev)
                banned[row, list(s.group.stop_ids)] = True
        t0 = time.perf_counter()
        columns = (col([p.temperature for p in params], torch.float32),
                   col([p.top_k for p in params], torch.int64),
                   col([p.top_p for p in params], torch.float32),
                   col([p.min_p for p in params], torch.float32))
        if rows is None:
            tokens, logprobs = sample(logits, *columns, np.asarray(keys), banned, impl=self.impl)
        else:  # each row's weights once, a binary search per sample
            tokens, logprobs = sample_rows_ref(logits, col(rows, torch.int64), *columns,
                                               np.asarray(keys), banned)
        self.last_seconds = time.perf_counter() - t0
        return tokens.tolist(), logprobs.tolist()
