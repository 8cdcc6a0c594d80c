"""D-LKA (2D deformable_LKA_Attention): key layout, every backend against the official composition over every
H, W in 1..16, the deformable conv against torchvision in general settings, backend choice, dtypes, ONNX, errors."""

import pytest
import torch
import torch.nn.functional as F

from attention_checks import (assert_close, assert_key_layout, deterministic_twice, onnx_matches_onnxruntime,
                              outputs_and_grads, param_names, run)
from attention_checks import single_thread  # noqa: F401  (fixture)
from yoloattn import use_backend
from yoloattn.nn.backends import BackendUnavailableError
from yoloattn.nn.dlka import (DEFORM_CONV2D, DLKA, DeformableConv2d, DeformConv, deform_conv2d, deformable_LKA,
                              deformable_LKA_Attention)

pytestmark = pytest.mark.usefixtures("single_thread")
BACKENDS = ["torchvision", "grid_sample", "reference"]
tv_ops = pytest.importorskip("torchvision.ops")


def official_dlka(m, x):
    """deformable_LKA_Attention's forward in the official order, each deformable conv through
    torchvision.ops.deform_conv2d with offsets from its offset_net."""
    def deform(conv, t):
        o = conv.offset_net
        offset = F.conv2d(t, o.weight, o.bias, o.stride, o.padding, o.dilation)
        d = conv.deform_conv
        return tv_ops.deform_conv2d(t, offset, d.weight, None, d.stride, d.padding, d.dilation)

    sgu = m.spatial_gating_unit
    z = F.gelu(F.conv2d(x, m.proj_1.weight, m.proj_1.bias))
    attn = F.conv2d(deform(sgu.conv_spatial, deform(sgu.conv0, z)), sgu.conv1.weight, sgu.conv1.bias)
    return F.conv2d(z * attn, m.proj_2.weight, m.proj_2.bias) + x


def _layer(dim=2, dtype=torch.float64):
    m = DLKA(dim).to(dtype)
    with torch.no_grad():  # offsets of a few pixels, so sampling points leave the grid and the image
        sgu = m.spatial_gating_unit
        for conv in (sgu.conv0, sgu.conv_spatial):
            conv.offset_net.weight.mul_(6.0)
            conv.offset_net.bias.mul_(6.0)
    return m


def test_official_key_layout_and_aliases():
    assert DLKA is deformable_LKA_Attention
    m = DLKA(64)
    assert_key_layout(m, [
        ("proj_1.weight", (64, 64, 1, 1)), ("proj_1.bias", (64,)),
        ("spatial_gating_unit.conv0.offset_net.weight", (50, 64, 5, 5)),
        ("spatial_gating_unit.conv0.offset_net.bias", (50,)),
        ("spatial_gating_unit.conv0.deform_conv.weight", (64, 1, 5, 5)),
        ("spatial_gating_unit.conv_spatial.offset_net.weight", (98, 64, 7, 7)),
        ("spatial_gating_unit.conv_spatial.offset_net.bias", (98,)),
        ("spatial_gating_unit.conv_spatial.deform_conv.weight", (64, 1, 7, 7)),
        ("spatial_gating_unit.conv1.weight", (64, 64, 1, 1)), ("spatial_gating_unit.conv1.bias", (64,)),
        ("proj_2.weight", (64, 64, 1, 1)), ("proj_2.bias", (64,))])
    assert sum(p.numel() for p in m.parameters()) == 404692
    assert list(deformable_LKA(8).state_dict()) == [
        "conv0.offset_net.weight", "conv0.offset_net.bias", "conv0.deform_conv.weight",
        "conv_spatial.offset_net.weight", "conv_spatial.offset_net.bias", "conv_spatial.deform_conv.weight",
        "conv1.weight", "conv1.bias"]
    # bias is accepted and unused, as in the official DeformConv; an int kernel works as the tuple
    assert list(DeformConv(8, 8, 3, bias=True).state_dict()) == list(DeformConv(8, 8, (3, 3)).state_dict())


def test_every_size_1_to_16_matches_official_composition():
    m = _layer()
    names = param_names(m)
    generator = torch.Generator().manual_seed(0)
    for h in range(1, 17):
        for w in range(1, 17):
            x = torch.randn(2, 2, h, w, dtype=torch.float64, generator=generator)
            want = outputs_and_grads(lambda t: official_dlka(m, t), x, list(m.parameters()))
            assert all(torch.isfinite(g).all() for g in want[1])
            for backend in BACKENDS:
                assert_close(run(m, x, "deform_conv2d", backend), want, atol=1e-10, names=names)


@pytest.mark.parametrize("cfg", [
    dict(cin=6, cout=4, k=3, stride=2, padding=1, dilation=1, groups=2, og=3, bias=True),
    dict(cin=4, cout=8, k=(3, 2), stride=1, padding=(2, 1), dilation=(2, 1), groups=1, og=2, bias=False),
    dict(cin=4, cout=4, k=5, stride=(1, 2), padding=2, dilation=1, groups=4, og=1, bias=True),
], ids=["grouped_og3_stride2", "rect_kernel_og2", "depthwise_stride12"])
def test_deformable_conv_matches_torchvision(cfg):
    m = DeformableConv2d(cfg["cin"], cfg["cout"], cfg["k"], cfg["stride"], cfg["padding"], cfg["dilation"],
                         cfg["groups"], bias=cfg["bias"]).double()
    kh, kw = m.kernel_size
    for shape in [(2, 9, 7), (1, 1, 6), (2, 5, 1)]:
        b, h, w = shape
        ho, wo = m.output_size(h, w)
        x = torch.randn(b, cfg["cin"], h, w, dtype=torch.float64)
        offset = torch.randn(b, 2 * cfg["og"] * kh * kw, ho, wo, dtype=torch.float64) * 3
        params = list(m.parameters())

        def official(t, o=offset):
            return tv_ops.deform_conv2d(t, o, m.weight, m.bias, m.stride, m.padding, m.dilation)

        want = outputs_and_grads(official, x, params)
        for backend in BACKENDS:
            with use_backend(deform_conv2d=backend):
                got = outputs_and_grads(lambda t: m(t, offset), x, params)
                functional = deform_conv2d(x, offset, m.weight, m.bias, m.stride, m.padding, m.dilation)
            assert_close(got, want, atol=1e-10)
            torch.testing.assert_close(functional, want[0], atol=1e-10, rtol=1e-10)


def test_offset_gradients_and_far_samples_match_torchvision():
    m = DeformableConv2d(3, 3, 3, padding=1, groups=3, bias=False).double()
    x = torch.randn(2, 3, 1, 5, dtype=torch.float64)
    offset = torch.randn(2, 18, 1, 5, dtype=torch.float64) * 2
    offset[0, :4] = 1e3  # far outside the image: zero contribution, finite
    offset = offset.requires_grad_()
    want = torch.autograd.grad(tv_ops.deform_conv2d(x, offset, m.weight, padding=1).square().sum(), offset)[0]
    for backend in BACKENDS:
        with use_backend(deform_conv2d=backend):
            y = m(x, offset)
            got = torch.autograd.grad(y.square().sum(), offset)[0]
        assert torch.isfinite(y).all()
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_auto_choice():
    m = DeformableConv2d(2, 2, 3, padding=1, groups=2)
    x, offset = torch.randn(1, 2, 4, 4), torch.zeros(1, 18, 4, 4)
    assert DEFORM_CONV2D.select(None, m, x, offset).name == "grid_sample"  # CPU: faster than torchvision's kernel
    assert DEFORM_CONV2D.select(None, m, x.bfloat16(), offset.bfloat16()).name == "grid_sample"


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    m = DeformableConv2d(2, 2, 3, padding=2, dilation=2, groups=2).double()
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    offset = (torch.rand(1, 18, 3, 4, dtype=torch.float64) * 2.6 - 1.3).requires_grad_()
    with use_backend(deform_conv2d=backend):
        assert torch.autograd.gradcheck(m, (x, offset), eps=1e-6, atol=1e-6)
        small = DLKA(2).double()
        assert torch.autograd.gradcheck(small, (torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True),),
                                        eps=1e-6, atol=1e-6)


def test_half_precision_and_autocast():
    m = DLKA(8)
    x = torch.randn(2, 8, 9, 7)
    for backend in ("grid_sample", "reference"):  # (all three in half precision)
        with use_backend(deform_conv2d=backend):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert torch.isfinite(m(x).float()).all()
            y = m.to(torch.bfloat16)(x.to(torch.bfloat16))
            assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
            m.float()
    with use_backend(deform_conv2d="torchvision"):  # no bf16 kernel: it runs in fp32 and casts back
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(m(x).float()).all()
        y = m.to(torch.bfloat16)(x.to(torch.bfloat16))
        assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_deterministic_mode():
    m = _layer(8, torch.float32)
    x = torch.randn(2, 8, 9, 7)

    def once():
        y, grads = run(m, x, "deform_conv2d", "grid_sample")
        return [y, *grads]

    deterministic_twice(once)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:Constant folding")
@pytest.mark.parametrize("backend", [None, "reference"])
def test_onnx_dynamic_matches_onnxruntime(backend, tmp_path):
    """'auto' exports through grid_sample (torchvision's op has no ONNX operator)."""
    onnx = pytest.importorskip("onnx")
    m = _layer(8, torch.float32)
    onnx_matches_onnxruntime(m, (1, 8, 12, 10), [(2, 8, 7, 9), (1, 8, 1, 1), (1, 8, 16, 16)], tmp_path,
                             backend_op="deform_conv2d" if backend else None, backend=backend)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "layer.onnx")).graph.node}
    assert ("GridSample" in ops) == (backend is None)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torchvision_by_name_under_export_raises(tmp_path):
    m = DLKA(4).eval()
    with use_backend(deform_conv2d="torchvision"), pytest.raises(BackendUnavailableError, match=r"no ONNX operator"):
        torch.onnx.export(m, (torch.randn(1, 4, 8, 8),), str(tmp_path / "x.onnx"), opset_version=17, dynamo=False)


@pytest.mark.parametrize("make,error,match", [
    (lambda: DLKA(0), ValueError, r"d_model must be a positive integer, got 0"),
    (lambda: DeformConv(8, 3), ValueError, r"in_channels=8 and out_channels=8 must be divisible by groups=3"),
    (lambda: DeformConv(8, 8, kernel_size=(3, 3, 3)), TypeError, r"kernel_size must be an integer or a pair"),
    (lambda: DeformConv(8, 8, padding=-1), ValueError, r"padding must be an integer >= 0, got -1"),
    (lambda: DeformConv(8, 8, bias=1), TypeError, r"bias must be True or False"),
    (lambda: DeformableConv2d(4, 4, 3, backend="onnx"), ValueError, r"backend for deform_conv2d must be None or one"),
])
def test_bad_config(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_input():
    m = DeformableConv2d(4, 4, 3, padding=1)
    with pytest.raises(ValueError, match=r"offset must be \(N, 2·offset_groups·9, 5, 5\) with offset_groups"):
        m(torch.randn(1, 4, 5, 5), torch.randn(1, 27, 5, 5))
    with pytest.raises(ValueError, match=r"smaller than the dilated kernel"):
        DeformableConv2d(4, 4, 5)(torch.randn(1, 4, 3, 3), torch.randn(1, 50, 1, 1))
    with pytest.raises(ValueError, match=r"deformable_LKA_Attention expects a \(N, 8, H, W\) tensor"):
        DLKA(8)(torch.randn(1, 4, 5, 5))
