"""MSDA (DilateFormer's MultiDilatelocalAttention): key layout, both backends against a plain restatement of the
official math over every H, W in 1..16, options, layouts, dtypes, ONNX, errors."""

import pytest
import torch
import torch.nn.functional as F

from attention_checks import (assert_close, assert_key_layout, deterministic_twice, onnx_matches_onnxruntime,
                              outputs_and_grads, param_names, run)
from attention_checks import single_thread  # noqa: F401  (fixture)
from yoloattn import use_backend
from yoloattn.nn.msda import MSDA, MultiDilatelocalAttention

pytestmark = pytest.mark.usefixtures("single_thread")
BACKENDS = ["fused", "reference"]


def official_msda(m, x_nhwc):
    """DilateFormer's forward written out: 1x1 qkv conv; per dilation group unfold the keys and values
    (zero padding), q·k per neighbour, scale, softmax, weighted values; groups concatenated; Linear.
    The heads are split over the dilations in contiguous blocks (the official split when it divides)."""
    b, h, w, c = x_nhwc.shape
    dilations = [m.dilation] if isinstance(m.dilation, int) else list(m.dilation)
    nh, nd, k = m.num_heads, len(dilations), m.kernel_size
    hd = c // nh
    heads = [nh // nd + (i < nh % nd) for i in range(nd)]
    scale = m.dilate_attention[0].scale
    qkv = F.conv2d(x_nhwc.permute(0, 3, 1, 2), m.qkv.weight, m.qkv.bias)
    outs, c0 = [], 0
    for d, g in zip(dilations, heads):
        c1 = c0 + g * hd
        q, key, val = qkv[:, c0:c1], qkv[:, c + c0:c + c1], qkv[:, 2 * c + c0:2 * c + c1]
        pad = d * (k - 1) // 2
        ku = F.unfold(key, k, dilation=d, padding=pad).reshape(b, g, hd, k * k, h * w)
        vu = F.unfold(val, k, dilation=d, padding=pad).reshape(b, g, hd, k * k, h * w)
        logits = torch.einsum("bgdn,bgdkn->bgkn", q.reshape(b, g, hd, h * w), ku) * scale
        attn = logits.softmax(dim=2)
        outs.append(torch.einsum("bgkn,bgdkn->bgdn", attn, vu).reshape(b, c1 - c0, h, w))
        c0 = c1
    out = torch.cat(outs, dim=1).permute(0, 2, 3, 1)
    return F.linear(out, m.proj.weight, m.proj.bias)


def _layer(cls=MSDA, dtype=torch.float64, **kw):
    m = cls(**kw).to(dtype)
    with torch.no_grad():  # larger logits than the default init, so the softmax is far from uniform
        m.qkv.weight.mul_(4.0)
    return m


def _official_nchw(m):
    return lambda x: official_msda(m, x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_official_key_layout():
    assert_key_layout(MultiDilatelocalAttention(96, 6), [
        ("qkv.weight", (288, 96, 1, 1)), ("proj.weight", (96, 96)), ("proj.bias", (96,))])
    m = MultiDilatelocalAttention(64, 8, qkv_bias=True, dilation=[1, 2, 3, 4])
    assert_key_layout(m, [("qkv.weight", (192, 64, 1, 1)), ("qkv.bias", (192,)), ("proj.weight", (64, 64)),
                          ("proj.bias", (64,))])
    assert sum(p.numel() for p in MultiDilatelocalAttention(96, 6).parameters()) == 36960
    assert list(MSDA(96, 6).state_dict()) == list(MultiDilatelocalAttention(96, 6).state_dict())
    assert len(m.dilate_attention) == 4 and not list(m.dilate_attention.parameters())


def test_every_size_1_to_16_matches_official_math():
    """Uneven head split (4 heads over dilations 1, 2, 3), dilated kernels larger than the map."""
    m = _layer(dim=8, num_heads=4, dilation=[1, 2, 3])
    names = param_names(m)
    generator = torch.Generator().manual_seed(0)
    for h in range(1, 17):
        for w in range(1, 17):
            x = torch.randn(2, 8, h, w, dtype=torch.float64, generator=generator)
            want = _run_official(m, x)
            for backend in BACKENDS:
                assert_close(run(m, x, "msda", backend), want, atol=1e-10, names=names)


def _run_official(m, x):
    return outputs_and_grads(_official_nchw(m), x, list(m.parameters()))


OPTIONS = {
    "even_split_bias": dict(dim=12, num_heads=3, qkv_bias=True, dilation=[1, 2, 3]),
    "k5_scale": dict(dim=16, num_heads=4, qk_scale=0.3, kernel_size=5, dilation=[1, 3]),
    "int_dilation_k1": dict(dim=8, num_heads=2, qkv_bias=True, kernel_size=1, dilation=2),
    "four_dilations": dict(dim=16, num_heads=8, dilation=[1, 2, 3, 4]),
    "qk_scale_zero_is_default": dict(dim=8, num_heads=2, qk_scale=0, dilation=[1]),
}


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_options_fp32_match_official_math(name, backend):
    m = _layer(dtype=torch.float32, **OPTIONS[name])
    for shape in [(2, 5, 7), (3, 9, 4), (2, 1, 6)]:
        b, h, w = shape
        x = torch.randn(b, m.dim, h, w)
        assert_close(run(m, x, "msda", backend), _run_official(m, x), atol=2e-5, names=param_names(m))


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_official_layout_and_input_untouched(backend):
    nhwc = _layer(MultiDilatelocalAttention, torch.float32, dim=16, num_heads=4, dilation=[1, 2])
    nchw = MSDA(16, 4, dilation=[1, 2])
    nchw.load_state_dict(nhwc.state_dict())
    x = torch.randn(2, 6, 9, 16)
    saved = x.clone()
    with use_backend(msda=backend):
        y = nhwc(x)
        assert y.shape == x.shape and y.is_contiguous()
        assert torch.equal(x, saved)  # the official code overwrote its input
        torch.testing.assert_close(y, official_msda(nhwc, x), atol=1e-5, rtol=1e-5)
        xc = x.permute(0, 3, 1, 2)
        for variant in (xc, xc.contiguous(memory_format=torch.channels_last), xc.contiguous()[:, :, ::1, :]):
            torch.testing.assert_close(nchw(variant).permute(0, 2, 3, 1), y, atol=1e-5, rtol=1e-5)
        # a leaf that needs grad (the official code failed already in forward)
        leaf = x.clone().requires_grad_()
        nhwc(leaf).sum().backward()
        assert torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    m = MSDA(4, 2, qkv_bias=True, dilation=[1, 2]).double()
    x = torch.randn(1, 4, 3, 4, dtype=torch.float64, requires_grad=True)
    with use_backend(msda=backend):
        assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_and_bf16_module_finite(backend):
    m = MSDA(16, 4)
    x = torch.randn(2, 16, 11, 9) * 4
    with use_backend(msda=backend):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        assert torch.isfinite(y.float()).all()
        y16 = m.to(torch.bfloat16)(x.to(torch.bfloat16))
        assert y16.dtype == torch.bfloat16 and torch.isfinite(y16.float()).all()


def test_dropout_train_and_eval():
    m = MSDA(16, 4, attn_drop=0.5, proj_drop=0.1)
    ref = MSDA(16, 4)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 16, 7, 8)
    for backend in BACKENDS:
        with use_backend(msda=backend):
            m.eval()
            torch.testing.assert_close(m(x), ref(x))
            m.train()
            y = m(x)
            assert torch.isfinite(y).all() and not torch.allclose(y, ref(x))


def test_deterministic_mode():
    m = MSDA(16, 4)
    x = torch.randn(2, 16, 9, 7)

    def once():
        y, grads = run(m, x, "msda", "fused")
        return [y, *grads]

    deterministic_twice(once)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:Constant folding")
@pytest.mark.parametrize("backend", BACKENDS)
def test_onnx_dynamic_matches_onnxruntime(backend, tmp_path):
    m = MSDA(16, 4, qkv_bias=True, dilation=[1, 3])
    onnx_matches_onnxruntime(m, (1, 16, 12, 10), [(2, 16, 7, 5), (1, 16, 1, 3)], tmp_path, backend_op="msda",
                             backend=backend)


def test_yolo_widths_with_defaults():
    for c, s in [(64, 20), (128, 10), (256, 5)]:
        m = MSDA(c)  # 8 heads over dilations 1, 2, 3 (3, 3, 2 heads): the official class cannot build this
        assert m.group_channels == ((0, 3 * c // 8), (3 * c // 8, 6 * c // 8), (6 * c // 8, c))
        y = m(torch.randn(1, c, s, s + 3))
        assert y.shape == (1, c, s, s + 3) and torch.isfinite(y).all()


@pytest.mark.parametrize("kw,error,match", [
    (dict(dim=30, num_heads=4), ValueError, r"dim=30 must be divisible by num_heads=4"),
    (dict(dim=16, num_heads=2), ValueError, r"num_heads=2 must be >= len\(dilation\)=3"),
    (dict(dim=16, num_heads=4, kernel_size=4), ValueError, r"kernel_size must be odd"),
    (dict(dim=16, num_heads=4, kernel_size=0), ValueError, r"kernel_size must be a positive integer, got 0"),
    (dict(dim=16, num_heads=4, dilation=[]), TypeError, r"dilation must be a positive integer or a non-empty list"),
    (dict(dim=16, num_heads=4, dilation=[1, 0]), ValueError, r"each dilation must be a positive integer, got 0"),
    (dict(dim=16, num_heads=4, attn_drop=1.0), ValueError, r"attn_drop must be in \[0.0, 1.0\)"),
    (dict(dim=16, num_heads=4, qkv_bias=1), TypeError, r"qkv_bias must be True or False"),
    (dict(dim=16, num_heads=4, qk_scale="x"), TypeError, r"qk_scale must be a number"),
    (dict(dim=16, num_heads=4, backend="sdpa"), ValueError, r"backend for msda must be None or one of"),
])
def test_bad_config(kw, error, match):
    with pytest.raises(error, match=match):
        MSDA(**kw)


def test_bad_input():
    m = MSDA(16, 4)
    with pytest.raises(ValueError, match=r"MSDA expects a \(N, 16, H, W\) tensor, got shape \(1, 8, 4, 4\)"):
        m(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match=r"expects a \(N, H, W, 16\) tensor"):
        MultiDilatelocalAttention(16, 4)(torch.randn(1, 16, 4, 4))
