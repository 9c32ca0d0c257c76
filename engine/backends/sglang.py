"""An SGLang backend for users who already run SGLang: `SGLangEngine` offers our engine's
contract (`generate(prompts, SamplingParams) -> list[RequestOutput]`, `tokenizer`,
`policy_version`, `stats`, in-process `update_weights`) on top of `sglang.Engine`.

Distributed weight sync, the engine's half: `init_weight_sync` wraps SGLang's
`init_weights_update_group` and `apply_manifest` turns our manifest (names, shapes, dtypes,
version) into `update_weights_from_distributed`. Both calls block until the other side has
done its part: the rendezvous, then one broadcast per tensor from rank 0 in manifest order
on a torch process group that SGLang builds itself (SGLang's per-tensor protocol, not our
byte buckets). The trainer's half is `brorl.trainer.weight_sync.sglang.SGLangSender`, which runs
these calls in threads while it joins and broadcasts. SGLang checks no name or shape
before it receives, and many of its models' loaders skip a name they do not know with a
log line and answer success: `check_manifest` checks names and shapes against the local
checkpoint first. A failed update may leave SGLang's weights partly updated (re-sync or
rebuild it), and `policy_version` is not bumped. Every call into the SGLang engine holds
one lock: sglang.Engine runs each call on its own event loop, which two threads cannot
share (a generate during a sync waits for the sync). Needs an SGLang from mid-2025 on
(`group_name` in update_weights_from_distributed, SGLang PR 7292).

sglang is imported only when an `SGLangEngine` is built without an engine object.

Differences from our engine, by design of SGLang: a prompt's n samples are n requests with
the same prompt (SGLang's radix cache shares the prefix); `seed` is not forwarded, so
samples are not reproducible by seed; SGLang's `ignore_eos` also switches off
`stop_token_ids` (refused here rather than run differently); SGLang may let a stop string
end a sample before `min_tokens`. Its logprobs are of softmax(logits / temperature) over
the full vocabulary, as ours, in recent versions; older ones (about 0.4.4) renormalise
under top_p, and SGLANG_RETURN_ORIGINAL_LOGPROB=1 gives temperature-1 ones: there, prefer
`algorithm.old_logprobs=recompute`.
"""

from __future__ import annotations

import functools
import os
import threading

from brorl.engine.inputs import normalize_params, normalize_prompts
from brorl.engine.outputs import CompletionOutput, RequestOutput
from brorl.engine.sampling_params import SamplingParams

_FINISH = {"stop": "stop", "length": "length"}


def to_sglang_params(p: SamplingParams) -> dict:
    """One sample's SGLang sampling-params dict for our SamplingParams (n is expanded by
    the caller; seed is dropped, see the module docstring)."""
    out = {"temperature": float(p.temperature), "top_p": float(p.top_p),
           "top_k": int(p.top_k), "min_p": float(p.min_p),
           "max_new_tokens": int(p.max_tokens), "min_new_tokens": int(p.min_tokens),
           "ignore_eos": bool(p.ignore_eos)}
    if p.stop_token_ids:
        if p.ignore_eos:
            raise ValueError("SGLang ignores stop_token_ids when ignore_eos is set (our "
                             "engine and vLLM still stop on them): leave one of them out")
        out["stop_token_ids"] = list(p.stop_token_ids)
    if p.stop:
        out["stop"] = list(p.stop)
    if p.include_stop_str_in_output:
        # SGLang's name: keep the stop string (or stop token) in the text. Versions differ
        # in what follows a stop string: newer ones cut right after it, as our engine
        # does; older ones keep the rest of the completing token's text too.
        out["no_stop_trim"] = True
    return out


def from_sglang_output(result: dict, stop_token_ids: tuple[int, ...] = ()) -> CompletionOutput:
    """One SGLang result dict -> CompletionOutput (token ids, logprobs, finish reason).
    stop_reason: SGLang's `matched` when it is a stop string or one of `stop_token_ids`
    (the request's less the model's EOS ids: SGLang names an EOS too; ours gives None,
    as vLLM)."""
    meta = result.get("meta_info", {})
    ids = result.get("output_ids")
    lps = meta.get("output_token_logprobs")
    if ids is None and lps is not None:
        ids = [int(t) for _, t, *_ in lps]
    if ids is None:
        raise ValueError("SGLang result has neither output_ids nor output_token_logprobs")
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type") if isinstance(reason, dict) else str(reason)
    if kind not in _FINISH:
        raise RuntimeError(f"SGLang request ended with finish reason {reason!r}")
    logprobs = [float(lp) for lp, *_ in lps] if lps is not None else None
    if logprobs is not None and len(logprobs) != len(ids):
        raise ValueError(f"SGLang result has {len(ids)} output_ids but {len(logprobs)} "
                         "output_token_logprobs: the trainer needs one logprob per token")
    matched = reason.get("matched") if isinstance(reason, dict) else None
    if not isinstance(matched, str) and matched not in stop_token_ids:
        matched = None
    return CompletionOutput(0, list(ids), logprobs, _FINISH[kind], result.get("text"),
                            matched)


class SGLangEngine:
    """Our generate contract and weight-sync protocol over `sglang.Engine`.

    `engine`: an existing sglang.Engine (or anything with its methods); otherwise one is
    built as `sglang.Engine(model_path=model, **engine_kwargs)`."""

    def __init__(self, model: str, engine=None, **engine_kwargs) -> None:
        if engine is None:
            try:
                import sglang
            except ImportError as err:
                raise ImportError("brorl.engine.backends.sglang needs SGLang (pip install "
                                  "'sglang[all]'); our own Engine needs nothing") from err
            engine = sglang.Engine(model_path=model, **engine_kwargs)
        from brorl.engine.config import eos_token_ids, read_hf_configs, with_tokenizer_eos
        from brorl.engine.tokenizer import load_tokenizer

        self._engine = engine
        self.model_path = model
        self.tokenizer = load_tokenizer(model)
        # a model SGLang fetches itself (a hub id) has no local config: no EOS ids known,
        # so an EOS listed in stop_token_ids is then named as SGLang names it
        self.eos_token_ids = with_tokenizer_eos(
            eos_token_ids(*read_hf_configs(model))
            if os.path.isfile(os.path.join(model, "config.json")) else (), self.tokenizer)
        self.policy_version = 0
        self._group = None
        self._lock = threading.Lock()

    def generate(self, prompts, sampling_params: SamplingParams | list | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Draws params.n samples per prompt; one RequestOutput per prompt, in order."""
        prompts = normalize_prompts(prompts)
        params = normalize_params(sampling_params, len(prompts))
        if not prompts:
            return []
        ids = [p if isinstance(p, list) else self._encode(p) for p in prompts]
        flat_ids, flat_params = [], []
        for i, p in zip(ids, params):
            flat_ids += [i] * p.n
            flat_params += [to_sglang_params(p)] * p.n
        with self._lock:  # logprob_start_len -1: output tokens only (older SGLang's 0
            # also scores the prompt and caps the prefix cache's reuse at that length)
            results = self._engine.generate(input_ids=flat_ids, sampling_params=flat_params,
                                            return_logprob=True, logprob_start_len=-1)
        if len(results) != len(flat_ids):
            raise RuntimeError(f"SGLang returned {len(results)} results for "
                               f"{len(flat_ids)} requests")
        outs, k = [], 0
        for index, (i, p) in enumerate(zip(ids, params)):
            eos = () if p.ignore_eos else self.eos_token_ids
            stop_ids = tuple(t for t in p.stop_token_ids or () if t not in eos)
            samples = []
            for j in range(p.n):
                c = from_sglang_output(results[k], stop_ids)
                c.index = j
                if not p.logprobs:
                    c.logprobs = None
                samples.append(c)
                k += 1
            outs.append(RequestOutput(index, i, samples))
        return outs

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"{self.model_path} has no tokenizer; pass token-id prompts")
        return list(self.tokenizer(text)["input_ids"])

    # -- weight sync ---------------------------------------------------------------
    def num_sync_ranks(self) -> int:
        """The ranks this engine puts in a weight-update group: its tensor-parallel size
        (SGLang's rank is rank_offset + tp_rank). Pipeline parallelism and plain data
        parallelism are refused: SGLang's rank formula ignores pp_rank, and it refuses
        dp_size > 1 without DP attention."""
        args = getattr(self._engine, "server_args", None)
        if args is None:  # an engine that does not say: one rank
            return 1
        if getattr(args, "pp_size", 1) > 1:
            raise ValueError(f"SGLang weight sync with pp_size={args.pp_size}: SGLang's "
                             "update group ranks ignore the pipeline stage; use pp_size=1")
        if getattr(args, "dp_size", 1) > 1 and not getattr(args, "enable_dp_attention", False):
            raise ValueError(f"SGLang weight sync with dp_size={args.dp_size}: SGLang "
                             "refuses it without enable_dp_attention; run one engine per "
                             "data-parallel replica")
        return int(getattr(args, "tp_size", 1))

    @functools.cached_property
    def _checkpoint_shapes(self) -> dict | None:
        """The local checkpoint's tensor shapes (headers only), None without one."""
        from brorl.engine.models.weights import checkpoint_shapes

        try:
            return checkpoint_shapes(self.model_path)
        except (FileNotFoundError, OSError):
            return None

    def check_manifest(self, manifest) -> None:
        """Raises ValueError unless every tensor of `manifest` is one of the local
        checkpoint's, with its shape (dtypes may differ: SGLang casts while loading).
        A model SGLang fetched itself (no local checkpoint) is not checked."""
        if not self._checkpoint_shapes:
            return
        shapes = dict(self._checkpoint_shapes)
        if "lm_head.weight" not in shapes and "model.embed_tokens.weight" in shapes:
            shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]  # tied
        unknown = [e.name for e, _ in manifest.entries() if e.name not in shapes]
        if unknown:
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise ValueError(f"{len(unknown)} tensor(s) are not in {self.model_path}'s "
                             f"checkpoint: {unknown[:5]}{more} (a wrapper's prefix such as "
                             "'module.' or '_orig_mod.'? SGLang would skip them and answer "
                             "success)")
        for e, _ in manifest.entries():
            if tuple(e.shape) != tuple(shapes[e.name]):
                raise ValueError(f"tensor {e.name!r} has shape {tuple(e.shape)}; the "
                                 f"checkpoint's is {tuple(shapes[e.name])}")

    def init_weight_sync(self, host: str, port: int, rank_offset: int, world_size: int,
                         group_name: str = "brorl_weight_sync", backend: str = "nccl") -> None:
        """Joins the trainer's weight-sync group (the trainer is rank 0; this engine's
        ranks are rank_offset + its tensor-parallel ranks). Blocks until every rank has
        joined; SGLang's failure answer is raised."""
        with self._lock:
            result = self._engine.init_weights_update_group(
                master_address=host, master_port=port, rank_offset=rank_offset,
                world_size=world_size, group_name=group_name, backend=backend)
        _check_ok(result, "init_weights_update_group")
        self._group = group_name

    def apply_manifest(self, manifest, last: bool = True) -> None:
        """Receives the tensors of a weight-sync `Manifest`: SGLang allocates each one,
        receives its broadcast, then loads them all. A sync may come as several manifests
        (SGLang holds one call's tensors at once); the `last` one flushes SGLang's cache
        and sets `policy_version`. Blocks until the trainer has broadcast every tensor."""
        if self._group is None:
            raise RuntimeError("call init_weight_sync before apply_manifest")
        entries = manifest.entries()
        with self._lock:
            result = self._engine.update_weights_from_distributed(
                names=[e.name for e, _ in entries], dtypes=[d for _, d in entries],
                shapes=[list(e.shape) for e, _ in entries], group_name=self._group,
                flush_cache=last)
        _check_ok(result, "update_weights_from_distributed")
        if last:
            self.policy_version = manifest.version

    def close_weight_sync(self) -> None:
        """Has SGLang drop its end of the weight-update group (its communicator), where
        the SGLang version can (destroy_weights_update_group)."""
        group, self._group = self._group, None
        if group is not None and hasattr(self._engine, "destroy_weights_update_group"):
            with self._lock:
                result = self._engine.destroy_weights_update_group(group_name=group)
            _check_ok(result, "destroy_weights_update_group")

    def update_weights(self, named_tensors, version: int | None = None) -> None:
        """In-process update (SGLang's update_weights_from_tensor), flushing its cache."""
        items = list(named_tensors.items()) if hasattr(named_tensors, "items") \
            else list(named_tensors)
        with self._lock:
            result = self._engine.update_weights_from_tensor(named_tensors=items,
                                                             flush_cache=True)
        _check_ok(result, "update_weights_from_tensor")
        self.policy_version = self.policy_version + 1 if version is None else int(version)

    def stats(self) -> dict:
        return {"policy_version": self.policy_version, "backend": "sglang"}

    def shutdown(self) -> None:
        """Stops the SGLang engine (its scheduler and detokenizer processes)."""
        if hasattr(self._engine, "shutdown"):
            with self._lock:
                self._engine.shutdown()


def _check_ok(result, what: str) -> None:
    """SGLang answers (success, message) tuples or dicts; raise on a failure."""
    ok, message = True, ""
    if isinstance(result, tuple) and result:
        ok, message = bool(result[0]), str(result[1]) if len(result) > 1 else ""
    elif isinstance(result, dict):
        ok, message = bool(result.get("success", True)), str(result.get("message", ""))
    if not ok:
        raise ValueError(f"SGLang {what} failed: {message}")
