"""The fused Triton sampler against the torch reference (`sample_ref`): exact tokens and
logprobs within 1e-6 on random rows (temperatures incl. 0, top-k, top-p, min-p, their
combinations, ties, banned tokens, ragged vocabularies, B=1), a chi-square check of the
drawn frequencies, input checks, and (GPU only) real shapes in bf16. On CPU the kernel runs
under TRITON_INTERPRET=1 (tests/conftest.py), about 30 ms per row, so shapes are tiny."""

import math

import numpy as np
import pytest
import torch

from brorl.kernels.sampling import _auto_impl, row_keys, sample, sample_ref

triton = pytest.importorskip("triton")
st = pytest.importorskip("brorl.kernels.sampling_triton")

CHI2_999_DF3 = 16.27  # chi-square critical value, 3 degrees of freedom, p = 0.001


def keys_for(B, seed=0, position=0):
    return row_keys([seed] * B, [0] * B, list(range(B)), [position] * B)


def mixed_params(B, gen):
    """Per-row parameters covering greedy rows, each truncation alone and combined."""
    temperature = torch.tensor([0.0, 1.0, 0.7, 1.3])[torch.arange(B) % 4]
    top_k = torch.tensor([-1, 5, 0, 1, 40, 1000])[torch.randint(0, 6, (B,), generator=gen)]
    top_p = torch.tensor([1.0, 0.9, 0.5, 0.0, 0.99])[torch.randint(0, 5, (B,), generator=gen)]
    min_p = torch.tensor([0.0, 0.0, 0.05, 0.3])[torch.randint(0, 4, (B,), generator=gen)]
    return temperature, top_k, top_p, min_p


def assert_same(logits, params, keys, banned=None):
    t_ref, lp_ref = sample_ref(logits, *params, keys, banned)
    t_tr, lp_tr = st.sample_triton(logits, *params, keys, banned)
    assert torch.equal(t_ref, t_tr), (t_ref, t_tr)
    torch.testing.assert_close(lp_tr, lp_ref, rtol=0, atol=1e-6)
    return t_tr


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks smaller than the vocabulary, so every pass crosses ragged block edges."""
    monkeypatch.setattr(st, "BLOCK", 64)
    monkeypatch.setattr(st, "SEARCH_BLOCK", 32)


@pytest.mark.parametrize("V,dtype", [(203, torch.float32), (130, torch.float16)])
def test_triton_sampler_equals_reference_on_mixed_rows(small_blocks, V, dtype):
    gen = torch.Generator().manual_seed(V)
    B = 12
    logits = (torch.randn(B, V, generator=gen) * 3).to(dtype)
    params = mixed_params(B, gen)
    tokens = assert_same(logits, params, keys_for(B, seed=V))
    assert torch.equal(tokens[::4], logits[::4].float().argmax(-1))


def test_triton_sampler_equals_reference_with_banned_tokens(small_blocks):
    gen = torch.Generator().manual_seed(7)
    B, V = 8, 150
    logits = torch.randn(B, V, generator=gen) * 2
    banned = torch.zeros(B, V, dtype=torch.bool)
    banned[::2, logits[0].argmax()] = True  # the likeliest token of row 0 is banned
    banned[1::2, 100:] = True
    banned[3] = True
    banned[3, 7] = False  # a single allowed token
    tokens = assert_same(logits, mixed_params(B, gen), keys_for(B, seed=2), banned)
    assert not banned.gather(1, tokens[:, None]).any()
    assert tokens[3] == 7


def test_ties_at_the_threshold_are_kept_like_the_reference(small_blocks):
    """Integer logits: top-k and top-p boundaries fall inside runs of equal values."""
    gen = torch.Generator().manual_seed(3)
    B, V = 8, 97
    logits = torch.randint(-3, 4, (B, V), generator=gen).float()
    temperature = torch.ones(B)
    top_k = torch.tensor([3, 10, -1, -1, 20, 1, 50, -1])
    top_p = torch.tensor([1.0, 1.0, 0.5, 0.8, 0.6, 1.0, 0.95, 0.3])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.2, 0.0, 0.0, 0.1, 0.0])
    assert_same(logits, (temperature, top_k, top_p, min_p), keys_for(B, seed=5))


def test_single_row_with_default_blocks_and_infinite_logits():
    V = 1500  # > BLOCK: two blocks, the second one ragged
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(1)) * 4
    logits[0, 1000:1100] = -math.inf
    for params in [(torch.tensor([0.8]), torch.tensor([-1]), torch.tensor([1.0]),
                    torch.tensor([0.0])),
                   (torch.tensor([1.0]), torch.tensor([1450]), torch.tensor([0.9]),
                    torch.tensor([0.01]))]:
        assert_same(logits, params, keys_for(1, seed=4))


def test_sample_dispatches_to_triton():
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 40, generator=gen)
    params = mixed_params(3, gen)
    keys = keys_for(3)
    t_ref, _ = sample_ref(logits, *params, keys)
    t_tr, _ = sample(logits, *params, keys, impl="triton")
    assert torch.equal(t_ref, t_tr)
    assert _auto_impl(torch.device("cuda")) == "triton"
    assert _auto_impl(torch.device("cpu")) in ("numba", "torch")
    with pytest.raises(ValueError, match="unknown sampling impl"):
        sample(logits, *params, keys, impl="cuda")


def test_sampled_frequencies_match_softmax_of_scaled_logits():
    V, B, T = 4, 240, 0.8
    logits = torch.tensor([0.3, -0.4, 0.9, 0.0])
    tokens, logprobs = st.sample_triton(
        logits.expand(B, V).contiguous(), torch.full((B,), T), torch.full((B,), -1),
        torch.ones(B), torch.zeros(B), keys_for(B, seed=3))
    probs = torch.softmax(logits / T, -1)
    counts = torch.bincount(tokens, minlength=V).double()
    chi2 = ((counts - B * probs) ** 2 / (B * probs)).sum().item()
    assert chi2 < CHI2_999_DF3, chi2
    torch.testing.assert_close(logprobs, torch.log(probs)[tokens].float())


def test_bad_inputs_raise_clear_errors():
    B, V = 2, 10
    logits = torch.randn(B, V)
    params = [torch.ones(B), torch.full((B,), -1), torch.ones(B), torch.zeros(B)]
    keys = keys_for(B)
    with pytest.raises(ValueError, match="logits must have 2 dims"):
        st.sample_triton(logits[0], *params, keys)
    with pytest.raises(ValueError, match="top_p must have shape"):
        st.sample_triton(logits, params[0], params[1], torch.ones(3), params[3], keys)
    with pytest.raises(ValueError, match="top_k must be an integer"):
        st.sample_triton(logits, params[0], torch.ones(B), params[2], params[3], keys)
    with pytest.raises(ValueError, match="keys for"):
        st.sample_triton(logits, *params, keys[:1])
    with pytest.raises(ValueError, match="banned must be a bool"):
        st.sample_triton(logits, *params, keys, torch.zeros(B, V + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        st.sample_triton(logits.numpy(), *params, keys)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_sampler_equals_reference_at_real_shapes(dtype):
    gen = torch.Generator().manual_seed(0)
    B, V = 512, 151936
    logits = (torch.randn(B, V, generator=gen) * 4).to(dtype).cuda()
    params = [p.cuda() for p in mixed_params(B, gen)]
    banned = torch.zeros(B, V, dtype=torch.bool, device="cuda")
    banned[::5, 151643:151646] = True
    keys = keys_for(B, seed=1)
    for ban in (None, banned):
        t_ref, lp_ref = sample_ref(logits, *params, keys, ban)
        t_tr, lp_tr = st.sample_triton(logits, *params, keys, ban)
        mismatch = (t_ref != t_tr).sum().item()
        assert mismatch == 0, f"{mismatch} of {B} tokens differ"
        torch.testing.assert_close(lp_tr, lp_ref, rtol=0, atol=1e-5)
    assert np.isfinite(lp_tr.cpu().numpy()).all()
