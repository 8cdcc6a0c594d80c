"""Bi-Level Routing Attention: fast path vs reference vs the official math, errors, export."""

import io
import logging

import numpy as np
import pytest
import torch

from official_bra_reference import official_bra_forward
from yoloattn import BiLevelRoutingAttention, use_backend
from yoloattn.nn import backends as backends_module
from yoloattn.nn.functional import (routed_attention, routed_attention_dense, routed_attention_reference,
                                   routed_attention_sdpa)
from yoloattn.nn.functional import ROUTED_ATTENTION
from yoloattn.nn.functional import routed_attention_cpu as cpu

FAST = (["cpu"] if cpu.build_info()["available"] else []) + ["dense", "sdpa"]

# (name, constructor kwargs): every option of the layer, at small widths
CONFIGS = [
    ("default", dict(dim=32, num_heads=4)),
    ("heads8", dict(dim=64)),
    ("ada_avgpool", dict(dim=32, num_heads=4, kv_downsample_mode="ada_avgpool", kv_per_win=2)),
    ("ada_maxpool", dict(dim=32, num_heads=4, kv_downsample_mode="ada_maxpool", kv_per_win=2)),
    ("avgpool", dict(dim=32, num_heads=4, n_win=2, kv_downsample_mode="avgpool", kv_downsample_ratio=2)),
    ("maxpool", dict(dim=32, num_heads=4, n_win=2, kv_downsample_mode="maxpool", kv_downsample_ratio=2)),
    ("qk_dim_small", dict(dim=32, num_heads=4, qk_dim=16)),
    ("qk_dim_large", dict(dim=16, num_heads=2, qk_dim=32)),
    ("qkv", dict(dim=32, num_heads=4, param_attention="qkv")),
    ("soft_routing", dict(dim=32, num_heads=4, soft_routing=True)),
    ("param_diff_soft", dict(dim=32, num_heads=4, param_routing=True, diff_routing=True, soft_routing=True)),
    ("no_lepe", dict(dim=32, num_heads=4, side_dwconv=0)),
    ("lepe5", dict(dim=32, num_heads=4, side_dwconv=5)),
    ("topk1", dict(dim=32, num_heads=4, n_win=3, topk=1)),
    ("topk_all", dict(dim=32, num_heads=4, n_win=3, topk=9)),
    ("qk_scale", dict(dim=32, num_heads=4, qk_scale=0.3)),
]
# divisible, not divisible, smaller than n_win (5x5 < 7), non-square; batch 2 throughout
SHAPES = [(2, 14, 14), (2, 13, 9), (2, 5, 5), (2, 20, 11)]


def _input(dim, shape, dtype=torch.float32):
    n, h, w = shape
    return torch.randn(n, dim, h, w, dtype=dtype, requires_grad=True)


def _run(layer, x, backend):
    with use_backend(backend):
        out = layer(x)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                [x, *layer.parameters()], allow_unused=True)
    return out.detach(), grads


def _assert_same(a, b, atol, rtol=1e-4):
    out_a, grads_a = a
    out_b, grads_b = b
    torch.testing.assert_close(out_a, out_b, atol=atol, rtol=rtol)
    for ga, gb in zip(grads_a, grads_b):
        assert (ga is None) == (gb is None)
        if ga is not None:  # parameter gradients are sums over every token: compare relative to their scale
            torch.testing.assert_close(ga, gb, atol=atol * max(1.0, gb.abs().max().item()), rtol=rtol)


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_fast_matches_reference_and_official(name, kwargs, shape, impl):
    """The cpu, dense and sdpa backends against the reference and BiFormer's math, every option of the layer
    (soft routing has no CPU kernel and no dense form: 'cpu' and 'dense' cannot run it)."""
    layer = BiLevelRoutingAttention(**kwargs)
    if kwargs.get("kv_downsample_mode") in ("avgpool", "maxpool") and min(shape[1:]) < 4:
        pytest.skip("window smaller than the pooling kernel")  # covered by test_pool_larger_than_window
    if impl in ("cpu", "dense") and kwargs.get("soft_routing"):
        pytest.skip(f"the {impl} backend has no soft routing")  # test_named_backend_that_cannot_run_raises
    x = _input(kwargs["dim"], shape)
    fast = _run(layer, x, impl)
    ref = _run(layer, x, "reference")
    _assert_same(fast, ref, atol=1e-5)
    assert fast[0].shape == x.shape

    official_out = official_bra_forward(layer, x)
    official_grads = torch.autograd.grad((official_out * torch.linspace(-1, 1, official_out.numel()).view_as(official_out)).sum(),
                                     [x, *layer.parameters()], allow_unused=True)
    _assert_same(fast, (official_out.detach(), official_grads), atol=1e-5)


SIZES = range(1, 17)
SOME_SIZES = (1, 2, 3, 5, 8, 13, 16)


def _sweep_failures(layer_kwargs, backends, n_wins=(7, 4), memory_format=None, channels=16, sizes=SIZES):
    """(n_win, H, W, backend) of every H and W in ``sizes`` whose output, input gradient or parameter gradients
    differ from the reference's, batch 2."""
    failures = []
    for n_win in n_wins:
        layer = BiLevelRoutingAttention(channels, n_win=n_win, num_heads=2, topk=min(4, n_win * n_win), **layer_kwargs)
        for height in sizes:
            for width in sizes:
                x = torch.randn(2, channels, height, width)
                if memory_format is not None:
                    x = x.contiguous(memory_format=memory_format)
                x.requires_grad_()
                ref = _run(layer, x, "reference")
                for backend in backends:
                    try:
                        _assert_same(_run(layer, x, backend), ref, atol=1e-5)
                    except AssertionError:
                        failures.append((n_win, height, width, backend))
    return failures


def test_every_size_1_to_16():
    """Every H and W in 1..16 for n_win 7 and 4 (one-token-high or -wide windows, partial and empty padded
    windows), batch 2: outputs, input gradients and every parameter gradient of every backend."""
    assert _sweep_failures({}, FAST) == []


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
def test_every_size_channels_last_and_strided_inputs(layout):
    if layout == "channels_last":
        assert _sweep_failures({}, FAST, memory_format=torch.channels_last, sizes=SOME_SIZES) == []
    else:  # an NCHW view of a wider tensor: every stride differs from a contiguous input's
        layer = BiLevelRoutingAttention(16, n_win=4, num_heads=2)
        for height, width in [(1, 7), (5, 3), (9, 16), (16, 1)]:
            x = torch.randn(2, 40, height + 3, width + 2)[:, 3:19, 1:height + 1, 2:].requires_grad_()
            ref = _run(layer, x, "reference")
            for backend in FAST:
                _assert_same(_run(layer, x, backend), ref, atol=1e-5)


@pytest.mark.parametrize("options", [dict(qk_dim=8), dict(qk_dim=32), dict(kv_downsample_mode="ada_avgpool", kv_per_win=2),
                                     dict(kv_downsample_mode="ada_maxpool", kv_per_win=1), dict(side_dwconv=0)],
                         ids=["qk8", "qk32", "ada_avgpool", "ada_maxpool", "no_lepe"])
def test_every_size_options(options):
    assert _sweep_failures(options, FAST, sizes=SOME_SIZES) == []


def test_auto_pad_off_divisible():
    layer = BiLevelRoutingAttention(32, num_heads=4, auto_pad=False)
    x = _input(32, (2, 14, 21))
    _assert_same(_run(layer, x, "auto"), _run(layer, x, "reference"), atol=1e-5)
    torch.testing.assert_close(layer(x), official_bra_forward(layer, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_ret_attn_mask(backend):
    layer = BiLevelRoutingAttention(32, num_heads=4)
    x = torch.randn(2, 32, 13, 9)
    with use_backend(backend):
        out, r_weight, r_idx, attn = layer(x, ret_attn_mask=True)
    s_out, s_weight, s_idx, s_attn = official_bra_forward(layer, x, ret_attn_mask=True)
    torch.testing.assert_close(out, s_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(r_weight, s_weight)
    assert torch.equal(r_idx, s_idx)
    torch.testing.assert_close(attn, s_attn, atol=1e-5, rtol=1e-4)
    assert out.shape == x.shape and r_idx.shape == (2, 49, 4) and attn.shape == (2 * 49, 4, 4, 4 * 4)
    torch.testing.assert_close(out, layer(x), atol=1e-5, rtol=1e-4)


def test_functional_op_alone():
    n, n_win, h, w, hk, wk, topk = 2, 2, 1, 3, 2, 1, 3
    p = n_win * n_win
    q = torch.randn(n, n_win, n_win, h, w, 4, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(n, n_win, n_win, hk, wk, 4 + 6, dtype=torch.float64, requires_grad=True)
    r_idx = torch.stack([torch.randperm(p)[:topk] for _ in range(n * p)]).view(n, p, topk)
    r_weight = torch.rand(n, p, topk, dtype=torch.float64, requires_grad=True)
    kw = dict(num_heads=2, scale=0.25)
    sdpa = routed_attention_sdpa(q, kv, r_idx, r_weight, **kw)
    ref, attn = routed_attention_reference(q, kv, r_idx, r_weight, **kw)
    torch.testing.assert_close(sdpa, ref)
    assert ref.shape == (n, n_win * h, n_win * w, 6)  # the NHWC image of the queries, whatever the backend
    assert attn.shape == (n * p, 2, h * w, topk * hk * wk)
    torch.testing.assert_close(attn.sum(-1), torch.ones(n * p, 2, h * w, dtype=torch.float64))
    out2, attn2 = routed_attention(q, kv, r_idx, r_weight, return_attn=True, **kw)
    torch.testing.assert_close(out2, ref)
    cropped = routed_attention(q, kv, r_idx, r_weight, valid_hw=(1, 5), **kw)
    torch.testing.assert_close(cropped, ref[:, :1, :5])
    for backend in ("sdpa", "reference"):
        assert torch.autograd.gradcheck(
            lambda q, kv, w: routed_attention(q, kv, r_idx, w, backend=backend, **kw), (q, kv, r_weight))
    with pytest.raises(ValueError, match="only the 'reference' backend builds"):
        routed_attention(q, kv, r_idx, return_attn=True, backend="sdpa", **kw)
    # hard routing: the dense backend as well, float64 gradcheck included
    hard = routed_attention_reference(q, kv, r_idx, **kw)[0]
    torch.testing.assert_close(routed_attention(q, kv, r_idx, backend="dense", **kw), hard)
    assert torch.autograd.gradcheck(lambda q, kv: routed_attention(q, kv, r_idx, backend="dense", **kw), (q, kv))
    with pytest.raises(ValueError, match="the dense backend takes hard routing only"):
        routed_attention_dense(q, kv, r_idx, r_weight, **kw)


@pytest.mark.parametrize("case", ["repeated", "pooled", "cropped", "one_window"])
def test_dense_backend_equals_the_reference(case):
    """The whole-map masked attention is the routed attention: repeated routes count twice (log 2 in the mask),
    pooled key windows, cropped queries, a single window; batch 2, outputs and both gradients."""
    n, n_win, h, w, topk = 2, 3, 2, 3, 4
    hk, wk = (1, 2) if case == "pooled" else (h, w)
    if case == "one_window":
        n_win, topk = 1, 1
    p = n_win * n_win
    q = torch.randn(n, n_win, n_win, h, w, 8, requires_grad=True)
    kv = torch.randn(n, n_win, n_win, hk, wk, 8 + 12, requires_grad=True)
    if case == "repeated":
        r_idx = torch.randint(0, p, (n, p, topk))
        r_idx[:, :, 1] = r_idx[:, :, 0]  # every window routes one key window twice
    else:
        r_idx = torch.stack([torch.randperm(p)[:topk] for _ in range(n * p)]).view(n, p, topk)
    kw = dict(num_heads=2, scale=0.4, valid_hw=(n_win * h - 1, n_win * w - 2) if case == "cropped" else None)
    dense = routed_attention(q, kv, r_idx, backend="dense", **kw)
    ref = routed_attention_reference(q, kv, r_idx, **kw)[0]
    torch.testing.assert_close(dense, ref, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(dense, (q, kv), g), torch.autograd.grad(ref, (q, kv), g)):
        torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=1e-4)


def test_auto_takes_dense_only_where_measured_fastest(monkeypatch):
    import importlib

    ra = importlib.import_module("yoloattn.nn.functional.routed_attention")
    monkeypatch.setattr(ra, "_AUTOTUNE", True)
    q, kv = torch.randn(1, 2, 2, 3, 3, 8), torch.randn(1, 2, 2, 3, 3, 16)
    r_idx = torch.stack([torch.randperm(4)[:2] for _ in range(4)]).view(1, 4, 2)
    kw = dict(num_heads=2, scale=0.3)
    monkeypatch.setattr(ra, "_tuned_winner", lambda key: "dense")
    assert ROUTED_ATTENTION.select(None, q, kv, r_idx, **kw).name == "dense"
    assert ROUTED_ATTENTION.select(None, q, kv, r_idx, torch.rand(1, 4, 2), **kw).name == "sdpa"  # soft routing
    assert ROUTED_ATTENTION.select(None, q.double(), kv.double(), r_idx, **kw).name == "sdpa"  # measured in fp32
    many = torch.stack([torch.randperm(4)[:1] for _ in range(4)]).view(1, 4, 1)  # P / topk = 4: still measured
    assert ROUTED_ATTENTION.select(None, q, kv, many, **kw).name == "dense"
    q9, kv9 = torch.randn(1, 3, 3, 2, 2, 8), torch.randn(1, 3, 3, 2, 2, 16)  # P / topk = 9: never measured
    assert ROUTED_ATTENTION.select(None, q9, kv9, torch.zeros(1, 9, 1, dtype=torch.int64), **kw).name != "dense"
    monkeypatch.setattr(ra, "_tuned_winner", lambda key: "sdpa")
    assert ROUTED_ATTENTION.select(None, q, kv, r_idx, **kw).name == "sdpa"


@pytest.mark.parametrize("valid_hw", [(0, 4), (3,), (2.0, 3), "80x80", (True, 2), (7, 4)])
def test_bad_valid_hw_raises(valid_hw):
    q = torch.randn(1, 2, 2, 3, 3, 8)
    kv = torch.randn(1, 2, 2, 3, 3, 16)
    r_idx = torch.zeros(1, 4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="valid_hw must be a pair of integers"):
        routed_attention(q, kv, r_idx, num_heads=2, scale=0.3, valid_hw=valid_hw)


def test_bad_op_inputs_raise():
    q, kv, r_idx = torch.randn(1, 2, 2, 3, 3, 8), torch.randn(1, 2, 2, 3, 3, 16), torch.zeros(1, 4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"expected q \(N, Py, Px, h, w, Cqk\)"):
        routed_attention(q.flatten(1, 2), kv, r_idx, num_heads=2, scale=0.3)
    with pytest.raises(ValueError, match="must both be divisible|divisible by num_heads=3"):
        routed_attention(q, kv, r_idx, num_heads=3, scale=0.3)
    with pytest.raises(TypeError, match="r_idx must be an integer tensor"):
        routed_attention(q, kv, r_idx.float(), num_heads=2, scale=0.3)
    with pytest.raises(ValueError, match="same N and windows"):
        routed_attention(q, kv, r_idx[:, :3], num_heads=2, scale=0.3)
    with pytest.raises(ValueError, match=r"backend for routed_attention must be None or one of \('auto', 'cpu', 'dense', "
                                         r"'sdpa', 'reference'\), got 'gpu'"):
        routed_attention(q, kv, r_idx, num_heads=2, scale=0.3, backend="gpu")


@pytest.mark.parametrize("backend", ["sdpa", "reference"])  # the CPU kernel is fp32 only, dense hard routing only
def test_gradcheck_float64_layer(backend):
    layer = BiLevelRoutingAttention(8, n_win=2, num_heads=2, topk=2, param_routing=True, diff_routing=True,
                                    soft_routing=True).double()
    x = torch.randn(1, 8, 5, 3, dtype=torch.float64, requires_grad=True)
    with use_backend(backend):
        assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_cpu_finite(backend, dtype):
    layer = BiLevelRoutingAttention(64)
    x = torch.randn(2, 64, 23, 30) * 30  # large activations stress the softmax
    with use_backend(backend), torch.autocast("cpu", dtype=dtype):
        out = layer(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_fast_matches_reference(dtype):
    layer = BiLevelRoutingAttention(64)
    x = torch.randn(2, 64, 23, 30, requires_grad=True)
    results = []
    for backend in ("auto", "reference"):
        with use_backend(backend), torch.autocast("cpu", dtype=dtype):
            out = layer(x)
        results.append((out.float(), torch.autograd.grad(out.float().square().sum(), x)[0]))
    (out_fast, grad_fast), (out_ref, grad_ref) = results
    torch.testing.assert_close(out_fast, out_ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(grad_fast, grad_ref, atol=2e-2 * grad_ref.abs().max().item(), rtol=5e-2)
    torch.testing.assert_close(out_fast, layer(x), atol=5e-2, rtol=5e-2)  # and close to fp32


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_half_module_finite(backend):
    layer = BiLevelRoutingAttention(32, num_heads=4).to(torch.bfloat16)
    x = torch.randn(1, 32, 15, 15, dtype=torch.bfloat16)
    with use_backend(backend):
        out = layer(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_autocast_routes_like_fp32():
    layer = BiLevelRoutingAttention(32, num_heads=4)
    x = torch.randn(1, 32, 21, 21)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, idx_bf16, _ = layer(x, ret_attn_mask=True)
    _, _, idx_fp32, _ = layer(x, ret_attn_mask=True)
    # bf16 projections perturb the window means slightly; nearly all routes must agree
    assert (idx_bf16.sort(-1).values == idx_fp32.sort(-1).values).float().mean() > 0.9


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_deterministic_algorithms(backend):
    layer = BiLevelRoutingAttention(32, num_heads=4, soft_routing=True)
    x = torch.randn(2, 32, 13, 9, requires_grad=True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with use_backend(backend):
            grads = [torch.autograd.grad(layer(x).square().sum(), x)[0] for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_jit_trace_other_sizes(backend):
    layer = BiLevelRoutingAttention(32, num_heads=4).eval()
    with use_backend(backend), torch.no_grad():
        traced = torch.jit.trace(layer, torch.randn(1, 32, 14, 14), check_trace=False)  # divisible example
        for shape in [(1, 32, 14, 14), (2, 32, 13, 9), (1, 32, 5, 5)]:
            x = torch.randn(shape)
            torch.testing.assert_close(traced(x), layer(x), atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_onnx_dynamic_matches_onnxruntime(backend, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    layer = BiLevelRoutingAttention(32, num_heads=4).eval()
    path = tmp_path / "bra.onnx"
    with use_backend(backend), torch.no_grad():
        torch.onnx.export(layer, (torch.randn(1, 32, 14, 14),), str(path), opset_version=17, dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 32, 14, 14), (2, 32, 13, 9), (1, 32, 5, 5), (1, 32, 40, 24)]:
        x = torch.randn(shape)
        with torch.no_grad():
            expected = layer(x).numpy()
        np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], expected, atol=1e-5, rtol=1e-4)


def test_expected_declines_are_debug_messages(caplog, monkeypatch):
    monkeypatch.setattr(backends_module, "_reported", set())  # each reason is logged once per process
    layer = BiLevelRoutingAttention(32, num_heads=4, soft_routing=True)
    with caplog.at_level(logging.INFO, logger="yoloattn"):
        layer(torch.randn(1, 32, 14, 14))
    assert caplog.text == ""  # soft routing has no kernel: expected, not worth the user's attention
    monkeypatch.setattr(backends_module, "_reported", set())
    with caplog.at_level(logging.DEBUG, logger="yoloattn"):
        layer(torch.randn(1, 32, 14, 14))
    assert "routed_attention does not use its 'cpu' backend: the kernel has no soft routing" in caplog.text


def test_state_dict_keys_match_the_official_layout():
    layer = BiLevelRoutingAttention(64)
    assert list(layer.state_dict()) == ["lepe.weight", "lepe.bias", "qkv.qkv.weight", "qkv.qkv.bias", "wo.weight",
                                        "wo.bias"]
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"lepe.weight": (64, 1, 3, 3), "lepe.bias": (64,), "qkv.qkv.weight": (192, 64),
                      "qkv.qkv.bias": (192,), "wo.weight": (64, 64), "wo.bias": (64,)}
    full = BiLevelRoutingAttention(64, qk_dim=32, param_routing=True, diff_routing=True, soft_routing=True,
                                   side_dwconv=0, param_attention="qkv")
    assert list(full.state_dict()) == ["router.emb.weight", "router.emb.bias", "qkv.qkv.weight", "qkv.qkv.bias"]
    assert full.state_dict()["qkv.qkv.weight"].shape == (32 + 32 + 64, 64)


def test_official_state_dict_loads_strict():
    # a state_dict laid out as the official module saves it (its keys in its registration order)
    official_layout = {
        "lepe.weight": torch.randn(32, 1, 5, 5), "lepe.bias": torch.randn(32),
        "router.emb.weight": torch.randn(16, 16), "router.emb.bias": torch.randn(16),
        "qkv.qkv.weight": torch.randn(64, 32), "qkv.qkv.bias": torch.randn(64),
        "wo.weight": torch.randn(32, 32), "wo.bias": torch.randn(32),
    }
    layer = BiLevelRoutingAttention(32, num_heads=4, qk_dim=16, side_dwconv=5, param_routing=True,
                                    diff_routing=True, soft_routing=True)
    layer.load_state_dict(official_layout, strict=True)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    assert torch.load(buf).keys() == official_layout.keys()


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=30, num_heads=8), r"dim=30 and qk_dim=30 must both be divisible by num_heads=8"),
    (dict(dim=32, num_heads=8, qk_dim=20), r"qk_dim=20 must both be divisible by num_heads=8"),
    (dict(dim=32, n_win=2, topk=5), r"topk must be an integer in \[1, n_win²=4\] for n_win=2, got 5"),
    (dict(dim=32, topk=0), r"topk must be an integer in \[1, n_win²=49\].*got 0"),
    (dict(dim=32, param_routing=True), r"param_routing=True needs diff_routing=True"),
    (dict(dim=32, param_routing=True, diff_routing=True), r"diff_routing=True needs soft_routing=True"),
    (dict(dim=32, diff_routing=True), r"diff_routing=True needs soft_routing=True"),
    (dict(dim=32, kv_downsample_mode="fracpool"), r"kv_downsample_mode must be one of .*'fracpool'.*never implemented"),
    (dict(dim=32, kv_downsample_mode="conv"), r"kv_downsample_mode must be one of .*got 'conv'"),
    (dict(dim=32, kv_downsample_mode="bogus"), r"kv_downsample_mode must be one of .*got 'bogus'"),
    (dict(dim=32, param_attention="none"), r"param_attention must be one of \('qkvo', 'qkv'\), got 'none'"),
    (dict(dim=32, side_dwconv=4), r"side_dwconv must be 0 \(off\) or an odd kernel size, got 4"),
    (dict(dim=0), r"dim must be a positive integer, got 0"),
    (dict(dim=32, n_win=0), r"n_win must be a positive integer, got 0"),
    (dict(dim=32, kv_downsample_mode="ada_avgpool", kv_per_win=0), r"kv_per_win must be a positive integer"),
    (dict(dim=32, backend="gpu"), r"backend for routed_attention must be None or one of \('auto', 'cpu', 'dense', 'sdpa', "
                                  r"'reference'\), got 'gpu'"),
    (dict(dim=32, qk_scale=-1.0), r"qk_scale must be a positive number or None"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BiLevelRoutingAttention(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=32.0), r"dim must be a positive integer, got 32.0 \(float\)"),
    (dict(dim=32, kv_downsample_mode="maxpool", kv_downsample_ratio=None), r"kv_downsample_ratio must be a positive integer"),
    (dict(dim=32, soft_routing="yes"), r"soft_routing must be True or False, got 'yes'"),
    (dict(dim=32, qk_scale="x"), r"qk_scale must be a number, got 'x'"),
])
def test_bad_config_types_raise(kwargs, match):
    with pytest.raises(TypeError, match=match):
        BiLevelRoutingAttention(**kwargs)


def test_bad_inputs_raise():
    layer = BiLevelRoutingAttention(32, num_heads=4, auto_pad=False)
    with pytest.raises(ValueError, match=r"auto_pad=False needs H and W divisible by n_win=7.*\(2, 13, 9, 32\)"):
        layer(torch.randn(2, 32, 13, 9))
    with pytest.raises(ValueError, match=r"expects a \(N, 32, H, W\) tensor, got shape \(2, 16, 14, 14\)"):
        layer(torch.randn(2, 16, 14, 14))
    with pytest.raises(ValueError, match=r"expects a \(N, 32, H, W\) tensor, got shape \(32, 14, 14\)"):
        layer(torch.randn(32, 14, 14))
    layer = BiLevelRoutingAttention(32, num_heads=4)
    with pytest.raises(ValueError, match=r"needs N, H and W >= 1, got an input \(N, C, H, W\) of shape \(1, 32, 0, 5\)"):
        layer(torch.randn(1, 32, 0, 5))
    with pytest.raises(TypeError, match=r"expects a floating-point input, got torch.int64"):
        layer(torch.ones(1, 32, 5, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"has torch.float32 weights but got a torch.float64 input"):
        layer(torch.randn(1, 32, 5, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"expects a tensor, got list"):
        layer([1.0])


def test_pool_larger_than_window():
    layer = BiLevelRoutingAttention(32, num_heads=4, kv_downsample_mode="maxpool", kv_downsample_ratio=4)
    with pytest.raises(ValueError, match=r"kv_downsample_ratio=4 is larger than the 2x2 windows"):
        layer(torch.randn(1, 32, 14, 14))


def test_backend_name_checked():
    with pytest.raises(ValueError, match=r"backend must be one of \[.*'cpu'.*'reference', 'sdpa'.*\], got 'cuda'"):
        with use_backend("cuda"):
            pass


def test_traceable_adaptive_avg_pool_equals_torch():
    import torch.nn.functional as F

    from yoloattn.nn.bra import adaptive_avg_pool2d_traceable

    for h in range(1, 13):
        for w in range(1, 13):
            x = torch.randn(2, 3, h, w)
            for out in range(1, 6):
                torch.testing.assert_close(adaptive_avg_pool2d_traceable(x, out), F.adaptive_avg_pool2d(x, out),
                                           atol=1e-6, rtol=1e-5, msg=f"{h}x{w} -> {out}")


@pytest.mark.parametrize("capability", ["AVX512", "AVX2"])
def test_output_layout_follows_the_measured_rule(monkeypatch, capability):
    """NCHW out as a channels-last view, except when training on a CPU whose PyTorch kernels are not AVX-512
    (a contiguous copy there, see bra._to_nchw); the values are the same either way."""
    import yoloattn.nn.bra as bra

    monkeypatch.setattr(bra, "_CPU_CAPABILITY", capability)
    layer = bra.BiLevelRoutingAttention(32, num_heads=4)
    x = torch.randn(2, 32, 13, 9)
    with torch.no_grad():
        inference = layer(x)
    training = layer(x.requires_grad_())
    assert not inference.is_contiguous() and inference.is_contiguous(memory_format=torch.channels_last)
    assert training.is_contiguous() == (capability != "AVX512")
    torch.testing.assert_close(training.detach(), inference)


def test_training_on_the_kernel_runs_one_op_of_the_projection(monkeypatch):
    """With autograd on and the CPU kernel chosen, BRA runs the projection op (its backward returns the whole
    projection's gradient with the LePE's added in); outputs and every gradient equal the tile op's path to the
    bit, padded and channels-last inputs, with and without LePE. Inference and soft routing keep the tile op."""
    import yoloattn.nn.bra as bra_module

    calls = []
    projection_op = bra_module.routed_attention_qkv_cpu
    monkeypatch.setattr(bra_module, "routed_attention_qkv_cpu", lambda *a, **k: calls.append(1) or projection_op(*a, **k))
    for side_dwconv, shape, channels_last in [(3, (2, 16, 13, 9), False), (5, (1, 16, 8, 8), True), (0, (2, 16, 5, 16), False)]:
        layer = BiLevelRoutingAttention(16, n_win=4, num_heads=2, side_dwconv=side_dwconv)
        x = torch.randn(shape)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        results = []
        for projection in (True, False):
            if not projection:
                monkeypatch.setattr(layer, "_projection_op_applies", lambda *a: False)
            calls.clear()
            results.append(_run(layer, x.clone().requires_grad_(), "cpu"))
            assert len(calls) == (1 if projection else 0)
        (out, grads), (expected_out, expected_grads) = results
        assert torch.equal(out, expected_out)
        assert all((g is None and e is None) or torch.equal(g, e) for g, e in zip(grads, expected_grads, strict=True))
    calls.clear()
    layer = BiLevelRoutingAttention(16, n_win=4, num_heads=2)
    with torch.no_grad(), use_backend(routed_attention="cpu"):
        layer(torch.randn(1, 16, 8, 8))
    soft = BiLevelRoutingAttention(16, n_win=4, num_heads=2, soft_routing=True)
    with use_backend(routed_attention="sdpa"):
        soft(torch.randn(1, 16, 8, 8, requires_grad=True)).sum().backward()
    assert calls == []
