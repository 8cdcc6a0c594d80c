"""The LayerNorm + MLP op: the lean backward against the plain composition under autograd."""

import pytest
import torch

from yoloattn.nn.functional import layer_norm_mlp


def _params(c, hidden, c_out, dtype=torch.float32, affine=True, biases=True):
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    return (rand(c) if affine else None, rand(c) if affine else None, rand(hidden, c) * 0.3,
            rand(hidden) if biases else None, rand(c_out, hidden) * 0.3, rand(c_out) if biases else None)


def _leaf(t):
    return None if t is None else t.detach().requires_grad_()


def _run(x, params, backend, recompute, approximate="none"):
    params = [_leaf(p) for p in params]
    x = _leaf(x)
    nw, nb, w1, b1, w2, b2 = params
    out = layer_norm_mlp(x, nw, nb, 1e-6, w1, b1, w2, b2, approximate=approximate, recompute=recompute,
                         backend=backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    inputs = [t for t in (x, *params) if t is not None]
    return out, torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("affine, biases", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("shape", [(2, 5, 7, 16), (3, 16), (1, 1, 1, 16)])
def test_lean_equals_reference(shape, affine, biases, approximate, recompute):
    x = torch.randn(shape)
    params = _params(16, 48, 24, affine=affine, biases=biases)
    out_ref, grads_ref = _run(x, params, "reference", False, approximate)
    out, grads = _run(x, params, "lean", recompute, approximate)
    assert torch.equal(out, out_ref)  # the same ATen calls
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_non_contiguous_and_channels_last_views():
    base = torch.randn(2, 16, 6, 5)
    params = _params(16, 48, 16)
    for x in (base.permute(0, 2, 3, 1), base.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1),
              torch.randn(2, 6, 10, 16)[:, :, ::2]):
        out_ref, grads_ref = _run(x, params, "reference", False)
        for recompute in (False, True):
            out, grads = _run(x, params, "lean", recompute)
            torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
            for a, b in zip(grads, grads_ref):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("recompute", [False, True])
def test_gradcheck_float64(recompute):
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    nw, nb, w1, b1, w2, b2 = (p.detach().requires_grad_() for p in _params(4, 6, 5, dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda *t: layer_norm_mlp(t[0], t[1], t[2], 1e-6, *t[3:], recompute=recompute, backend="lean"),
        (x, nw, nb, w1, b1, w2, b2))


def test_auto_declines_where_plain_ops_belong():
    from yoloattn.nn.functional.mlp import LAYER_NORM_MLP

    params = [p.detach() for p in _params(16, 48, 16)]
    x = torch.randn(2, 16)
    args = (x, params[0], params[1], 1e-6, *params[2:], "none", False)
    assert LAYER_NORM_MLP.select(None, *args).name == "lean"
    with torch.no_grad():
        assert LAYER_NORM_MLP.select(None, *args).name == "reference"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert LAYER_NORM_MLP.select(None, *args).name == "reference"
    half = (x.bfloat16(), *args[1:])
    assert LAYER_NORM_MLP.select(None, *half).name == "reference"


def test_lean_keeps_less_for_the_backward():
    """Saved-tensor bytes: plain autograd keeps 8 widths per token at ratio 3, lean 4, lean with recompute 1."""
    params = [p.detach().requires_grad_() for p in _params(32, 96, 32)]
    x = torch.randn(4, 64, 32, requires_grad=True)

    def saved_bytes(backend, recompute):
        sizes = {}

        def pack(t):
            sizes[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer_norm_mlp(x, params[0], params[1], 1e-6, *params[2:], recompute=recompute, backend=backend)
        parameters = sum(p.numel() * 4 for p in params)
        return sum(sizes.values()) - parameters

    token_width = x.numel() * 4
    assert saved_bytes("reference", False) >= 8 * token_width
    assert saved_bytes("lean", False) <= 4.1 * token_width
    assert saved_bytes("lean", True) <= 1.1 * token_width


def test_bad_approximate_raises():
    params = [p.detach() for p in _params(4, 8, 4)]
    with pytest.raises(ValueError, match="approximate"):
        layer_norm_mlp(torch.randn(2, 4), params[0], params[1], 1e-6, *params[2:], approximate="fast")
