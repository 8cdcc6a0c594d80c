"""The padded projection op: the bias inside the matrix product against F.linear(F.pad(x))."""

import pytest
import torch

from yoloattn.nn import BiLevelRoutingAttention, use_backend
from yoloattn.nn.backends import BackendUnavailableError
from yoloattn.nn.functional.padded_linear import PADDED_LINEAR, padded_linear


def _params(c_in, c_out, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(c_out, c_in, generator=g, dtype=dtype).requires_grad_(),
            torch.randn(c_out, generator=g, dtype=dtype).requires_grad_())


def _run(x, weight, bias, pad_b, pad_r, backend):
    x = x.detach().requires_grad_()
    out = padded_linear(x, weight, bias, pad_b, pad_r, backend=backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return out, torch.autograd.grad(out, (x, weight, bias), grad_out)


def _views(n, h, w, c):
    """The same values as contiguous NHWC, as the NHWC view of NCHW (BRA's input) and of channels-last NCHW."""
    nchw = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(2))
    return (nchw.permute(0, 2, 3, 1).contiguous(), nchw.permute(0, 2, 3, 1),
            nchw.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1))


@pytest.mark.parametrize("n", [1, 2])
def test_gemm_bias_equals_reference_every_small_size_and_pad(n):
    weight, bias = _params(5, 7)
    for h in range(1, 7):
        for w in range(1, 7):
            for pad_b, pad_r in ((0, 0), (1, 0), (0, 2), (3, 1)):
                for x in _views(n, h, w, 5):
                    out_ref, grads_ref = _run(x, weight, bias, pad_b, pad_r, "reference")
                    out, grads = _run(x, weight, bias, pad_b, pad_r, "gemm_bias")
                    assert out.shape == (n, h + pad_b, w + pad_r, 7)
                    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
                    for a, b in zip(grads, grads_ref):
                        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_bra_sized_projection():
    weight, bias = _params(64, 192)
    x = _views(2, 20, 17, 64)[1]
    out_ref, grads_ref = _run(x, weight, bias, 1, 4, "reference")
    out, grads = _run(x, weight, bias, 1, 4, "gemm_bias")
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_gradcheck_float64():
    weight, bias = _params(3, 4, torch.float64)
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64).permute(0, 2, 3, 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: padded_linear(*a, 2, 1, backend="gemm_bias"), (x, weight, bias))


def test_declines_fall_back_to_the_reference():
    weight, bias = _params(4, 6)
    x = torch.randn(1, 3, 3, 4)
    assert PADDED_LINEAR.select(None, x, weight, bias, 1, 1).name == "gemm_bias"
    assert PADDED_LINEAR.select(None, x, weight, None, 1, 1).name == "reference"
    assert PADDED_LINEAR.select(None, x.half(), weight.half(), bias.half(), 1, 1).name == "reference"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert PADDED_LINEAR.select(None, x, weight, bias, 1, 1).name == "reference"
    with pytest.raises(BackendUnavailableError, match="no bias"):
        padded_linear(x, weight, None, 1, 1, backend="gemm_bias")
    torch.testing.assert_close(padded_linear(x, weight, None, 1, 1),
                               torch.nn.functional.linear(torch.nn.functional.pad(x, (0, 0, 0, 1, 0, 1)), weight))


def test_bad_arguments_are_value_errors():
    weight, bias = _params(4, 6)
    with pytest.raises(ValueError, match="Cin"):
        padded_linear(torch.randn(1, 3, 3, 5), weight, bias, 0, 0)
    with pytest.raises(ValueError, match="non-negative"):
        padded_linear(torch.randn(1, 3, 3, 4), weight, bias, -1, 0)
    with pytest.raises(ValueError, match="backend"):
        padded_linear(torch.randn(1, 3, 3, 4), weight, bias, 0, 0, backend="nope")


def test_bra_calls_a_hooked_projection_as_the_module():
    layer = BiLevelRoutingAttention(16, n_win=2, num_heads=2, topk=2)
    x = torch.randn(1, 16, 5, 7)
    seen = []
    handle = layer.qkv.qkv.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    try:
        hooked = layer(x)
    finally:
        handle.remove()
    assert seen == [(1, 6, 8, 48)]
    with use_backend(padded_linear="reference"):
        plain = layer(x)
    torch.testing.assert_close(layer(x), plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hooked, plain, rtol=0, atol=0)


def test_bra_calls_its_projection_as_the_module_under_a_global_hook():
    layer = BiLevelRoutingAttention(16, n_win=2, num_heads=2, topk=2)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(m))
    try:
        layer(torch.randn(1, 16, 4, 4))
    finally:
        handle.remove()
    assert any(m is layer.qkv.qkv for m in seen)
