"""The engine end to end on a CUDA GPU (marked gpu; skipped without one): with the Triton
kernels, greedy tokens and logprobs equal transformers' in float32, merged samples equal
unmerged ones, a small KV pool preempts yet gives the same samples, and bf16 runs."""

import copy

import pytest
import torch

from brorl.engine import Engine, SamplingParams
from tests.helpers import FAMILIES

pytestmark = pytest.mark.gpu

PAGE = 16
MAX_NEW = 12


def hf_greedy_cuda(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    out = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=MAX_NEW,
                         do_sample=False, output_logits=True, return_dict_in_generate=True,
                         eos_token_id=None, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = torch.stack([torch.log_softmax(lg[0].float(), -1)[t]
                            for lg, t in zip(out.logits, tokens)])
    return tokens, logprobs.cpu()


def tokens_of(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_greedy_matches_transformers_with_triton_kernels(checkpoints, family):
    path, model = checkpoints[family]
    hf = copy.deepcopy(model).cuda().eval()
    engine = Engine(path, device="cuda", page_size=PAGE, max_kv_tokens=8192,
                    debug_integrity=True)
    assert engine.stats()["attention_backend"] == "triton"
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist()
               for n in (1, PAGE - 1, PAGE, PAGE + 1, 3 * PAGE + 5)]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW,
                                                   ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        tokens, logprobs = hf_greedy_cuda(hf, prompt)
        assert out.outputs[0].token_ids == tokens, f"prompt of length {len(prompt)}"
        torch.testing.assert_close(torch.tensor(out.outputs[0].logprobs), logprobs,
                                   atol=1e-4, rtol=0)


def test_cuda_merged_and_preempted_samples_equal_plain_ones(qwen2):
    path, _ = qwen2
    prompts = [list(range(5, 40)), list(range(40, 43))]
    params = SamplingParams(n=48, temperature=0.05, max_tokens=24, seed=3, ignore_eos=True)

    def run(**kw):
        engine = Engine(path, device="cuda", page_size=PAGE, debug_integrity=True,
                        **{"max_kv_tokens": 8192, **kw})
        return engine, engine.generate(prompts, params)

    merged_engine, merged = run()
    _, plain = run(merge_identical_samples=False)
    small_engine, small = run(max_kv_tokens=12 * PAGE, reserve_ratio=0.0)
    assert tokens_of(merged) == tokens_of(plain) == tokens_of(small)
    for a, b in zip(merged, plain):
        for ca, cb in zip(a.outputs, b.outputs):
            torch.testing.assert_close(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs),
                                       atol=1e-4, rtol=0)
    s = merged_engine.stats()
    assert s["decode_rows"] < s["decode_tokens"] / 2
    assert small_engine.stats()["preemptions"] > 0
    assert s["free_pages"] + s["cached_pages"] == s["num_pages"]


def test_cuda_bfloat16_engine_runs_and_tracks_float32(qwen2):
    path, model = qwen2
    prompts = [list(range(3, 3 + n)) for n in (1, 17, 40)]
    params = SamplingParams(n=8, temperature=1.0, max_tokens=16, seed=0, ignore_eos=True)
    engine = Engine(path, device="cuda", dtype="bfloat16", page_size=PAGE, max_kv_tokens=4096)
    outs = engine.generate(prompts, params)
    assert all(len(c.token_ids) == 16 and c.finish_reason == "length"
               and all(torch.isfinite(torch.tensor(c.logprobs)))
               for o in outs for c in o.outputs)
    hf = copy.deepcopy(model).cuda().eval()
    greedy = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=1,
                                                     ignore_eos=True))
    for prompt, out in zip(prompts, greedy):  # the first token: same prompt, same logits
        _, logprobs = hf_greedy_cuda(hf, prompt)
        assert abs(out.outputs[0].logprobs[0] - logprobs[0].item()) < 0.05


def test_cuda_decode_host_seconds_take_the_device_time_off_the_step(qwen2):
    """On CUDA the host clock sees only launches: the device's model and sampling time
    (CUDA events) is what decode_host_seconds takes off each step."""
    engine = Engine(qwen2[0], device="cuda", max_kv_tokens=8192)
    engine.generate(list(range(3, 20)), SamplingParams(n=8, max_tokens=5, seed=0))
    s = engine.stats()
    assert engine.runner.last_start_event is not None
    assert engine.sampler.last_end_event is not None
    assert 0 < s["decode_host_seconds"] < s["decode_step_seconds"]
