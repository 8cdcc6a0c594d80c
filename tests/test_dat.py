"""Deformable attention: fast vs reference vs the official math in every mode, odd sizes, dtypes, ONNX, errors."""

import numpy as np
import pytest
import torch

from official_dat_reference import official_dat_forward
from yoloattn import use_backend
from yoloattn.nn.dat import DAttention, DAttentionBaseline

BASE = dict(q_size=(12, 16), kv_size=None, n_heads=4, n_head_channels=8, n_groups=2, attn_drop=0.0, proj_drop=0.0,
            stride=4, offset_range_factor=-1, use_pe=True, dwc_pe=False, no_off=False, fixed_pe=False, ksize=5,
            log_cpb=False)
MODES = {
    "table": {},
    "table_range2": dict(offset_range_factor=2),
    "dwc_pe": dict(dwc_pe=True),
    "fixed_pe": dict(fixed_pe=True),
    "log_cpb": dict(log_cpb=True),
    "no_pe": dict(use_pe=False),
    "no_off": dict(no_off=True, ksize=4),
    "groups1": dict(n_groups=1),
    "stride1": dict(stride=1, ksize=3),
}


def _layer(**kw):
    m = DAttentionBaseline(**{**BASE, **kw})
    if m.pe_mode in ("table", "fixed"):  # non-trivial position bias (DAT inits it near zero)
        with torch.no_grad():
            m.rpe_table.normal_(0, 0.5)
    return m


def _run(m, x, backend):
    with use_backend(backend):
        y, pos, ref = m(x)
    weights = torch.linspace(-1, 1, y.numel()).view_as(y)
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad((y * weights).sum() + pos.square().sum(), [x, *params], allow_unused=True)
    return (y.detach(), pos.detach(), ref), grads


def _close(a, b, atol=1e-5):
    (outs_a, grads_a), (outs_b, grads_b) = a, b
    for u, v in zip(outs_a, outs_b):
        torch.testing.assert_close(u, v, atol=atol, rtol=1e-4)
    for u, v in zip(grads_a, grads_b):
        assert (u is None) == (v is None)
        if u is not None:
            torch.testing.assert_close(u, v, atol=3 * atol * max(1.0, v.abs().max().item()), rtol=1e-4)


@pytest.mark.parametrize("mode", list(MODES))
def test_fast_matches_reference_and_seed_at_q_size(mode):
    m = _layer(**MODES[mode])
    x = torch.randn(2, 32, 12, 16, requires_grad=True)
    fast, ref = _run(m, x, "fused"), _run(m, x, "reference")
    _close(fast, ref)
    seed = official_dat_forward(m, x)
    for u, v in zip(fast[0], seed):
        torch.testing.assert_close(u, v.detach(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (7, 1), (3, 5), (20, 15)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", [m for m in MODES if m not in ("fixed_pe", "no_off")])
def test_other_sizes_finite_and_paths_agree(mode, shape):
    m = _layer(**MODES[mode])
    x = torch.randn(2, 32, *shape, requires_grad=True)
    fast, ref = _run(m, x, "fused"), _run(m, x, "reference")
    _close(fast, ref)
    assert all(torch.isfinite(t).all() for t in fast[0])
    assert all(torch.isfinite(g).all() for g in fast[1] if g is not None)
    if min(shape) > 1 and min((s + 3) // 4 for s in shape) > 1:  # where the official code itself is defined
        for u, v in zip(fast[0], official_dat_forward(m, x)):
            torch.testing.assert_close(u, v.detach(), atol=1e-5, rtol=1e-4)


def test_size_one_points_sit_at_centre():
    m = _layer(offset_range_factor=0)  # zero offsets: pos == reference
    _, pos, ref = m(torch.randn(1, 32, 1, 1))
    assert torch.equal(ref, torch.zeros_like(ref)) and torch.equal(pos, ref)


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_gradcheck_float64(backend):
    m = DAttentionBaseline(**{**BASE, "n_heads": 2, "n_head_channels": 2, "n_groups": 1, "q_size": (5, 4),
                              "offset_range_factor": 1}).double()
    x = torch.randn(1, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda t: m(t)[0], (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_module_and_autocast(backend, dtype):
    for kw in ({}, dict(offset_range_factor=2), dict(log_cpb=True), dict(dwc_pe=True)):
        m = _layer(**kw)
        x = torch.randn(2, 32, 12, 16)
        with use_backend(backend):
            y, pos, _ = m.to(dtype)(x.to(dtype))  # the whole module in half precision
            assert y.dtype == dtype and pos.dtype == dtype and torch.isfinite(y.float()).all()
            m.float()
            with torch.autocast("cpu", dtype=dtype):
                y, _, _ = m(x * 10)
            assert torch.isfinite(y.float()).all()


def test_fixed_pe_other_size_raises():
    m = _layer(fixed_pe=True)
    with pytest.raises(ValueError, match=r"fixed_pe tables are built for q_size=\(12, 16\); got an input of size \(8, 8\)"):
        m(torch.randn(1, 32, 8, 8))


@pytest.mark.parametrize("kw,match", [
    (dict(n_heads=3, n_groups=2), r"n_heads=3 must be divisible by n_groups=2"),
    (dict(q_size=(12,)), r"q_size must be a pair of positive integers"),
    (dict(stride=0), r"stride must be a positive integer, got 0"),
    (dict(n_head_channels=0), r"n_head_channels must be a positive integer"),
])
def test_bad_baseline_config(kw, match):
    with pytest.raises(ValueError, match=match):
        DAttentionBaseline(**{**BASE, **kw})


def test_state_dict_keys_match_seed_layout():
    keys = lambda **kw: list(DAttentionBaseline(**{**BASE, **kw}).state_dict())  # noqa: E731
    common = ["conv_offset.0.weight", "conv_offset.0.bias", "conv_offset.1.norm.weight", "conv_offset.1.norm.bias",
              "conv_offset.3.weight", "proj_q.weight", "proj_q.bias", "proj_k.weight", "proj_k.bias", "proj_v.weight",
              "proj_v.bias", "proj_out.weight", "proj_out.bias"]
    assert keys() == ["rpe_table"] + common  # a direct Parameter comes before submodules, as in the official code
    assert keys(dwc_pe=True) == common + ["rpe_table.weight", "rpe_table.bias"]
    assert keys(log_cpb=True) == common + ["rpe_table.0.weight", "rpe_table.0.bias", "rpe_table.2.weight"]
    assert keys(use_pe=False) == common and keys(no_off=True, ksize=4) == common
    sd = DAttentionBaseline(**BASE).state_dict()
    assert sd["rpe_table"].shape == (4, 23, 31)
    assert DAttentionBaseline(**{**BASE, "fixed_pe": True}).state_dict()["rpe_table"].shape == (4, 12 * 16, 3 * 4)


def test_yolo_layer_defaults_and_sizes():
    layer = DAttention(64)
    assert (layer.n_heads, layer.n_head_channels, layer.n_groups, layer.stride, layer.ksize) == (2, 32, 1, 8, 9)
    assert layer.offset_range_factor == -1 and layer.pe_mode == "table"
    assert (DAttention(256).n_heads, DAttention(256).n_groups) == (8, 2)
    for shape in [(1, 64, 80, 80), (2, 64, 40, 24), (1, 64, 1, 1), (1, 64, 3, 5)]:
        y = layer(torch.randn(shape))
        assert y.shape == shape and torch.isfinite(y).all()


@pytest.mark.parametrize("kw,match", [
    (dict(c1=48, n_heads=5), r"c1=48 channels must be divisible by n_heads=5"),
    (dict(c1=64, pe="fixed"), r"pe must be one of \('table', 'dwc', 'log_cpb', 'none'\), got 'fixed'"),
    (dict(c1=0), r"c1 must be a positive integer, got 0"),
])
def test_bad_yolo_layer_config(kw, match):
    with pytest.raises(ValueError, match=match):
        DAttention(**kw)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("pe", ["table", "log_cpb", "dwc"])
def test_onnx_dynamic_matches_onnxruntime(backend, pe, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    layer = DAttention(64, pe=pe, offset_range_factor=2 if pe == "dwc" else -1).eval()
    path = tmp_path / "dat.onnx"
    with use_backend(backend), torch.no_grad():
        torch.onnx.export(layer, (torch.randn(1, 64, 24, 32),), str(path), opset_version=17, dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 64, 24, 32), (2, 64, 40, 17), (1, 64, 9, 9)]:
        x = torch.randn(shape)
        with torch.no_grad():
            expected = layer(x).numpy()
        np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], expected, atol=2e-5, rtol=1e-4)


def test_yolo_layer_residual():
    layer = DAttention(64).eval()
    x = torch.randn(1, 64, 16, 16)
    y_attn = layer.forward_with_points(x)[0]
    torch.testing.assert_close(layer(x), x + y_attn)
    layer.residual = False
    torch.testing.assert_close(layer(x), y_attn)
