"""Shared checks for the MSDA, ACmix, HAB and D-LKA tests: run a layer on a backend, compare outputs and
gradients, ONNX export with dynamic H/W against onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from yoloattn import use_backend


def loss_weights(y: torch.Tensor) -> torch.Tensor:
    """Fixed, non-uniform weights so every output element gets a different gradient."""
    return torch.linspace(-1.0, 1.0, y.numel(), dtype=y.dtype).reshape(y.shape)


def outputs_and_grads(fn, x: torch.Tensor, params):
    """fn(x) and the gradients of a weighted sum with respect to x and ``params``."""
    x = x.detach().requires_grad_(True)
    y = fn(x)
    grads = torch.autograd.grad((y * loss_weights(y)).sum(), [x, *params], allow_unused=True)
    return y.detach(), grads


def run(module, x, op: str | None = None, backend: str | None = None):
    """The module's output and gradients (x first, then every parameter) on one backend."""
    params = [p for p in module.parameters() if p.requires_grad]
    if op is None:
        return outputs_and_grads(module, x, params)
    with use_backend(**{op: backend}):
        return outputs_and_grads(module, x, params)


def assert_close(got, want, atol: float, rtol: float = 1e-5, names=None, skip=()):
    """Outputs within atol/rtol; each gradient within tolerances scaled by that gradient's magnitude."""
    (y, grads), (y_ref, grads_ref) = got, want
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    names = names or [f"grad[{i}]" for i in range(len(grads_ref))]
    for name, g, g_ref in zip(names, grads, grads_ref):
        if name in skip:
            continue
        assert (g is None) == (g_ref is None), name
        if g_ref is None:
            continue
        scale = max(1.0, g_ref.abs().max().item())
        torch.testing.assert_close(g, g_ref, atol=atol * scale, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


def param_names(module):
    return ["x"] + [n for n, p in module.named_parameters() if p.requires_grad]


def assert_key_layout(module, layout):
    """The state_dict has exactly the official keys, in order, with their shapes, and loads strictly."""
    sd = module.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == [(k, tuple(s)) for k, s in layout]
    generator = torch.Generator().manual_seed(1)
    official = {k: torch.randn(s, generator=generator) for k, s in layout}
    module.load_state_dict(official, strict=True)
    for k, v in module.state_dict().items():
        assert torch.equal(v, official[k]), k


def onnx_matches_onnxruntime(module, example_shape, other_shapes, tmp_path, atol=2e-5, backend_op=None,
                             backend=None, expected=None):
    """Export with dynamic N/H/W (opset 17) and compare onnxruntime at other sizes with ``expected(module, x)``
    (default: the module itself on the same backend)."""
    ort = pytest.importorskip("onnxruntime")
    module = module.eval()
    path = tmp_path / "layer.onnx"

    def context():
        return use_backend(**{backend_op: backend}) if backend_op else use_backend()

    with context(), torch.no_grad():
        torch.onnx.export(module, (torch.randn(example_shape),), str(path), opset_version=17, dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(2)
    for shape in other_shapes:
        x = torch.randn(shape, generator=generator)
        with context(), torch.no_grad():
            want = (expected(module, x) if expected else module(x)).numpy()
        got = session.run(None, {"x": x.numpy()})[0]
        np.testing.assert_allclose(got, want, atol=atol, rtol=1e-4, err_msg=f"shape {shape}")


def deterministic_twice(fn):
    """fn() twice under torch.use_deterministic_algorithms(True); the results are equal."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = fn(), fn()
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(first, second):
        if a is not None:
            assert torch.equal(a, b)


@pytest.fixture
def single_thread():
    """One intra-op thread for these tiny tensors: on a loaded 2-core machine every parallel region waits for
    the other thread (about 15 ms an op), which would dominate the run time without changing any result."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
