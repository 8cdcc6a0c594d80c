"""The depthwise convolution's compiled weight-gradient kernel (every ISA build this machine runs) and its
flipped-kernel input gradient against PyTorch's convolution; its use in BRA's and BiFormer's LePE."""

import platform

import pytest
import torch
import torch.nn as nn

from yoloattn.nn.backends import YoloattnWarning
from yoloattn.nn.functional import depthwise_conv as dw
from yoloattn.nn.functional import routed_attention_cpu as cpu
from yoloattn.nn.functional.depthwise_conv import DEPTHWISE_CONV, depthwise_conv2d, depthwise_conv_module

X86 = platform.machine() in ("x86_64", "AMD64")
BUILDS = ["native", *(["x86-64-v3", "x86-64"] if X86 else [])]


def _build_or_skip(march):
    with cpu.use_build(march):
        reason = dw._load(march)
    if isinstance(reason, str):
        pytest.skip(reason)
    return cpu.use_build(march)


def _grads(x, weight, bias, backend, grad_seed=1):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    bias = None if bias is None else bias.detach().requires_grad_()
    out = depthwise_conv2d(x, weight, bias, backend=backend)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    inputs = [t for t in (x, weight, bias) if t is not None]
    return out, torch.autograd.grad(out, inputs, grad)


def _case(n, c, h, w, kernel, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, h, w, generator=g, dtype=dtype), torch.randn(c, 1, *kernel, generator=g, dtype=dtype),
            torch.randn(c, generator=g, dtype=dtype))


def _check(x, weight, bias):
    out, grads = _grads(x, weight, bias, "cpu")
    # float64 reference: the fp32 kernel's sums differ from it by rounding only
    ref_out, ref_grads = _grads(x.double(), weight.double(), None if bias is None else bias.double(), "reference")
    torch.testing.assert_close(out, ref_out.float(), rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=2e-6 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("march", BUILDS)
@pytest.mark.parametrize("kernel", [(5, 5), (3, 3), (1, 7), (7, 1), (3, 5), (1, 1)])
def test_every_size_1_to_16(march, kernel):
    with _build_or_skip(march):
        for h in range(1, 17):
            for w in range(1, 17):
                # channel counts with a full 4-vector block, single vectors and a scalar tail on every ISA
                c = (3, 17, 67)[(h * 16 + w) % 3]
                x, weight, bias = _case(2, c, h, w, kernel, seed=h * 17 + w)
                _check(x.contiguous(memory_format=torch.channels_last), weight, bias)


@pytest.mark.parametrize("march", BUILDS)
def test_layouts_bias_and_batch(march):
    with _build_or_skip(march):
        x, weight, bias = _case(3, 64, 13, 11, (5, 5))
        _check(x, weight, bias)  # NCHW-contiguous: copied to channels-last for the kernel
        _check(x.contiguous(memory_format=torch.channels_last), weight, None)
        wide = torch.randn(3, 11, 13, 128)[..., ::2].permute(0, 3, 1, 2)  # channel stride 2: copied too
        _check(wide, weight, bias)


def test_independent_of_the_thread_count():
    x, weight, bias = _case(4, 64, 30, 29, (5, 5))
    x = x.contiguous(memory_format=torch.channels_last)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_grads(x, weight, bias, "cpu")[1])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_kernel_refuses_wrong_layouts():
    x = torch.randn(1, 8, 5, 5)  # NCHW: channel stride 25
    with pytest.raises(ValueError, match="channel stride 1"):
        dw._weight_grad(x, x, (3, 3), True)
    xl = x.contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="float32"):
        dw._weight_grad(xl.double(), xl.double(), (3, 3), True)
    with pytest.raises(ValueError, match="shape"):
        dw._weight_grad(xl, xl[:, :, :4], (3, 3), True)


def test_auto_choice():
    x, weight, bias = _case(1, 8, 6, 6, (5, 5))
    assert DEPTHWISE_CONV.select(None, x, weight, bias).name == "cpu"
    assert DEPTHWISE_CONV.select(None, x, weight[..., 1:4, 1:4], bias).name == "reference"  # 3x3: PyTorch's
    with torch.no_grad():
        assert DEPTHWISE_CONV.select(None, x, weight, bias).name == "reference"
    assert DEPTHWISE_CONV.select(None, x.double(), weight.double(), bias.double()).name == "reference"


def test_auto_passes_over_narrow_kernels_without_loading_the_library(monkeypatch):
    loads = []
    monkeypatch.setattr(dw, "_load", lambda march: loads.append(march) or "not built (test)")
    x, weight, bias = _case(1, 8, 6, 6, (3, 3))
    assert DEPTHWISE_CONV.select(None, x, weight, bias).name == "reference"
    assert loads == []  # a 3x3 LePE in training costs no build
    x, weight, bias = _case(1, 8, 6, 6, (5, 5))
    with pytest.warns(YoloattnWarning, match="not built"):  # the build failed: declined, said once
        assert DEPTHWISE_CONV.select(None, x, weight, bias).name == "reference"
    assert len(loads) == 1


def test_module_path_keeps_hooks_and_other_convolutions():
    conv = nn.Conv2d(8, 8, 5, padding=2, groups=8)
    x = torch.randn(2, 8, 7, 9, requires_grad=True)
    calls = []
    handle = conv.register_forward_hook(lambda *_: calls.append(1))
    depthwise_conv_module(conv, x)
    assert calls == [1]  # hooks (FLOPs counters) see the call
    handle.remove()
    out = depthwise_conv_module(conv, x)
    assert out.grad_fn.name().startswith("_DepthwiseConv")
    torch.testing.assert_close(out, conv(x))
    strided = nn.Conv2d(8, 8, 5, padding=2, groups=8, stride=2)
    assert depthwise_conv_module(strided, x).shape == (2, 8, 4, 5)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="odd kernel"):
        depthwise_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 1, 4, 4))
    with pytest.raises(ValueError, match=r"weight \(C, 1, kh, kw\)"):
        depthwise_conv2d(torch.randn(1, 4, 5, 5), torch.randn(8, 1, 3, 3))


def test_bra_training_uses_it_and_matches_the_reference():
    from yoloattn import BiLevelRoutingAttention, use_backend

    bra = BiLevelRoutingAttention(32, n_win=3, num_heads=4, topk=2, auto_pad=True)
    x = torch.randn(2, 32, 11, 10, requires_grad=True)
    results = {}
    for backend in ("auto", "reference"):
        with use_backend(backend):
            out = bra(x)
        results[backend] = torch.autograd.grad(out.square().sum(), [x, bra.lepe.weight, bra.lepe.bias])
    for a, b in zip(results["auto"], results["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()))


def test_msca_and_cpca_strips_take_the_kernel_and_match_their_pytorch_path(monkeypatch):
    """MSCA's and CPCA's depthwise convs (5x5, 1xk, kx1) go through the op in float32 training; the result
    equals their pure-PyTorch weight-gradient path (and, in their own tests, the official math)."""
    import yoloattn.nn.msca as msca
    from yoloattn.nn import CPCA, MSCA

    if not dw.kernel_info()["available"]:
        pytest.skip(dw.kernel_info()["reason"])
    original = msca._compiled_kernel_runs
    for layer in (MSCA(16), CPCA(16, 16)):
        x = torch.randn(2, 16, 13, 11, requires_grad=True)
        params = [p for p in layer.parameters() if p.requires_grad]
        calls = []
        monkeypatch.setattr(msca, "_compiled_kernel_runs", lambda *a: calls.append(1) or original(*a))
        compiled = torch.autograd.grad(layer(x).square().sum(), [x, *params])
        assert calls and all(original(x, m) for m in layer.modules()
                             if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1)
        monkeypatch.setattr(msca, "_compiled_kernel_runs", lambda *a: False)
        fallback = torch.autograd.grad(layer(x).square().sum(), [x, *params])
        for a, b in zip(compiled, fallback):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()))


def test_double_backward_raises_instead_of_a_wrong_answer():
    x, weight, bias = _case(1, 8, 6, 6, (5, 5))
    x, weight = x.requires_grad_(), weight.requires_grad_()
    out = depthwise_conv2d(x, weight, bias, backend="cpu")
    _, grad_weight = torch.autograd.grad(out.square().sum(), [x, weight], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_weight.sum().backward()
