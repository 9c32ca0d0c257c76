"""Chunked token logprobs + entropy against the full log-softmax, values and gradients."""

import pytest
import torch

from brorl.trainer.policy import load_policy, pad_batch, token_logprobs, token_logprobs_ref
from tests.helpers import make_checkpoint


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy")
    make_checkpoint(path, "qwen2", seed=3, tie_word_embeddings=True)
    return load_policy(str(path))


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    lens = [7, 12, 3, 9]
    seqs = [torch.randint(3, 128, (n,), generator=g).tolist() for n in lens]
    starts = [2, 5, 1, 8]  # ragged prompts; the last has one response token
    return pad_batch(seqs, starts, pad_id=0)


@pytest.mark.parametrize("chunk,temperature", [(1, 1.0), (5, 0.7), (1024, 1.3)])
def test_chunked_logprobs_and_entropy_equal_full_log_softmax(policy, chunk, temperature):
    ids, targets, mask = _batch(0)
    lp, ent = token_logprobs(policy, ids, targets, mask, temperature, chunk)
    lp_ref, ent_ref = token_logprobs_ref(policy, ids, targets, mask, temperature)
    torch.testing.assert_close(lp, lp_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent_ref, atol=1e-5, rtol=1e-5)
    assert (lp[~mask] == 0).all() and (lp[mask] < 0).all()


def test_chunked_gradients_equal_the_reference(policy):
    ids, targets, mask = _batch(1)
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2))

    def grads(fn):
        policy.zero_grad()
        lp, ent = fn()
        ((lp * weights).sum() + 0.3 * (ent * weights).sum()).backward()
        return [p.grad.clone() for p in policy.parameters()]

    got = grads(lambda: token_logprobs(policy, ids, targets, mask, 0.9, chunk=4))
    want = grads(lambda: token_logprobs_ref(policy, ids, targets, mask, 0.9))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_activation_checkpointing_gives_the_same_logprobs_and_gradients(tmp_path):
    """optim.gradient_checkpointing: each decoder layer recomputed in backward, the same
    numbers, and far fewer tensors kept for backward."""
    make_checkpoint(tmp_path, "qwen2", seed=4)
    ids, targets, mask = _batch(3)
    out = []
    for checkpointing in (False, True):
        model = load_policy(str(tmp_path), checkpointing=checkpointing)
        kept = [0]

        def pack(t, kept=kept):
            kept[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lp, ent = token_logprobs(model, ids, targets, mask, 1.0, chunk=4)
        (lp.sum() + ent.sum()).backward()
        out.append((lp.detach(), [p.grad for p in model.parameters()], kept[0]))
    assert out[1][2] < out[0][2] / 3  # 49k against 261k elements here
    torch.testing.assert_close(out[0][0], out[1][0], atol=0, rtol=0)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_pad_batch_masks_exactly_the_response_targets():
    ids, targets, mask = pad_batch([[5, 6, 7, 8], [9, 10]], [2, 1], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert targets.tolist() == [[6, 7, 8], [10, 0, 0]]
    assert mask.tolist() == [[False, True, True], [True, False, False]]
    with pytest.raises(ValueError, match="response start"):
        pad_batch([[1, 2]], [2], pad_id=0)


def test_tf32_sets_cuda_matmuls_only_and_back():
    from pathlib import Path

    from brorl.trainer.config_load import load_config
    from brorl.trainer.policy import set_matmul_precision

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        set_matmul_precision(torch.device("cpu"), True)
        assert matmul.fp32_precision == "ieee"
        set_matmul_precision(torch.device("cuda", 0), True)
        assert matmul.fp32_precision == "tf32"
        set_matmul_precision(torch.device("cuda"), False)
        assert matmul.fp32_precision == "ieee"
    finally:
        matmul.fp32_precision = before
    gpu = Path(__file__).resolve().parents[2] / "trainer" / "configs" / "brorl-gpu.yaml"
    assert load_config(None, []).optim.tf32 is False
    assert load_config(str(gpu), []).optim.tf32 is True
