"""The oneDNN prepacked linear equals torch's F.linear (float32 to rounding, bfloat16 to
bf16 rounding) on random inputs, and bad inputs raise ValueError naming the problem."""

import pytest
import torch

from brorl.kernels.linear import (
    OneDNNLinear,
    TorchLinear,
    default_linear_backend,
    linear_ref,
    make_linear,
    onednn_available,
)

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="torch has no oneDNN")
needs_onednn_bf16 = pytest.mark.skipif(not onednn_available(torch.bfloat16),
                                       reason="oneDNN has no bfloat16 path on this CPU")


def _bound(x, w, eps):
    """Error bound of a length-K dot product computed in a precision with unit eps."""
    return eps * x.shape[-1] * (x.abs().amax() * w.abs().amax()).item() + 1e-12


@needs_onednn
@pytest.mark.parametrize("rows", [1, 5, 64, 300])
@pytest.mark.parametrize("out_features,in_features", [(3, 8), (17, 96), (256, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_float32_matches_reference(rows, out_features, in_features, bias):
    g = torch.Generator().manual_seed(rows * 1000 + out_features + in_features)
    x = torch.randn(rows, in_features, generator=g)
    w = torch.randn(out_features, in_features, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    lin = OneDNNLinear()
    got = lin(x, lin.pack(w), b)
    exact = linear_ref(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    assert (got.double() - exact).abs().max().item() <= _bound(x, w, 2 ** -23)
    # and the reference itself is as close: the two differ only in summation order
    ref = linear_ref(x, w, b)
    assert (got - ref).abs().max().item() <= 2 * _bound(x, w, 2 ** -23)


@needs_onednn_bf16
def test_onednn_bfloat16_matches_reference():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 32, generator=g)
    lin = OneDNNLinear()
    xb, wb = torch.randn(9, 32, generator=g).bfloat16(), w.bfloat16()
    got = lin(xb, lin.pack(wb))
    exact = linear_ref(xb.float(), wb.float())
    assert got.dtype == torch.bfloat16
    assert (got.float() - exact).abs().max().item() <= _bound(xb.float(), wb.float(), 2 ** -8)


@needs_onednn
def test_onednn_batched_and_strided_inputs():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 32, generator=g)
    lin = OneDNNLinear()
    x3 = torch.randn(2, 3, 32, generator=g)  # leading batch dims
    torch.testing.assert_close(lin(x3, lin.pack(w)), linear_ref(x3, w), rtol=1e-5, atol=1e-5)
    xs = torch.randn(6, 64, generator=g)[:, ::2]  # non-contiguous rows
    torch.testing.assert_close(lin(xs, lin.pack(w)), linear_ref(xs, w), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_a_packed_weight_is_a_copy_so_changes_need_a_repack():
    w, x = torch.randn(8, 4), torch.randn(3, 4)
    lin = OneDNNLinear()
    old = lin.pack(w)
    w.mul_(2)
    torch.testing.assert_close(lin(x, old), linear_ref(x, w / 2))  # stale copy
    torch.testing.assert_close(lin(x, lin.pack(w)), linear_ref(x, w))
    assert TorchLinear().pack(w) is w  # the torch backend multiplies the weight itself


@needs_onednn
def test_bad_inputs_raise_value_errors():
    lin = OneDNNLinear()
    with pytest.raises(ValueError, match="2-D"):
        lin.pack(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        lin.pack(torch.zeros(2, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="differs from the packed"):
        lin(torch.zeros(1, 3, dtype=torch.bfloat16), lin.pack(torch.zeros(2, 3)))
    with pytest.raises(ValueError, match="unknown linear_backend 'blas'"):
        make_linear("blas", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="needs a CPU device"):
        make_linear("onednn", torch.device("cpu"), torch.float16)


def test_auto_choice():
    cpu = torch.device("cpu")
    assert default_linear_backend(cpu, torch.float16) == "torch"
    assert default_linear_backend(torch.device("cuda"), torch.float32) == "torch"
    expected = "onednn" if onednn_available() else "torch"
    assert default_linear_backend(cpu, torch.float32) == expected
    assert make_linear("auto", cpu, torch.float32).name == expected
    bf16 = "onednn" if onednn_available(torch.bfloat16) else "torch"
    assert make_linear("auto", cpu, torch.bfloat16).name == bf16


def test_a_cpu_without_onednns_bfloat16_path_gets_torch_or_a_clear_error(monkeypatch):
    """An AVX2-only CPU (AMD EPYC here) has oneDNN float32 but no bfloat16 linear: 'auto'
    must not pick it (the engine crashed while packing its weights), 'onednn' says why."""
    import brorl.kernels.linear as linear

    monkeypatch.setattr(linear, "onednn_available", lambda dtype=torch.float32:
                        dtype == torch.float32)
    cpu = torch.device("cpu")
    assert make_linear("auto", cpu, torch.bfloat16).name == "torch"
    assert make_linear("auto", cpu, torch.float32).name == "onednn"
    with pytest.raises(ValueError, match="bfloat16 linear does not work.*use 'torch'"):
        make_linear("onednn", cpu, torch.bfloat16)
