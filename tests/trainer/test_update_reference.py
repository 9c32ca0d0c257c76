"""The trainer's RL math and data flow against plain references: the update of one mini-batch
and of one rollout step against a plain reference written from the definitions (per
sequence, unpadded, full log-softmax: no shared code with trainer/update.py or
trainer/policy.py), the KL estimators against exact expectations over a categorical, dynamic
sampling with a scripted engine, and the learning-rate schedule."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from brorl.trainer.algorithms import kl_penalty
from brorl.trainer.config_load import load_config
from brorl.trainer.data import Problem
from brorl.trainer.rollout import Group
from brorl.trainer.update import (
    Sample,
    _mini_batch_step,
    build_samples,
    merge_identical,
    policy_update,
    recompute_old_logprobs,
)

VOCAB = 40
TEMPERATURE = 1.3


def _tiny_model(seed: int):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5)
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model.train()


# ---- the plain reference --------------------------------------------------------------------


def _ref_token_stats(model, s: Sample) -> tuple[torch.Tensor, torch.Tensor]:
    """log p and entropy of s's response tokens, one unpadded sequence, full log-softmax.
    Logits at position t predict token t + 1, so response token i (i >= start) is scored
    by the logits at position i - 1."""
    ids = torch.tensor(s.ids)[None]
    logits = model(input_ids=ids).logits[0].float() / TEMPERATURE  # [L, V]
    logp = torch.log_softmax(logits, dim=-1)
    pos = torch.arange(s.start - 1, len(s.ids) - 1)
    lp = logp[pos, ids[0, pos + 1]]
    ent = -(logp[pos].exp() * logp[pos]).sum(-1)
    return lp, ent


def _ref_loss(model, ref_model, samples: list[Sample], a, stats: dict | None = None
              ) -> torch.Tensor:
    """The mini-batch objective from the definitions, every sample counted on its own.
    `stats` (when given) receives the token-mean clip fraction and ratio of the mini-batch."""
    per_seq, tokens, clipped, ratios = [], [], [], []
    for s in samples:
        lp, ent = _ref_token_stats(model, s)
        beh = torch.tensor(s.behaviour_logprobs)
        adv = torch.full_like(lp, s.advantage)
        if a.old_logprobs == "recompute":
            old = torch.tensor(s.old_logprobs)
            if a.tis != "none":  # w = pi_old_trainer / pi_engine, no gradient
                w = torch.exp(old - beh)
                low = a.tis_low if a.tis_low is not None else {"truncate": 0.0,
                                                               "mask": 0.5}[a.tis]
                inside = (w >= low) & (w <= a.tis_high)
                w = w.clamp(low, a.tis_high) if a.tis == "truncate" else w * inside
                adv = adv * w
        else:
            old = beh
        ratio = torch.exp(lp - old)
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - a.eps_low, 1 + a.eps_high))
        clipped.append(-adv * ratio.clamp(1 - a.eps_low, 1 + a.eps_high) > -adv * ratio)
        ratios.append(ratio.detach())
        if a.dual_clip is not None:
            pg = torch.where(adv < 0, torch.minimum(pg, -adv * a.dual_clip), pg)
        term = pg - a.entropy_coef * ent
        if a.kl_coef:
            with torch.no_grad():
                ref_lp, _ = _ref_token_stats(ref_model, s)
            lr = (lp - ref_lp).clamp(-a.kl_clamp, a.kl_clamp)
            kl = {"k1": lr, "k2": 0.5 * lr**2, "k3": torch.exp(-lr) - 1 + lr}[a.kl_estimator]
            term = term + a.kl_coef * kl
        per_seq.append(term.mean())
        tokens.append(term)
    if stats is not None:
        stats["clip_fraction"] = torch.cat(clipped).double().mean().item()
        stats["ratio_mean"] = torch.cat(ratios).double().mean().item()
    if a.loss_agg == "token-mean":
        return torch.cat(tokens).sum() / sum(t.numel() for t in tokens)
    return torch.stack(per_seq).mean()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()}


class _NoStep:
    """An optimizer that leaves the gradients of _mini_batch_step for the test to read."""

    def __init__(self, model):
        self.model = model

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        pass


def _samples(model, seed: int) -> list[Sample]:
    """Ragged prompts and responses, some sequences repeated (same advantage and behaviour
    logprobs, as the engine gives them), behaviour logprobs = trainer logprobs + noise so
    that ratios are clipped and importance weights vary."""
    g = torch.Generator().manual_seed(seed)
    distinct = []
    for i in range(5):
        prompt = torch.randint(3, VOCAB, (2 + i % 3,), generator=g).tolist()
        resp = torch.randint(3, VOCAB, (1 + (2 * i) % 6,), generator=g).tolist()
        adv = float(torch.randn((), generator=g))
        s = Sample(prompt + resp, len(prompt), adv, [])
        with torch.no_grad():
            lp, _ = _ref_token_stats(model, s)
        s.behaviour_logprobs = (lp + 0.4 * torch.randn(lp.shape, generator=g)).tolist()
        distinct.append(s)
    return [copy.deepcopy(distinct[j]) for j in (0, 1, 1, 2, 3, 3, 3, 4, 0)]


def _cfg(*extra: str):
    return load_config(None, ["optim.grad_clip=0", "optim.logprob_chunk=3",
                              f"rollout.temperature={TEMPERATURE}", "algorithm.kl_coef=0.05",
                              "algorithm.entropy_coef=0.02", "algorithm.eps_low=0.1",
                              "algorithm.eps_high=0.15", *extra])


CASES = [
    [],
    ["algorithm.loss_agg=seq-mean-token-mean"],
    ["algorithm.dual_clip=1.5", "algorithm.kl_estimator=k3"],
    ["algorithm.old_logprobs=recompute", "algorithm.tis=truncate", "algorithm.tis_low=0.8",
     "algorithm.tis_high=1.25"],
    ["algorithm.old_logprobs=recompute", "algorithm.tis=mask", "algorithm.tis_low=0.8",
     "algorithm.tis_high=1.25", "algorithm.loss_agg=seq-mean-token-mean",
     "algorithm.dual_clip=2.0"],
]


@pytest.mark.parametrize("extra", CASES)
@pytest.mark.parametrize("micro, merge", [(1, False), (4, True), (64, False)])
def test_mini_batch_gradient_equals_the_plain_reference(extra, micro, merge):
    """Gradient accumulation over micro-batches (normalised by the whole mini-batch),
    padding masks, the logits/target shift, response offsets, TIS direction and clamping,
    dual clip, KL and entropy terms: the accumulated gradient equals the one of the
    objective written per sequence from the definitions."""
    cfg = _cfg(f"optim.micro_batch_size={micro}", f"optim.merge_identical_samples={merge}",
               *extra)
    model, ref_model = _tiny_model(0), _tiny_model(1).eval()
    mini = _samples(model, seed=2)
    if cfg.algorithm.old_logprobs == "recompute":  # reference logprobs + noise: a moved policy
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for s in mini:
                s.old_logprobs = (_ref_token_stats(model, s)[0]
                                  + 0.3 * torch.randn(s.num_response, generator=g)).tolist()
        # keep repeated sequences identical in everything, as recompute gives them
        first = {}
        for s in mini:
            s.old_logprobs = first.setdefault(tuple(s.ids), s.old_logprobs)
    rows = merge_identical(mini) if merge else [(s, 1) for s in mini]
    if merge:
        assert len(rows) < len(mini)
    stats = _mini_batch_step(model, _NoStep(model), mini, rows, cfg, 0, ref_model)
    got = _grads(model)
    model.zero_grad(set_to_none=True)
    ref_stats = {}
    loss = _ref_loss(model, ref_model, mini, cfg.algorithm, ref_stats)
    loss.backward()
    want = _grads(model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-6, rtol=1e-4, msg=name)
    assert stats["train/loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
    # statistics are token means over the whole mini-batch, whatever the micro-batching
    assert 0 < ref_stats["clip_fraction"] < 1
    for k, v in ref_stats.items():
        assert stats[f"train/{k}"] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_recompute_old_logprobs_are_the_reference_logprobs_of_each_response_token():
    cfg = _cfg("optim.micro_batch_size=3", "optim.merge_identical_samples=true")
    model = _tiny_model(3)
    samples = _samples(model, seed=4)
    recompute_old_logprobs(model, samples, cfg, pad_id=0)
    with torch.no_grad():
        for s in samples:
            want = _ref_token_stats(model, s)[0]
            assert len(s.old_logprobs) == s.num_response
            torch.testing.assert_close(torch.tensor(s.old_logprobs), want, atol=1e-5, rtol=0)


def _groups(seed: int) -> list[Group]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for gi, rewards in enumerate([[1.0, 0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0, 0.5]]):
        prompt = torch.randint(3, VOCAB, (3 + gi,), generator=g).tolist()
        resp = [torch.randint(3, VOCAB, (1 + (j + gi) % 4,), generator=g).tolist()
                for j in range(len(rewards))]
        beh = [(-3.0 + 0.3 * torch.randn(len(r), generator=g)).tolist() for r in resp]
        out.append(Group(Problem(f"p{gi}", "1", "math"), prompt, resp, beh,
                         ["stop"] * len(rewards), torch.tensor(rewards)))
    return out


def test_policy_update_takes_the_reference_sgd_steps_with_pre_update_old_logprobs():
    """num_mini_batches SGD steps over a random split; with old_logprobs=recompute every
    mini-batch's ratio is against the policy before the first of them (not re-recomputed)."""
    cfg = _cfg("algorithm.num_mini_batches=3", "algorithm.old_logprobs=recompute",
               "algorithm.tis=truncate", "optim.micro_batch_size=2", "algorithm.kl_coef=0")
    lr, seed = 0.5, 11
    model = _tiny_model(5)
    start = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    groups = _groups(6)
    metrics = policy_update(model, opt, sched, groups, cfg, 0, None,
                            torch.Generator().manual_seed(seed))

    ref = copy.deepcopy(start)
    samples, _ = build_samples(groups, cfg)  # algorithm.train_samples_per_group=0: no draws
    with torch.no_grad():
        for s in samples:
            s.old_logprobs = _ref_token_stats(ref, s)[0].tolist()
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    m = cfg.algorithm.num_mini_batches
    for i in range(m):
        mini = [samples[j] for j in sorted(order[i::m])]
        ref.zero_grad(set_to_none=True)
        _ref_loss(ref, None, mini, cfg.algorithm).backward()
        with torch.no_grad():
            for p in ref.parameters():
                if p.grad is not None:
                    p -= lr * p.grad
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)
    moved = max((p - q).abs().max().item()
                for p, q in zip(model.parameters(), start.parameters()))
    assert moved > 1e-3
    assert metrics["train/samples"] == len(samples) == 10


def test_tis_truncate_with_low_zero_is_yao_et_al_min_w_c():
    """Yao et al.'s TIS weight is min(pi_trainer / pi_engine, C), detached; tis_low=0 gives
    exactly that (the default of tis=truncate; tis_low=0.5 would also lift small weights)."""
    from brorl.trainer.algorithms import tis_weights

    g = torch.Generator().manual_seed(0)
    trainer = (torch.randn(3, 6, generator=g, dtype=torch.float64) - 1).requires_grad_()
    engine = torch.randn(3, 6, generator=g, dtype=torch.float64) - 1
    mask = torch.rand(3, 6, generator=g) > 0.3
    w, _ = tis_weights(trainer, engine, mask, low=0.0, high=2.0)
    want = torch.where(mask, torch.exp(trainer - engine).clamp(max=2.0), 0.0).detach()
    torch.testing.assert_close(w, want, atol=1e-12, rtol=0)
    assert not w.requires_grad and (w[mask] < 0.5).any()


def test_behaviour_logprobs_that_do_not_match_the_response_are_an_error():
    """A backend whose logprobs list misses a token (e.g. a trimmed stop token) must not
    train on a misaligned ratio: _per_token fills the gap with 0, i.e. ratio = p_theta."""
    cfg = _cfg("algorithm.kl_coef=0", "optim.micro_batch_size=4")
    model = _tiny_model(10)
    groups = _groups(12)
    groups[0].behaviour_logprobs[1] = groups[0].behaviour_logprobs[1][:-1]
    assert len(groups[0].behaviour_logprobs[1]) < len(groups[0].response_ids[1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    with pytest.raises(ValueError, match="logprobs"):
        policy_update(model, opt, sched, groups, cfg, 0, None, torch.Generator().manual_seed(0))


# ---- advantages over the kept batch ---------------------------------------------------------


def test_build_samples_whitens_over_the_samples_it_trains_on():
    """REINFORCE++-baseline: reward minus group mean, then whitened over the kept batch (the
    groups given); each sample's advantage sits on its own response."""
    cfg = load_config(None, [])
    groups = _groups(7)
    samples, metrics = build_samples(groups, cfg)
    adv = torch.tensor([s.advantage for s in samples])
    rewards = torch.stack([g.rewards for g in groups])
    centred = (rewards - rewards.mean(1, keepdim=True)).flatten()
    want = centred / (centred.std() + 1e-6)
    torch.testing.assert_close(adv, want, atol=1e-6, rtol=0)
    assert [s.ids[s.start:] for s in samples] == [r for g in groups for r in g.response_ids]
    assert metrics["advantage/max"] == pytest.approx(float(want.max()), abs=1e-6)


# ---- KL estimators against exact expectations -----------------------------------------------


def _categorical(seed: int, v: int = 7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(v, generator=g, dtype=torch.float64).requires_grad_()
    ref = torch.log_softmax(torch.randn(v, generator=g, dtype=torch.float64), -1)
    return logits, ref


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_k1_and_k3_are_unbiased_for_kl_policy_to_reference(kind):
    logits, ref = _categorical(0)
    logp = torch.log_softmax(logits, -1).detach()
    exact = (logp.exp() * (logp - ref)).sum()
    estimate = (logp.exp() * kl_penalty(logp[None], ref[None], kind)[0]).sum()
    assert estimate.item() == pytest.approx(exact.item(), abs=1e-12)


def test_k2_as_a_loss_gives_the_exact_gradient_of_kl_policy_to_reference():
    """E_{x~pi}[grad 0.5 (log pi(x) - log ref(x))^2] = grad KL(pi || ref): k2 in the loss
    (the default) pulls the policy toward the reference with the right gradient."""
    logits, ref = _categorical(1)
    logp = torch.log_softmax(logits, -1)
    (exact_grad,) = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), logits,
                                        retain_graph=True)
    surrogate = (logp.exp().detach() * kl_penalty(logp[None], ref[None], "k2")[0]).sum()
    (k2_grad,) = torch.autograd.grad(surrogate, logits)
    torch.testing.assert_close(k2_grad, exact_grad, atol=1e-12, rtol=0)


def test_k1_as_a_loss_has_zero_expected_gradient():
    """Documents a pitfall: k1 (log-ratio) in the loss has E[grad] = E[grad log pi] = 0, so
    kl_estimator=k1 with kl_coef > 0 adds only noise, no pull toward the reference."""
    logits, ref = _categorical(2)
    logp = torch.log_softmax(logits, -1)
    surrogate = (logp.exp().detach() * kl_penalty(logp[None], ref[None], "k1")[0]).sum()
    (grad,) = torch.autograd.grad(surrogate, logits)
    assert grad.abs().max().item() < 1e-12


# ---- dynamic sampling -----------------------------------------------------------------------


class _Tokenizer:
    chat_template = None

    def __call__(self, text):
        return {"input_ids": [3 + ord(c) % 30 for c in text]}


class _ScriptedEngine:
    """Each prompt "pK" answers with the rewards REWARDS[K] (the text is the reward)."""

    tokenizer = _Tokenizer()

    def __init__(self, rewards):
        self.rewards = rewards
        self.requests: list[int] = []

    def generate(self, prompts, params, use_tqdm=False):
        from brorl.engine.outputs import CompletionOutput, RequestOutput

        self.requests.append(len(prompts))
        outs = []
        for i, (ids, p) in enumerate(zip(prompts, params)):
            k = self._index[tuple(ids)]
            outs.append(RequestOutput(i, ids, [
                CompletionOutput(j, [5], [-0.5], "stop", str(r))
                for j, r in enumerate(self.rewards[k][:p.n])]))
        return outs


class _Pool:
    stats = {"timeouts": 0, "errors": 0}
    status = "ok"  # "error": every sample's verifier raised

    def score(self, items):
        if self.status != "ok":
            return [SimpleNamespace(score=0.0, status=self.status, detail="ImportError: x")
                    for _ in items]
        return [SimpleNamespace(score=float(it.response), status="ok") for it in items]


class _Stream:
    def __init__(self, problems):
        self.problems, self.pos = problems, 0

    def take(self, k):
        out = self.problems[self.pos:self.pos + k]
        self.pos += k
        return out


def _rollouts(rewards, prompts_per_step, max_prompts, dynamic=True, oversample=False,
              pool=None):
    from brorl.trainer.rollout import collect_rollouts

    problems = [Problem(f"p{k}", "1", "math") for k in range(len(rewards))]
    engine = _ScriptedEngine(rewards)
    engine._index = {tuple(_Tokenizer()(p.prompt)["input_ids"]): k
                     for k, p in enumerate(problems)}
    cfg = load_config(None, [f"rollout.n={len(rewards[0])}",
                             f"rollout.prompts_per_step={prompts_per_step}",
                             f"rollout.max_prompts_per_step={max_prompts}",
                             f"rollout.dynamic_sampling={str(dynamic).lower()}",
                             f"rollout.oversample={str(oversample).lower()}",
                             "progress=false"])
    out = collect_rollouts(engine, _Stream(problems), pool or _Pool(), cfg, step=1)
    return out, engine


def test_a_verifier_that_fails_on_every_sample_is_reported(caplog):
    pool = _Pool()
    pool.status = "error"
    with caplog.at_level("WARNING", logger="brorl"):
        out, _ = _rollouts([MIXED, MIXED], prompts_per_step=1, max_prompts=2, pool=pool)
    assert "the verifier failed on all 4 samples" in caplog.text and "ImportError" in caplog.text
    assert out.groups == []  # all scored 0: no group passes
    caplog.clear()
    with caplog.at_level("WARNING", logger="brorl"):
        _rollouts([MIXED, MIXED], prompts_per_step=1, max_prompts=2)
    assert "verifier failed" not in caplog.text


ALL_OK, ALL_BAD, MIXED = [1.0] * 4, [0.0] * 4, [1.0, 0.0, 0.0, 0.0]


def test_dynamic_sampling_refills_until_enough_groups_pass():
    rewards = [ALL_OK, MIXED, ALL_BAD, MIXED, ALL_OK, MIXED, MIXED, MIXED]
    out, engine = _rollouts(rewards, prompts_per_step=3, max_prompts=8)
    assert [g.problem.prompt for g in out.groups] == ["p1", "p3", "p5"]
    assert engine.requests == [3, 2, 1]  # each draw asks for what is still missing
    m = out.metrics
    assert m["rollout/groups_generated"] == 6 and m["rollout/groups_kept"] == 3
    assert m["rollout/pass_rate"] == pytest.approx(3 / 6)
    assert m["rollout/all_correct_groups"] == 2 and m["rollout/all_wrong_groups"] == 1
    # every group's solve rate q is 0, 1 or 1/4: keep rate 1 - q^4 - (1-q)^4 = 0.6796875
    assert m["rollout/predicted_pass_rate"] == pytest.approx(3 * 0.6796875 / 6)


def test_pass_rate_n16_is_measured_on_each_groups_first_16_samples():
    from brorl.trainer.rollout import rollout_metrics

    def group(rewards):
        n = len(rewards)
        return Group(Problem("p", "1", "math"), [1], [[2]] * n, [[-0.1]] * n, ["stop"] * n,
                     torch.tensor(rewards, dtype=torch.float32))

    ok_after_16 = [0.0] * 16 + [1.0] * 16  # passes at N=32, not on its first 16 samples
    mixed_early = [0.0, 1.0] + [0.0] * 30
    all_bad = [0.0] * 32
    groups = [group(ok_after_16), group(mixed_early), group(all_bad), group(mixed_early)]
    m = rollout_metrics(groups, groups[:2] + groups[3:], seconds=1.0)
    assert m["rollout/pass_rate"] == pytest.approx(3 / 4)
    assert m["rollout/pass_rate_n16"] == pytest.approx(2 / 4)
    assert "rollout/pass_rate_n16" not in rollout_metrics([group([0.0, 1.0] * 8)], [], 1.0)


def test_oversampling_asks_for_the_missing_groups_over_the_pass_rate_and_drops_extras():
    rewards = [ALL_OK, MIXED, ALL_BAD, MIXED, ALL_OK, MIXED, MIXED, MIXED, MIXED]
    out, engine = _rollouts(rewards, prompts_per_step=3, max_prompts=8, oversample=True)
    # 1 of 3 passed: the 2 missing need 6 more at that rate, capped at 8 - 3 = 5
    assert engine.requests == [3, 5]
    assert [g.problem.prompt for g in out.groups] == ["p1", "p3", "p5"]
    m = out.metrics
    assert m["rollout/groups_generated"] == 8 and m["rollout/groups_kept"] == 3
    assert m["rollout/groups_dropped"] == 2 and m["rollout/pass_rate"] == pytest.approx(5 / 8)
    # none passed yet: ask for everything still allowed
    out, engine = _rollouts([ALL_OK, ALL_BAD, MIXED, MIXED, MIXED], prompts_per_step=2,
                            max_prompts=5, oversample=True)
    assert engine.requests == [2, 3] and len(out.groups) == 2
    assert out.metrics["rollout/groups_dropped"] == 1


def test_dynamic_sampling_gives_up_at_max_prompts_and_keeps_what_passed():
    rewards = [ALL_OK, MIXED, ALL_BAD, ALL_BAD, ALL_OK, MIXED]
    out, engine = _rollouts(rewards, prompts_per_step=3, max_prompts=5)
    assert [g.problem.prompt for g in out.groups] == ["p1"]
    assert sum(engine.requests) == 5
    assert out.metrics["rollout/pass_rate"] == pytest.approx(1 / 5)


def test_without_dynamic_sampling_constant_groups_are_kept():
    out, engine = _rollouts([ALL_OK, MIXED, ALL_BAD], prompts_per_step=3, max_prompts=3,
                            dynamic=False)
    assert len(out.groups) == 3 and engine.requests == [3]


# ---- learning-rate schedule -----------------------------------------------------------------


def test_lr_schedule_warms_up_then_follows_cosine_over_all_optimizer_steps():
    from brorl.trainer.loop import _lr_lambda

    cfg = load_config(None, ["steps=3", "algorithm.num_mini_batches=2", "optim.warmup_steps=2",
                             "optim.schedule=cosine"])
    f = _lr_lambda(cfg)
    want = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * (i - 2) / 4)) for i in range(2, 6)]
    assert [f(i) for i in range(6)] == pytest.approx(want)
    assert f(6) == pytest.approx(0.0)  # reached only after the last optimizer step
    flat = _lr_lambda(load_config(None, ["optim.warmup_steps=0"]))
    assert flat(0) == flat(1000) == 1.0


def test_policy_update_steps_the_schedule_once_per_mini_batch():
    cfg = _cfg("algorithm.num_mini_batches=3", "algorithm.kl_coef=0",
               "optim.micro_batch_size=16")
    model = _tiny_model(8)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    seen = []
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: seen.append(i) or 0.1 * (i + 1))
    metrics = policy_update(model, opt, sched, _groups(9), cfg, 0, None,
                            torch.Generator().manual_seed(0))
    assert seen == [0, 1, 2, 3]
    assert metrics["train/lr"] == pytest.approx(0.4)


def test_tis_needs_recomputed_old_logprobs_and_its_low_bound_follows_the_mode():
    with pytest.raises(ValueError, match="needs algorithm.old_logprobs=recompute"):
        _cfg("algorithm.tis=truncate")
    assert _cfg().algorithm.tis == "none"
    truncate = _cfg("algorithm.old_logprobs=recompute", "algorithm.tis=truncate").algorithm
    mask = _cfg("algorithm.old_logprobs=recompute", "algorithm.tis=mask").algorithm
    assert truncate.tis_bounds == (0.0, 5.0) and mask.tis_bounds == (0.5, 5.0)
    set_low = _cfg("algorithm.old_logprobs=recompute", "algorithm.tis=truncate",
                   "algorithm.tis_low=0.2").algorithm
    assert set_low.tis_bounds == (0.2, 5.0)


def test_load_policy_turns_dropout_off_in_train_mode(tmp_path):
    """The trainer's logprobs must be the policy's: a checkpoint with dropout gives the same
    logits twice in train mode."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from brorl.trainer.policy import load_policy

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, attention_dropout=0.5)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    model = load_policy(str(tmp_path))
    assert model.training
    ids = torch.arange(1, 17)[None]
    torch.manual_seed(0)
    a = model(ids).logits
    b = model(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
