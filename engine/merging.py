"""Merged decode rows (`merge_identical_samples`): the samples of a prompt whose tokens so
far are the same run through the model as one row. Contexts that differ once differ
forever, so each step only splits the previous step's rows by their new token."""

from __future__ import annotations

import numpy as np
import torch

from brorl.engine.request import Sequence
from brorl.kernels.transfer import upload

# Merged decode rows feed the sampler as they are (each row's weights once, a binary search
# per sample) when there are at most 1/16 as many rows as samples; otherwise the rows are
# expanded for the fused per-sample sampler, which is faster per row (CPU, vocab 151936,
# batch 512: 35 ms against 204 ms at 16 rows, 434 ms against 230 ms at 128;
# bench/sampling_rows.py, bench/results/sampling-rows-cpu.json).
SHARED_ROW_SAMPLING = 16


def distinct_contexts(seqs: list[Sequence]) -> tuple[list[Sequence], list[int] | None]:
    """The first sample of each distinct context (same group, same tokens) in order, and
    for every sample the index of its context's row; None when all are distinct.

    Only samples whose contexts were identical at their last step (the same merged_with)
    can be identical now, and they are iff they have the same length and last token:
    each step refines the previous one's partition, with no token lists compared."""
    rows: list[Sequence] = []
    index: list[int] = []
    by_key: dict[tuple[object, int, int], int] = {}
    for s in seqs:
        if s.merged_with is not None:
            ids = s.token_ids
            r = by_key.setdefault((s.merged_with, len(ids), ids[-1]), len(rows))
            if r < len(rows):
                index.append(r)
                continue
        index.append(len(rows))
        rows.append(s)
    return rows, (index if len(rows) < len(seqs) else None)


def assign_rows(seqs: list[Sequence], rows: list[Sequence], index: list[int] | None
                ) -> tuple[list[Sequence], list[Sequence]]:
    """Records each sample's row for the next step's `distinct_contexts` (merged_with: the
    row's owner while the row holds others, else None: a sample alone in its row is never
    looked at again) and returns (owners, copies): the samples that take their row's new
    KV and logits from its owner."""
    if index is None:  # all distinct, and so from now on
        for s in seqs:
            s.merged_with = None
        return [], []
    size = [0] * len(rows)
    for r in index:
        size[r] += 1
    owners, copies = [], []
    for s, r in zip(seqs, index):
        owner = rows[r]
        s.merged_with = owner if size[r] > 1 else None
        if owner is not s:
            owners.append(owner)
            copies.append(s)
    return owners, copies


def sampler_rows(logits: torch.Tensor, rows: list[Sequence], index: list[int]
                 ) -> tuple[torch.Tensor, tuple[list[int], list[Sequence]] | None]:
    """The sampler's inputs for logits with one row per distinct context (rows; sample i
    draws from row index[i]): the rows as they are with (index, rows) for the per-row
    sampler when there are at most 1/SHARED_ROW_SAMPLING as many rows as samples, else
    the rows expanded to one per sample for the fused sampler."""
    if len(rows) * SHARED_ROW_SAMPLING <= len(index):
        return logits, (index, rows)
    return logits[upload([np.asarray(index, dtype=np.int64)], logits.device)[0]], None
