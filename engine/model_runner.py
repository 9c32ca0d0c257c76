"""Turns a step's sequences into tensors (token ids, positions, KV slots, attention
metadata), runs the model and returns the logits of the positions that sample."""

from __future__ import annotations

import time

import numpy as np
import torch

from brorl.engine.attention import DecodeMeta, ExtendMeta
from brorl.engine.models.decoder import DecoderLM
from brorl.engine.request import Sequence
from brorl.engine.scheduler import ExtendItem
from brorl.kernels.transfer import upload

# DecodeMeta's tensor fields after `slots`, in order
_DECODE_FIELDS = ("page_table", "seq_lens", "group_rows", "prefix_pages", "prefix_lens",
                  "suffix_pages", "suffix_lens")


def _padded(rows: list[list[int]], pad: int = 0) -> list[list[int]]:
    width = max(1, max(len(r) for r in rows))
    return [r + [pad] * (width - len(r)) for r in rows]


class ModelRunner:
    def __init__(self, model: DecoderLM, backend, page_size: int) -> None:
        self.model = model
        self.backend = backend
        self.page_size = page_size
        self.device = model.device
        self.last_model_seconds = 0.0  # forward + LM head of the last decode step
        self.last_start_event = None  # on CUDA: recorded where that forward begins

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One new token per sequence -> logits float32 [B, vocab], rows in order. The
        step's inputs and metadata reach the device in one copy that does not wait on it."""
        positions = [s.num_cached for s in seqs]
        host, padded = self._decode_meta(seqs, positions)
        host["slots"] = self._next_slots(seqs)
        host["ids"] = [s.token_ids[-1] for s in seqs]
        host["positions"] = positions
        names = list(host)
        dev = dict(zip(names, upload([np.asarray(host[n], dtype=np.int64) for n in names],
                                     self.device)))
        meta = DecodeMeta(dev["slots"], *(dev.get(f) for f in _DECODE_FIELDS),
                          group_padded=padded)
        self.backend.begin(meta)
        if self.device.type == "cuda":  # the host clock sees only the forward's launches
            self.last_start_event = torch.cuda.Event(enable_timing=True)
            self.last_start_event.record()
        t0 = time.perf_counter()
        logits = self.model.logits(self.model.forward(dev["ids"], dev["positions"],
                                                      self.backend))
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
            self.backend.kv.copy_slots(*upload(
                [np.asarray(self._next_slots(src), dtype=np.int64),
                 np.asarray(self._next_slots(dst), dtype=np.int64)], self.device))

    def _decode_meta(self, seqs: list[Sequence], positions: list[int]
                     ) -> tuple[dict, bool | None]:
        """The decode metadata on the host: (DecodeMeta's field -> int rows,
        group_padded)."""
        if not self.backend.cascade:
            return {"page_table": _padded([s.page_table for s in seqs]),
                    "seq_lens": [p + 1 for p in positions]}, None
        ps = self.page_size
        groups: dict[int, list[int]] = {}
        suffix_pages, suffix_lens = [], []
        for row, s in enumerate(seqs):
            shared = len(s.group.shared_pages)
            if shared:
                groups.setdefault(id(s.group), []).append(row)
            suffix_pages.append(s.page_table[shared:])
            suffix_lens.append(positions[row] + 1 - shared * ps)
        meta: dict = {"suffix_pages": _padded(suffix_pages), "suffix_lens": suffix_lens}
        if groups:
            rows = list(groups.values())
            meta["group_rows"] = _padded(rows, pad=-1)
            meta["prefix_pages"] = _padded([seqs[r[0]].group.shared_pages for r in rows])
            meta["prefix_lens"] = [seqs[r[0]].group.shared_len for r in rows]
            return meta, len({len(r) for r in rows}) > 1
        meta["group_rows"] = meta["prefix_pages"] = np.zeros((0, 1), dtype=np.int64)
        meta["prefix_lens"] = []
        return meta, False

    @torch.inference_mode()
    def extend(self, items: list[ExtendItem]) -> torch.Tensor:
        """Computes each item's tokens -> logits float32 [len(items), vocab] at each
        item's last position. Ids, positions, KV slots, page tables and the rows to keep
        are computed on the host and reach the device in one copy that does not wait."""
        ps = self.page_size
        widths = [len(it.page_table) for it in items]
        tables = np.zeros((len(items), max(widths, default=0)), dtype=np.int64)
        ids, positions, slots, last = [], [], [], []
        for row, it in enumerate(items):
            table = tables[row, :widths[row]]
            table[:] = it.page_table
            pos = np.arange(it.start, it.start + len(it.token_ids), dtype=np.int64)
            ids.extend(it.token_ids)
            positions.append(pos)
            slots.append(table[pos // ps] * ps + pos % ps)
            last.append(len(ids) - 1)
        d_ids, d_pos, d_slots, d_last, d_tables = upload(
            [np.asarray(ids, dtype=np.int64), np.concatenate(positions),
             np.concatenate(slots), np.asarray(last, dtype=np.int64), tables], self.device)
        meta = ExtendMeta(d_slots, [d_tables[row, :w] for row, w in enumerate(widths)],
                          [it.start for it in items], [len(it.token_ids) for it in items])
        self.backend.begin(meta)
        hidden = self.model.forward(d_ids, d_pos, self.backend)
        return self.model.logits(hidden[d_last])
