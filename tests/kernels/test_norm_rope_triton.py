"""Triton RMSNorm (+ residual add) and RoPE against kernels/norm.py and kernels/rope.py."""

import pytest
import torch

from brorl.kernels.norm import add_rms_norm_ref, rms_norm_ref
from brorl.kernels.rope import apply_rope_ref, rope_cos_sin_table

pytest.importorskip("triton")
from brorl.kernels.norm_triton import add_rms_norm_triton, rms_norm_triton  # noqa: E402
from brorl.kernels.rope_triton import apply_rope_triton  # noqa: E402

# fp16 RoPE: the reference rounds x*cos, rotate*sin and their sum separately, the kernel
# once, so they may differ by about one fp16 ulp of the output (|out| < 8 here)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=8e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=6e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_matches_reference_on_a_non_power_of_two_hidden(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 40).to(dtype)  # leading dims flattened, hidden 40
    w = (1 + 0.2 * torch.randn(40)).to(dtype)
    got = rms_norm_triton(x, w, 1e-6)
    assert got.shape == x.shape and got.dtype == dtype
    torch.testing.assert_close(got, rms_norm_ref(x, w, 1e-6), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_rms_norm_returns_the_rounded_sum_and_its_norm(dtype):
    torch.manual_seed(1)
    x, r = torch.randn(7, 24).to(dtype), torch.randn(7, 24).to(dtype)
    w = (1 + 0.2 * torch.randn(24)).to(dtype)
    got, got_sum = add_rms_norm_triton(x, r, w, 1e-5)
    want, want_sum = add_rms_norm_ref(x, r, w, 1e-5)
    assert torch.equal(got_sum, want_sum)  # the sum is rounded exactly as torch rounds it
    torch.testing.assert_close(got, want, **TOL[dtype])


def rope_inputs(dtype, t=7, heads=5, d=16, device="cpu"):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    cos, sin = rope_cos_sin_table(inv_freq, 64)
    pos = torch.randint(0, 64, (t,))
    # q as a strided view of a fused projection, as the model produces it
    qkv = torch.randn(t, (heads + 2) * d, device=device).to(dtype)
    x = qkv[:, :heads * d].view(t, heads, d)
    return x, cos[pos].to(device, dtype), sin[pos].to(device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", [1, 5, 20])  # 20 heads: two blocks of heads
def test_rope_matches_reference_on_strided_views(dtype, heads):
    torch.manual_seed(2)
    x, cos, sin = rope_inputs(dtype, heads=heads)
    assert not x.is_contiguous()
    got = apply_rope_triton(x, cos, sin)
    torch.testing.assert_close(got, apply_rope_ref(x, cos, sin), **TOL[dtype])


def test_norm_and_rope_reject_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight has 7"):
        rms_norm_triton(x, torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="weight is"):
        rms_norm_triton(x, torch.ones(8, dtype=torch.float16), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm_triton(x, torch.randn(4, 9), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="int64"):
        rms_norm_triton(x.long(), torch.ones(8), 1e-6)
    q, cos, sin = rope_inputs(torch.float32)
    with pytest.raises(ValueError, match="cos must be"):
        apply_rope_triton(q, cos[:3], sin)
    with pytest.raises(ValueError, match="sin is"):
        apply_rope_triton(q, cos, sin.half())


@pytest.mark.gpu
def test_gpu_bf16_norm_and_rope_at_qwen2_shapes():
    torch.manual_seed(3)
    x = torch.randn(512, 1536, device="cuda").to(torch.bfloat16)
    r = torch.randn(512, 1536, device="cuda").to(torch.bfloat16)
    w = (1 + 0.2 * torch.randn(1536, device="cuda")).to(torch.bfloat16)
    got, got_sum = add_rms_norm_triton(x, r, w, 1e-6)
    want, want_sum = add_rms_norm_ref(x, r, w, 1e-6)
    assert torch.equal(got_sum, want_sum)
    torch.testing.assert_close(got, want, **TOL[torch.bfloat16])
    q, cos, sin = rope_inputs(torch.bfloat16, t=512, heads=12, d=128, device="cuda")
    torch.testing.assert_close(apply_rope_triton(q, cos, sin), apply_rope_ref(q, cos, sin),
                               **TOL[torch.bfloat16])
