"""The public API: `Engine(model=...)`, `generate`, `stats`, `update_weights`."""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from brorl.engine.attention import make_backend
from brorl.engine.cache_manager import CacheManager
from brorl.engine.config import EngineConfig, ModelConfig, with_tokenizer_eos
from brorl.engine.inputs import normalize_params, normalize_prompts, tokenize, validate
from brorl.engine.kv_pool import KVPool, num_pages_that_fit
from brorl.engine.merging import assign_rows, distinct_contexts, sampler_rows
from brorl.engine.model_runner import ModelRunner
from brorl.engine.models.decoder import DecoderLM
from brorl.engine.outputs import CompletionOutput, RequestOutput
from brorl.engine.request import Group, Sequence, Status
from brorl.engine.sampler import Sampler
from brorl.engine.sampling_params import SamplingParams
from brorl.engine.scheduler import Plan, Scheduler
from brorl.engine.stop import StopChecker
from brorl.engine.tokenizer import load_tokenizer
from brorl.kernels.transfer import upload

_LOGITS_BYTES_PER_STEP = 1 << 30  # default batch cap: at most ~1 GB of float32 logits


class Engine:
    """A large-N rollout engine: radix prefix cache, group fork, cascade decode."""

    def __init__(self, model: str, device: str = "cpu", dtype: str = "float32",
                 page_size: int = 16, max_kv_tokens: int | None = None,
                 max_batch_size: int | None = None, attention_backend: str = "auto",
                 **options) -> None:
        self.config = EngineConfig(model=model, device=device, dtype=dtype,
                                   page_size=page_size, max_kv_tokens=max_kv_tokens,
                                   max_batch_size=max_batch_size,
                                   attention_backend=attention_backend, **options)
        self.tokenizer = load_tokenizer(model)
        config = ModelConfig.from_dir(model)  # and the tokenizer's EOS, as vLLM stops on it
        self.model_config = dataclasses.replace(config, eos_token_ids=with_tokenizer_eos(
            config.eos_token_ids, self.tokenizer))
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: " + (
                "this torch is a CPU build" if torch.version.cuda is None
                else "no CUDA GPU is visible") + '; use device="cpu"')
        if self.device.type == "cuda" and self.device.index is not None:
            # Triton launches on the current device, whatever its tensors' device
            torch.cuda.set_device(self.device)
        tdtype = getattr(torch, dtype)
        self.model = DecoderLM(self.model_config, self.device, tdtype,
                               self.config.linear_backend)
        self.model.load_checkpoint(model)
        self._stop = StopChecker(self.tokenizer)
        num_pages = num_pages_that_fit(self.model_config, self.config, tdtype, self.device)
        self.kv = KVPool(self.model_config, num_pages, page_size, tdtype, self.device)
        self.cache = CacheManager(self.kv, page_size)
        batch_cap = max_batch_size or max(
            1, min(4096, _LOGITS_BYTES_PER_STEP // (4 * self.model_config.vocab_size)))
        self.scheduler = Scheduler(self.config, self.cache, batch_cap)
        self.backend = make_backend(attention_backend, self.kv, self.model.scale,
                                    self.config.cascade_decode, self.device)
        self.runner = ModelRunner(self.model, self.backend, page_size)
        self.sampler = Sampler(self.model_config.vocab_size, self.device)
        self.policy_version = 0
        self._rng = random.Random(self.config.seed)
        self._counters = dict.fromkeys(
            ("prefill_tokens", "cached_prompt_tokens", "recomputed_tokens",
             "recomputed_prompt_tokens", "decode_tokens",
             "decode_rows", "shared_decode_pages", "decode_steps", "extend_steps",
             "samples"), 0)
        # decode_rows: rows the model computed in decode steps; below decode_tokens when
        # samples with identical contexts were merged (merge_identical_samples).
        # shared_decode_pages: pages freed because merged samples share a filled page.
        # decode_host_seconds: the part of decode steps outside the model and the sampling
        # kernel (scheduling, radix cache, allocator, page tables, bookkeeping). On CUDA,
        # where the host clock sees only launches, the device's time from the forward's
        # start to the sampler's end (CUDA events) is what is taken off the step.
        self._seconds = dict.fromkeys(("prefill_seconds", "decode_seconds",
                                       "decode_step_seconds", "decode_host_seconds"), 0.0)

    # -- public API ------------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | list | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Draws params.n samples per prompt. Prompts are strings (needs a tokenizer) or
        token-id lists. Returns one RequestOutput per prompt, in order."""
        prompts = normalize_prompts(prompts)
        params = normalize_params(sampling_params, len(prompts))
        prompt_ids = tokenize(prompts, self.tokenizer)
        validate(prompt_ids, params, self.model_config, self.config.page_size,
                 self.kv.num_pages, self.tokenizer is not None)
        groups = [self._make_group(i, ids, p) for i, (ids, p) in
                  enumerate(zip(prompt_ids, params))]
        bar = _progress(sum(p.n for p in params), use_tqdm)
        try:
            for g in groups:
                self.scheduler.add(g)
            while self.scheduler.has_work:
                done = self._step()
                if bar is not None:
                    bar.update(done)
        except BaseException:
            self._abort()
            raise
        finally:
            if bar is not None:
                bar.close()
        return [self._output(g) for g in groups]

    def stats(self) -> dict:
        """Counters since construction, plus the state of the KV pool."""
        return {**self._counters, **self._seconds,
                "preemptions": self.scheduler.num_preemptions,
                "policy_version": self.policy_version,
                "num_pages": self.kv.num_pages,
                "free_pages": self.cache.allocator.num_free,
                "cached_pages": self.cache.radix.num_cached_pages,
                "page_size": self.config.page_size,
                "attention_backend": self.backend.name,
                "linear_backend": self.model.linear.name,
                "cache_impl": self.cache.impl,
                "cascade_decode": self.config.cascade_decode}

    def update_weights(self, named_tensors: Mapping[str, torch.Tensor] | Iterable,
                       version: int | None = None) -> None:
        """Loads HF-named tensors (all validated before any is applied), flushes the
        prefix cache (its KV was made by the old weights) and bumps the policy version."""
        items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
        self.model.update(list(items))
        self.cache.flush()
        self.policy_version = self.policy_version + 1 if version is None else int(version)

    def check_integrity(self) -> None:
        """Radix cache, allocator and every request's page table agree (for tests)."""
        groups = list({id(g): g for g in [*self.scheduler.waiting, *self.scheduler.active,
                                          *(s.group for s in self.scheduler.pending)]}.values())
        self.cache.check_integrity(groups)

    # -- one step ----------------------------------------------------------------------
    def _make_group(self, index: int, ids: list[int], p: SamplingParams) -> Group:
        stop = set(p.stop_token_ids or ())
        if not p.ignore_eos:
            stop.update(self.model_config.eos_token_ids)
        seed = p.seed if p.seed is not None else self._rng.getrandbits(63)
        g = Group(index, ids, p, seed, frozenset(stop), self.config.page_size)
        g.samples = [Sequence(g, j, list(ids)) for j in range(p.n)]
        return g

    def _step(self) -> int:
        """Runs one scheduled step; returns the number of samples that finished."""
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        if plan.empty:
            raise RuntimeError("scheduler stalled: work is queued but nothing can run "
                               f"({self.cache.available_pages} pages available)")
        self.cache.copy_forked_tails()
        finished = self._start(plan) if plan.start else 0
        if plan.extend:
            finished += self._extend(plan)
        elif plan.decode:
            finished += self._decode(plan.decode)
        self.scheduler.remove_finished()
        if plan.decode and not plan.extend and not plan.start:
            step = time.perf_counter() - t0
            self._seconds["decode_step_seconds"] += step
            self._seconds["decode_host_seconds"] += max(step - self._decode_device_seconds(),
                                                        0.0)
        if self.config.debug_integrity:
            self.check_integrity()
        return finished

    def _decode_device_seconds(self) -> float:
        """The last decode step's model and sampling time: host clock on CPU; on CUDA the
        device's, between the runner's and the sampler's events (complete by now: the
        tokens came back to the host)."""
        start, end = self.runner.last_start_event, self.sampler.last_end_event
        if start is None or end is None:
            return self.runner.last_model_seconds + self.sampler.last_seconds
        return start.elapsed_time(end) / 1e3

    def _start(self, plan: Plan) -> int:
        for s in plan.start:  # their contexts are the prompt until they draw a token
            s.merged_with = s.group
        if self.config.merge_identical_samples:  # a group's samples: one row of logits
            owners, index = distinct_contexts(plan.start)
        else:
            owners, index = plan.start, None
        logits = torch.stack([s.group.first_logits for s in owners])
        shared = None
        if index is not None:
            logits, shared = sampler_rows(logits, owners, index)
        finished = self._append(logits, plan.start, shared)
        for g in {id(s.group): s.group for s in owners}.values():
            if all(s.started for s in g.samples):
                self.cache.release_tail(g)
                g.first_logits = None
        return finished

    def _extend(self, plan: Plan) -> int:
        t0 = time.perf_counter()
        logits = self.runner.extend(plan.extend)
        self._seconds["prefill_seconds"] += time.perf_counter() - t0
        self._counters["extend_steps"] += 1
        resumed, rows = [], []
        for i, item in enumerate(plan.extend):
            n = len(item.token_ids)
            if isinstance(item.target, Group):
                g = item.target
                self._counters["prefill_tokens"] += n
                self._counters["cached_prompt_tokens"] += g.num_cached_tokens
                g.first_logits = logits[i].clone()
                self.cache.finish_prefill(g, item.page_table)
                self.scheduler.active.append(g)
                self.scheduler.pending.extend(g.samples)
            else:
                self._counters["recomputed_tokens"] += n
                # the prompt's partial last page is private to each sample: recomputed too
                self._counters["recomputed_prompt_tokens"] += max(
                    0, item.target.group.prompt_len - item.start)
                item.target.num_cached = len(item.target.token_ids)
                item.target.merged_with = None
                resumed.append(item.target)
                rows.append(i)
        if not resumed:
            return 0
        return self._append(logits[upload([np.asarray(rows, dtype=np.int64)],
                                          logits.device)[0]], resumed)

    def _decode(self, seqs: list[Sequence]) -> int:
        t0 = time.perf_counter()
        merge = self.config.merge_identical_samples
        rows, index = distinct_contexts(seqs) if merge else (seqs, None)
        logits = self.runner.decode(rows)
        shared = None
        if merge:
            owners, copies = assign_rows(seqs, rows, index)
        if index is not None:  # the merged samples get their row's new KV and logits
            self.runner.copy_new_kv(owners, copies)
            # a page this step filled is read-only from now on: merged samples share one
            ps = self.config.page_size
            full = [(a, b, b.num_cached // ps) for a, b in zip(owners, copies)
                    if (b.num_cached + 1) % ps == 0]
            if full:
                self._counters["shared_decode_pages"] += self.cache.share_full_page(full)
            logits, shared = sampler_rows(logits, rows, index)
        for s in seqs:
            s.num_cached += 1
        finished = self._append(logits, seqs, shared)
        self._counters["decode_rows"] += len(rows)
        self._seconds["decode_seconds"] += time.perf_counter() - t0
        self._counters["decode_steps"] += 1
        self._counters["decode_tokens"] += len(seqs)
        return finished

    def _append(self, logits: torch.Tensor, seqs: list[Sequence],
                shared: tuple[list[int], list[Sequence]] | None = None) -> int:
        """Samples one token per sequence, appends it and finishes samples that stop.
        shared = (rows, owners): logits has one row per distinct context, seqs[i] draws
        from row rows[i], which was computed for owners[rows[i]]."""
        tokens, logprobs = self.sampler(logits, seqs, *(shared or ()))
        finished, running, waiting = 0, self.scheduler.running, Status.WAITING
        searched = []  # samples whose text is searched for stop strings this step
        for s, tok, lp in zip(seqs, tokens, logprobs):
            ids = s.token_ids
            ids.append(tok)
            s.logprobs.append(lp)
            if not s.started or s.status is waiting:
                s.started = True
                s.status = Status.RUNNING
                running.append(s)
            g = s.group
            if tok in g.stop_ids:  # banned until min_tokens by the sampler
                finished += self._finish(s, "stop")
            elif len(ids) > g.stop_from:  # with stop strings, past min_tokens
                searched.append(s)
            elif len(ids) >= g.max_len:
                finished += self._finish(s, "length")
        if searched:  # a stop string wins over the length limit at the same token
            for s, hit in zip(searched, self._stop.stopped(searched)):
                if hit or len(s.token_ids) >= s.group.max_len:
                    finished += self._finish(s, "stop" if hit else "length")
        return finished

    def _finish(self, seq: Sequence, reason: str) -> int:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.group.num_finished += 1
        self.cache.free_private(seq)
        seq.page_table = []
        self._counters["samples"] += 1
        g = seq.group
        if g.done:
            self.cache.release_group(g)
            g.first_logits = None
            self.scheduler.active.remove(g)
        return 1

    def _abort(self) -> None:
        """After an error mid-generate: drops every request and the prefix cache, so page
        accounting starts clean whatever step was interrupted."""
        preemptions = self.scheduler.num_preemptions
        self.cache = CacheManager(self.kv, self.config.page_size)
        self.scheduler = Scheduler(self.config, self.cache, self.scheduler.max_batch_size)
        self.scheduler.num_preemptions = preemptions

    def _output(self, g: Group) -> RequestOutput:
        outs = []
        texts: dict[tuple[int, ...], str] = {}  # a group's repeated outputs decode once
        user_stop_ids = g.params.stop_token_ids or ()
        # an EOS of the model names no stop_reason, even when also listed (as vLLM)
        eos = () if g.params.ignore_eos else self.model_config.eos_token_ids
        for s in g.samples:
            ids = s.output_ids
            on_token = s.finish_reason == "stop" and ids[-1] in g.stop_ids  # checked first
            text, reason = None, None
            if self.tokenizer is not None:
                text, reason = self._stop.text(
                    ids, g.params, s.finish_reason == "stop" and not on_token, texts,
                    on_token)
            if on_token and ids[-1] in user_stop_ids and ids[-1] not in eos:
                reason = ids[-1]
            outs.append(CompletionOutput(s.index, ids, list(s.logprobs) if g.params.logprobs
                                         else None, s.finish_reason, text, reason))
        return RequestOutput(g.index, g.prompt_ids, outs, g.num_cached_tokens)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="samples", unit="sample", dynamic_ncols=True)
