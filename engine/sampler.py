"""Builds the per-row inputs of the sampling kernel for a list of samples: parameters,
noise keys (seed, request, sample, position) and min_tokens bans."""

from __future__ import annotations

import time

import numpy as np
import torch

from brorl.engine.request import Sequence
from brorl.kernels.sampling import HostFlags, row_keys, sample, sample_rows_ref
from brorl.kernels.transfer import upload


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, impl: str = "auto") -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.impl = impl
        self.last_seconds = 0.0  # the sampling kernel of the last call
        self.last_end_event = None  # on CUDA: recorded where that kernel's work ends

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence],
                 rows: list[int] | None = None, owners: list[Sequence] | None = None
                 ) -> tuple[list[int], list[float]]:
        """Draws the next token of each sequence from its row of logits [B, vocab]. With
        `rows`, logits holds one row per distinct context [R, vocab], owners[r] is the
        sequence row r was computed for, and seqs[i] draws from row rows[i] with its own
        noise (samples of a row share group and length, so their parameters and bans)."""
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
        ban_rows: list[int] = []
        ban_ids: list[int] = []
        bans = False
        for row, s in enumerate(owners):
            if len(s.token_ids) < s.group.ban_below:  # stop tokens before min_tokens
                bans = True
                ban_rows.extend([row] * len(s.group.stop_ids))
                ban_ids.extend(s.group.stop_ids)
        t0 = time.perf_counter()
        # the parameters as the device holds them (float32), and what the host knows of
        # them, so that nothing below waits on the device before the tokens come back
        temperature = np.asarray([p.temperature for p in params], dtype=np.float32)
        top_k = np.asarray([p.top_k for p in params], dtype=np.int64)
        top_p = np.asarray([p.top_p for p in params], dtype=np.float32)
        min_p = np.asarray([p.min_p for p in params], dtype=np.float32)
        top_p_rows = np.flatnonzero(top_p < 1.0).astype(np.int64)
        host = [temperature, top_k, top_p, min_p, top_p_rows,
                np.asarray(ban_rows, dtype=np.int64), np.asarray(ban_ids, dtype=np.int64)]
        if rows is not None:
            host.append(np.asarray(rows, dtype=np.int64))
        dev = upload(host, self.device)  # one copy, queued behind the forward pass
        columns = dev[:4]
        banned = None
        if bans:
            banned = torch.zeros(logits.shape, dtype=torch.bool, device=self.device)
            banned[dev[5], dev[6]] = True
        flags = HostFlags(top_k_max=int(top_k.max(initial=0)),
                          top_p_rows=dev[4] if len(top_p_rows) else None,
                          min_p=bool((min_p > 0).any()), greedy=bool((temperature == 0).any()),
                          row_counts=None if rows is None else
                          np.bincount(rows, minlength=len(owners)).tolist())
        if rows is None:
            tokens, logprobs = sample(logits, *columns, np.asarray(keys), banned,
                                      impl=self.impl, host=flags)
        else:  # each row's weights once, a binary search per sample
            tokens, logprobs = sample_rows_ref(logits, dev[7], *columns, np.asarray(keys),
                                               banned, host=flags)
        self.last_seconds = time.perf_counter() - t0
        if self.device.type == "cuda":
            self.last_end_event = torch.cuda.Event(enable_timing=True)
            self.last_end_event.record()
        return _to_host(tokens, logprobs)


def _to_host(tokens: torch.Tensor, logprobs: torch.Tensor) -> tuple[list[int], list[float]]:
    """Tokens and float32 logprobs as Python lists in one device -> host copy (the step's
    one wait on the device): the logprobs travel as the bits of their exact float64."""
    both = torch.stack((tokens.to(torch.int64), logprobs.double().view(torch.int64)))
    host = both.cpu().numpy()
    return host[0].tolist(), host[1].view(np.float64).tolist()
