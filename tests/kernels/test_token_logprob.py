"""Token logprob + entropy from hidden states and the LM head: the chunked torch reference
against the full log-softmax (values and gradients of sum a*logp + b*entropy), the fused
Triton forward (under the interpreter on CPU) against the reference in float32 and
float16, with T, V and H not multiples of the blocks; bf16 at a real shape on a GPU."""

import importlib.util

import pytest
import torch

from brorl.kernels.token_logprob import token_logprob_entropy, token_stats_ref


def make(T, H, V, dtype=torch.float32, bias=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * H ** -0.5 * 3
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    targets = torch.randint(0, V, (T,), generator=g)
    cast = lambda t: None if t is None else t.to(dtype).to(device)
    return cast(hidden), cast(weight), cast(b), targets.to(device)


def dense(hidden, weight, bias, targets, temperature):
    """The plain definition: the full [T, V] log-softmax."""
    z = torch.nn.functional.linear(hidden.float(), weight.float(),
                                   None if bias is None else bias.float()) / temperature
    logp = torch.log_softmax(z, -1)
    return logp.gather(1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def grads(fn, hidden, weight, bias, targets, a, b):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)
              if t is not None]
    lp, ent = fn(*leaves, *([None] if bias is None else []), targets)
    ((a * lp).sum() + (b * ent).sum()).backward()
    return (lp.detach(), ent.detach()), [t.grad for t in leaves]


@pytest.mark.parametrize("bias,temperature", [(True, 1.0), (False, 0.7)])
def test_reference_equals_full_log_softmax_values_and_gradients(bias, temperature):
    T, H, V = 29, 24, 301
    hidden, weight, b, targets = make(T, H, V, bias=bias)
    gen = torch.Generator().manual_seed(1)
    a, c = torch.randn(T, generator=gen), torch.randn(T, generator=gen)
    want, want_g = grads(lambda h, w, bb, t: dense(h, w, bb, t, temperature),
                         hidden, weight, b, targets, a, c)
    got, got_g = grads(lambda h, w, bb, t: token_logprob_entropy(
        h, w, t, bb, temperature, impl="torch", chunk=64), hidden, weight, b, targets, a, c)
    for x, y in zip(got + tuple(got_g), want + tuple(want_g)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_reference_online_lse_does_not_depend_on_the_chunk():
    hidden, weight, b, targets = make(7, 16, 100)
    one = token_stats_ref(hidden, weight, b, targets, chunk=100)
    many = token_stats_ref(hidden, weight, b, targets, chunk=9)
    for x, y in zip(one, many):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-5)


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed")


@needs_triton
@pytest.mark.parametrize("T,H,V,dtype,bias", [(37, 40, 203, torch.float32, True),
                                              (5, 33, 70, torch.float32, False),
                                              (21, 48, 150, torch.float16, True)])
def test_triton_equals_reference_values_and_gradients(T, H, V, dtype, bias):
    hidden, weight, b, targets = make(T, H, V, dtype=dtype, bias=bias, seed=T)
    gen = torch.Generator().manual_seed(2)
    a, c = torch.randn(T, generator=gen), torch.randn(T, generator=gen)
    temperature = 0.9
    # the same function on the same inputs: with fp16 inputs both round each logit to fp16
    # (the kernel after its float32 accumulation, the reference as F.linear returns it),
    # so the shared backward is the gradient of either forward
    want, want_g = grads(lambda h, w, bb, t: token_logprob_entropy(
        h, w, t, bb, temperature, impl="torch", chunk=64), hidden, weight, b, targets, a, c)
    got, got_g = grads(lambda h, w, bb, t: token_logprob_entropy(
        h, w, t, bb, temperature, impl="triton"), hidden, weight, b, targets, a, c)
    # fp16: F.linear's fp16 accumulation depends on the CPU's instruction set (with
    # AVX-512-FP16 and AMX a value here moved by 6e-5 relative, 5.4e-4 absolute, against
    # under 5e-5 on the machines this test ran on before), so a logit can round to the
    # neighbouring fp16 value
    tol = 2e-5 if dtype == torch.float32 else 2e-4
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)
    for x, y in zip(got_g, want_g):  # fp16 gradients: within an fp16 rounding of each other
        scale = float(y.float().abs().max())
        torch.testing.assert_close(x.float(), y.float(), rtol=0,
                                   atol=scale * (2e-5 if dtype == torch.float32 else 1e-3))


def test_bad_inputs_raise_clear_errors():
    hidden, weight, b, targets = make(4, 8, 20)
    with pytest.raises(ValueError, match="hidden \\[T, H\\] and weight"):
        token_logprob_entropy(hidden, weight[:, :5], targets)
    with pytest.raises(ValueError, match="targets must be"):
        token_logprob_entropy(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprob_entropy(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="dtypes differ"):
        token_logprob_entropy(hidden.half(), weight, targets)
    with pytest.raises(ValueError, match="targets outside"):
        token_logprob_entropy(hidden, weight, targets + 20, impl="torch")
    with pytest.raises(ValueError, match="unknown token logprob impl"):
        token_logprob_entropy(hidden, weight, targets, impl="cuda")


@needs_triton
@pytest.mark.gpu
def test_triton_equals_reference_at_a_real_shape_bf16():
    T, H, V = 1000, 1536, 151936
    hidden, weight, b, targets = make(T, H, V, dtype=torch.bfloat16, bias=False,
                                      device="cuda")
    from brorl.kernels.token_logprob_triton import token_stats_triton

    got = token_stats_triton(hidden, weight, None, targets)
    want = token_stats_ref(hidden, weight, None, targets)  # bf16 logits (cuBLAS output)
    full = dense(hidden, weight, None, targets, 1.0)
    torch.testing.assert_close(got[0], full[0], rtol=0, atol=5e-2)
    torch.testing.assert_close(got[1], full[1], rtol=0, atol=5e-2)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-1)
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(T, device="cuda", generator=gen)
    _, g_tr = grads(lambda h, w, bb, t: token_logprob_entropy(h, w, t, impl="triton"),
                    hidden, weight, None, targets, a, a)
    _, g_ref = grads(lambda h, w, bb, t: token_logprob_entropy(h, w, t, impl="torch"),
                     hidden, weight, None, targets, a, a)
    for x, y in zip(g_tr, g_ref):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x.float(), y.float(), rtol=5e-2, atol=5e-2)
