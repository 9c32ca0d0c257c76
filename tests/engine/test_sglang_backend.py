"""The SGLang backend's translation layer against a fake sglang.Engine (sglang itself is
optional and not installed in CI): SamplingParams -> SGLang dicts, results -> our
RequestOutputs, and our weight-sync manifest -> update_weights_from_distributed."""

import importlib.util

import pytest
import torch

from brorl.engine import SamplingParams
from brorl.engine.backends.sglang import SGLangEngine, from_sglang_output, to_sglang_params
from brorl.trainer.weight_sync.protocol import plan_buckets


class FakeSGLang:
    """Answers like sglang.Engine: output token k of request r is 100 * r + k."""

    def __init__(self, finish="length", update_result=(True, "ok"), matched=None,
                 init_result=(True, "ok")) -> None:
        self.calls = []
        self.init_result = init_result
        self.finish = finish
        self.matched = matched
        self.update_result = update_result

    def generate(self, input_ids, sampling_params, return_logprob, logprob_start_len=0):
        assert logprob_start_len == -1  # output tokens only: the prompt is not scored
        self.calls.append(("generate", input_ids, sampling_params, return_logprob))
        out = []
        for r, sp in enumerate(sampling_params):
            toks = [100 * r + k for k in range(sp["max_new_tokens"])]
            out.append({"text": f"r{r}", "meta_info": {
                "finish_reason": {"type": self.finish, "matched": self.matched},
                "output_token_logprobs": [(-0.5 * (k + 1), t, None)
                                          for k, t in enumerate(toks)]}})
        return out

    def init_weights_update_group(self, **kw):
        self.calls.append(("init", kw))
        return self.init_result

    def update_weights_from_distributed(self, **kw):
        self.calls.append(("update", kw))
        return self.update_result

    def update_weights_from_tensor(self, **kw):
        self.calls.append(("tensor", kw))
        return self.update_result


def test_sampling_params_translate_to_sglang_names():
    p = SamplingParams(n=4, temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, max_tokens=33,
                       min_tokens=2, seed=5, stop_token_ids=[7, 9])
    assert to_sglang_params(p) == {
        "temperature": 0.7, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "max_new_tokens": 33,
        "min_new_tokens": 2, "ignore_eos": False, "stop_token_ids": [7, 9]}
    assert "stop_token_ids" not in to_sglang_params(SamplingParams())
    assert to_sglang_params(SamplingParams(ignore_eos=True))["ignore_eos"] is True


def test_stop_tokens_with_ignore_eos_are_refused():
    """SGLang's check_finished skips stop_token_ids under ignore_eos; ours (as vLLM) stops
    on them: refused rather than run to max_tokens without a word."""
    with pytest.raises(ValueError, match="ignores stop_token_ids when ignore_eos"):
        to_sglang_params(SamplingParams(stop_token_ids=[7], ignore_eos=True))


def test_stop_strings_translate_to_stop_and_no_stop_trim():
    assert to_sglang_params(SamplingParams(stop="\n\n"))["stop"] == ["\n\n"]
    kept = to_sglang_params(SamplingParams(stop=["a", "bc"], include_stop_str_in_output=True))
    assert kept["stop"] == ["a", "bc"] and kept["no_stop_trim"] is True
    # a stop token's text is kept too, as our engine keeps it with the flag
    assert to_sglang_params(SamplingParams(stop_token_ids=[7], include_stop_str_in_output=True)
                            )["no_stop_trim"] is True
    assert "no_stop_trim" not in to_sglang_params(SamplingParams(stop_token_ids=[7]))
    plain = to_sglang_params(SamplingParams())
    assert "stop" not in plain and "no_stop_trim" not in plain
    assert "no_stop_trim" not in to_sglang_params(SamplingParams(stop="a"))


def test_generate_expands_n_and_regroups_in_order(qwen2):
    fake = FakeSGLang()
    eng = SGLangEngine(qwen2[0], engine=fake)
    prompts = [[1, 2, 3], [4, 5]]
    params = [SamplingParams(n=2, max_tokens=3), SamplingParams(n=3, max_tokens=2,
                                                                logprobs=False)]
    outs = eng.generate(prompts, params)
    _, ids, sps, want_lp = fake.calls[0]
    assert ids == [[1, 2, 3]] * 2 + [[4, 5]] * 3 and want_lp
    assert [s["max_new_tokens"] for s in sps] == [3, 3, 2, 2, 2]
    assert [o.request_id for o in outs] == [0, 1]
    assert [o.prompt_token_ids for o in outs] == prompts
    assert [c.index for c in outs[1].outputs] == [0, 1, 2]
    assert outs[0].outputs[1].token_ids == [100, 101, 102]
    assert outs[0].outputs[1].logprobs == [-0.5, -1.0, -1.5]
    assert outs[1].outputs[0].token_ids == [200, 201] and outs[1].outputs[0].logprobs is None
    assert all(c.finish_reason == "length" for o in outs for c in o.outputs)


def test_logprobs_that_do_not_match_the_tokens_raise():
    meta = {"finish_reason": {"type": "stop"}, "output_token_logprobs": [(-0.1, 1, None)]}
    with pytest.raises(ValueError, match="2 output_ids but 1 output_token_logprobs"):
        from_sglang_output({"output_ids": [1, 2], "meta_info": meta})
    out = from_sglang_output({"output_ids": [1], "meta_info": meta})
    assert out.token_ids == [1] and out.logprobs == [-0.1]


@pytest.mark.parametrize("matched,stop_ids,want", [
    ("</answer>", (), "</answer>"), (7, (7, 9), 7), (2, (7,), None), (None, (), None)],
    ids=["stop-string", "stop-token", "eos", "none"])
def test_stop_reason_is_the_matched_stop_string_or_stop_token(matched, stop_ids, want):
    meta = {"finish_reason": {"type": "stop", "matched": matched}}
    assert from_sglang_output({"output_ids": [1], "meta_info": meta},
                              stop_ids).stop_reason == want


@pytest.mark.parametrize("matched,want", [(7, 7), (2, None)])
def test_a_listed_eos_names_no_stop_reason(qwen2, matched, want):
    """As our engine: the checkpoint's EOS (2) gives None even in stop_token_ids."""
    eng = SGLangEngine(qwen2[0], engine=FakeSGLang("stop", matched=matched))
    assert eng.eos_token_ids == (2,)
    out = eng.generate([[1, 2]], SamplingParams(max_tokens=2, stop_token_ids=[2, 7]))
    assert out[0].outputs[0].stop_reason == want


def test_no_prompts_send_nothing_and_a_refused_group_join_raises(qwen2):
    fake = FakeSGLang(init_result=(False, "Failed to initialize custom process group"))
    eng = SGLangEngine(qwen2[0], engine=fake)
    assert eng.generate([], SamplingParams()) == [] and fake.calls == []
    with pytest.raises(ValueError, match="init_weights_update_group failed: Failed to init"):
        eng.init_weight_sync("127.0.0.1", 29500, 1, 2)
    with pytest.raises(RuntimeError, match="call init_weight_sync before"):  # not joined
        eng.apply_manifest(plan_buckets([("a", torch.zeros(2))], 1 << 20, version=1))


def test_a_model_without_a_local_config_still_builds(tmp_path):
    """A hub id that SGLang fetches itself: no tokenizer, no EOS ids known here."""
    eng = SGLangEngine(str(tmp_path / "org" / "model"), engine=FakeSGLang())
    assert eng.tokenizer is None and eng.eos_token_ids == ()


def test_an_aborted_request_raises():
    with pytest.raises(RuntimeError, match="abort"):
        from_sglang_output({"output_ids": [1], "meta_info": {"finish_reason":
                                                             {"type": "abort"}}})


def test_manifest_becomes_update_weights_from_distributed(qwen2):
    fake = FakeSGLang()
    eng = SGLangEngine(qwen2[0], engine=fake)
    named = [("a.weight", torch.zeros(3, 4)), ("b.bias", torch.zeros(5, dtype=torch.bfloat16))]
    manifest = plan_buckets(named, 1 << 20, version=9)
    with pytest.raises(RuntimeError, match="init_weight_sync"):
        eng.apply_manifest(manifest)
    eng.init_weight_sync("10.0.0.1", 2345, rank_offset=1, world_size=3)
    eng.apply_manifest(manifest)
    assert fake.calls[0] == ("init", dict(master_address="10.0.0.1", master_port=2345,
                                          rank_offset=1, world_size=3,
                                          group_name="brorl_weight_sync", backend="nccl"))
    assert fake.calls[1] == ("update", dict(names=["a.weight", "b.bias"],
                                            dtypes=["float32", "bfloat16"],
                                            shapes=[[3, 4], [5]],
                                            group_name="brorl_weight_sync", flush_cache=True))
    assert eng.policy_version == 9


def test_a_failed_update_is_an_error_and_keeps_the_version(qwen2):
    eng = SGLangEngine(qwen2[0], engine=FakeSGLang(update_result=(False, "shape mismatch")))
    with pytest.raises(ValueError, match="shape mismatch"):
        eng.update_weights({"a": torch.zeros(2)}, version=4)
    assert eng.policy_version == 0


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None,
                    reason="sglang is installed")
def test_without_sglang_the_error_says_what_to_install(qwen2):
    with pytest.raises(ImportError, match="pip install"):
        SGLangEngine(qwen2[0])


def test_sync_ranks_follow_sglangs_tensor_parallel_size_and_refuse_other_layouts(qwen2):
    from types import SimpleNamespace

    fake = FakeSGLang()
    eng = SGLangEngine(qwen2[0], engine=fake)
    assert eng.num_sync_ranks() == 1  # an engine that does not say
    fake.server_args = SimpleNamespace(tp_size=4, pp_size=1, dp_size=1)
    assert eng.num_sync_ranks() == 4
    fake.server_args = SimpleNamespace(tp_size=2, pp_size=2, dp_size=1)
    with pytest.raises(ValueError, match="pp_size=2"):
        eng.num_sync_ranks()
    fake.server_args = SimpleNamespace(tp_size=2, pp_size=1, dp_size=2,
                                       enable_dp_attention=False)
    with pytest.raises(ValueError, match="dp_size=2"):
        eng.num_sync_ranks()


def test_check_manifest_refuses_names_and_shapes_the_checkpoint_lacks(qwen2, tmp_path):
    eng = SGLangEngine(qwen2[0], engine=FakeSGLang())
    named = list(qwen2[1].named_parameters())
    eng.check_manifest(plan_buckets(named, 1 << 20, version=1))
    eng.check_manifest(plan_buckets(named[:3], 1 << 20, version=1))  # a partial update
    prefixed = [("_orig_mod." + n, p) for n, p in named]
    with pytest.raises(ValueError, match=f"{len(named)} tensor.*_orig_mod.*and .* more"):
        eng.check_manifest(plan_buckets(prefixed, 1 << 20, version=1))
    wrong = [(n, torch.zeros(2)) if n == "model.norm.weight" else (n, p) for n, p in named]
    with pytest.raises(ValueError, match="'model.norm.weight' has shape"):
        eng.check_manifest(plan_buckets(wrong, 1 << 20, version=1))
    hub = SGLangEngine(str(tmp_path / "org" / "model"), engine=FakeSGLang())
    hub.check_manifest(plan_buckets(prefixed, 1 << 20, version=1))  # nothing to check


def test_calls_from_two_threads_take_turns_on_the_sglang_engine(qwen2):
    """sglang.Engine runs each call on its own event loop: a generate while a sync blocks
    would raise "This event loop is already running"; it waits instead."""
    import threading
    import time

    class Slow(FakeSGLang):
        busy = False

        def update_weights_from_distributed(self, **kw):
            Slow.busy = True
            time.sleep(0.3)
            Slow.busy = False
            return super().update_weights_from_distributed(**kw)

        def generate(self, *args, **kwargs):
            assert not Slow.busy, "generate overlapped a weight update"
            return super().generate(*args, **kwargs)

    eng = SGLangEngine(qwen2[0], engine=Slow())
    eng.init_weight_sync("127.0.0.1", 1, 1, 2)
    sync = threading.Thread(target=eng.apply_manifest,
                            args=(plan_buckets([("a", torch.zeros(2))], 1 << 20, 1),))
    sync.start()
    time.sleep(0.05)
    eng.generate([[1, 2]], SamplingParams(max_tokens=2))
    sync.join()
    assert eng.policy_version == 1


def test_a_sync_in_parts_sets_the_version_and_flushes_only_at_the_last(qwen2):
    fake = FakeSGLang()
    eng = SGLangEngine(qwen2[0], engine=fake)
    eng.init_weight_sync("127.0.0.1", 1, 1, 2)
    part = plan_buckets([("a", torch.zeros(2))], 1 << 20, version=3)
    eng.apply_manifest(part, last=False)
    assert eng.policy_version == 0 and fake.calls[-1][1]["flush_cache"] is False
    eng.apply_manifest(part)
    assert eng.policy_version == 3 and fake.calls[-1][1]["flush_cache"] is True
    fake.destroy_weights_update_group = lambda **kw: fake.calls.append(("destroy", kw)) or \
        (True, "ok")
    eng.close_weight_sync()
    assert fake.calls[-1] == ("destroy", {"group_name": "brorl_weight_sync"})
    with pytest.raises(RuntimeError, match="call init_weight_sync before"):
        eng.apply_manifest(part)
