"""Turns a step's sequences into tensors (token ids, positions, KV slots, attention
metadata), runs the model and returns the logits of the positions that sample."""

from __future__ import annotations

import time

import torch

from engine.attention import DecodeMeta, ExtendMeta
from engine.models.decoder import DecoderLM
from engine.request import Sequence
from engine.scheduler import ExtendItem


def _padded(rows: list[list[int]], device: torch.device, pad: int = 0) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.int64,
                        device=device)


class ModelRunner:
    def __init__(self, model: DecoderLM, backend, page_size: int) -> None:
        self.model = model
        self.backend = backend
        self.page_size = page_size
        self.device = model.device
        self.last_model_seconds = 0.0  # forward + LM head of the last decode step

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One new token per sequence -> logits float32 [B, vocab], rows in order."""
        positions = [s.num_cached for s in seqs]
        meta = self._decode_meta(seqs, positions)
        meta.slots = self._tensor(self._next_slots(seqs))
        self.backend.begin(meta)
        ids, pos = self._tensor([s.token_ids[-1] for s in seqs]), self._tensor(positions)
        t0 = time.perf_counter()
        logits = self.model.logits(self.model.forward(ids, pos, self.backend))
        self.last_model_seconds = time.perf_counter() - t0
        return logits

    def _next_slots(self, seqs: list[Sequence]) -> list[int]:
        """The flat KV slot of each sequence's next token (position num_cached)."""
        ps = self.page_size
        return [s.page_table[s.num_cached // ps] * ps + s.num_cached % ps for s in seqs]

    def copy_new_kv(self, src: list[Sequence], dst: list[Sequence]) -> None:
        """After a decode step of src: copies the K and V just written at each src[i]'s
        next slot to dst[i]'s next slot (dst[i] has the same context), in every layer."""
        if src:
            self.backend.kv.copy_slots(self._tensor(self._next_slots(src)),
                                       self._tensor(self._next_slots(dst)))

    def _decode_meta(self, seqs: list[Sequence], positions: list[int]) -> DecodeMeta:
        dev = self.device
        meta = DecodeMeta(None, None, None, None, None, None, None, None)
        if not self.backend.cascade:
            meta.page_table = _padded([s.page_table for s in seqs], dev)
            meta.seq_lens = self._tensor([p + 1 for p in positions])
            return meta
        ps = self.page_size
        groups: dict[int, list[int]] = {}
        suffix_pages, suffix_lens = [], []
        for row, s in enumerate(seqs):
            shared = len(s.group.shared_pages)
            if shared:
                groups.setdefault(id(s.group), []).append(row)
            suffix_pages.append(s.page_table[shared:])
            suffix_lens.append(positions[row] + 1 - shared * ps)
        if groups:
            rows = list(groups.values())
            meta.group_rows = _padded(rows, dev, pad=-1)
            meta.group_padded = len({len(r) for r in rows}) > 1
            meta.prefix_pages = _padded([seqs[r[0]].group.shared_pages for r in rows], dev)
            meta.prefix_lens = self._tensor([seqs[r[0]].group.shared_len for r in rows])
        else:
            meta.group_rows = torch.empty(0, 1, dtype=torch.int64, device=dev)
            meta.prefix_pages = torch.zeros(0, 1, dtype=torch.int64, device=dev)
            meta.prefix_lens = torch.zeros(0, dtype=torch.int64, device=dev)
            meta.group_padded = False
        meta.suffix_pages = _padded(suffix_pages, dev)
        meta.suffix_lens = self._tensor(suffix_lens)
        return meta

    @torch.inference_mode()
    def extend(self, items: list[ExtendItem]) -> torch.Tensor:
        """Computes each item's tokens -> logits float32 [len(items), vocab] at each
        item's last position."""
        ps, dev = self.page_size, self.device
        ids, positions, slots, tables, last = [], [], [], [], []
        for it in items:
            pos = torch.arange(it.start, it.start + len(it.token_ids), device=dev)
            table = self._tensor(it.page_table)
            ids.extend(it.token_ids)
            positions.append(pos)
            slots.append(table[pos // ps] * ps + pos % ps)
            tables.append(table)
            last.append(len(ids) - 1)
        meta = ExtendMeta(torch.cat(slots), tables, [it.start for it in items],
                          [len(it.token_ids) for it in items])
        self.backend.begin(meta)
        hidden = self.model.forward(self._tensor(ids), torch.cat(positions), self.backend)
        return self.model.logits(hidden[self._tensor(last)])
