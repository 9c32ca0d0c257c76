"""Builds the per-row inputs of the sampling kernel for a list of samples: parameters,
noise keys (seed, request, sample, position) and min_tokens bans."""

from __future__ import annotations

import time

import numpy as np
import torch

from engine.request import Sequence
from kernels.sampling import row_keys, sample


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, impl: str = "auto") -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.impl = impl
        self.last_seconds = 0.0  # the sampling kernel of the last call

    def __call__(self, logits: torch.Tensor,
                 seqs: list[Sequence]) -> tuple[list[int], list[float]]:
        """Draws the next token of each sequence from its row of logits [B, vocab]."""
        params = [s.group.params for s in seqs]
        dev = self.device

        def col(values, dtype):
            return torch.tensor(values, dtype=dtype, device=dev)

        keys = row_keys([s.group.seed for s in seqs], [s.group.index for s in seqs],
                        [s.index for s in seqs], [s.num_output for s in seqs])
        banned = None
        for row, s in enumerate(seqs):
            if s.num_output < s.group.params.min_tokens and s.group.stop_ids:
                if banned is None:
                    banned = torch.zeros(logits.shape, dtype=torch.bool, device=dev)
                banned[row, list(s.group.stop_ids)] = True
        t0 = time.perf_counter()
        tokens, logprobs = sample(
            logits,
            col([p.temperature for p in params], torch.float32),
            col([p.top_k for p in params], torch.int64),
            col([p.top_p for p in params], torch.float32),
            col([p.min_p for p in params], torch.float32),
            np.asarray(keys), banned, impl=self.impl)
        self.last_seconds = time.perf_counter() - t0
        return tokens.tolist(), logprobs.tolist()
