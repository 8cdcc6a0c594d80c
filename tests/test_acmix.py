"""ACmix: key layout and init, both backends against a plain restatement of the official math over every H, W in
1..16, strides/dilations/kernels, channels-last, half precision, ONNX, errors."""

import pytest
import torch
import torch.nn.functional as F

from attention_checks import (assert_close, assert_key_layout, deterministic_twice, onnx_matches_onnxruntime,
                              outputs_and_grads, param_names, run)
from attention_checks import single_thread  # noqa: F401  (fixture)
from yoloattn import use_backend
from yoloattn.nn.acmix import ACmix

pytestmark = pytest.mark.usefixtures("single_thread")
BACKENDS = ["fused", "reference"]


def _reflect(i: int, n: int) -> int:
    """Index i of a reflection-padded axis of length n, reflecting again until it lands inside."""
    if n == 1:
        return 0
    while not 0 <= i < n:
        i = -i if i < 0 else 2 * (n - 1) - i
    return i


def _reflect_pad(t, p):
    h, w = t.shape[-2:]
    rows = torch.tensor([_reflect(i, h) for i in range(-p, h + p)])
    cols = torch.tensor([_reflect(i, w) for i in range(-p, w + p)])
    return t[..., rows, :][..., cols]


def official_acmix(m, x):
    """ACmix's forward written out in the official order (unfolds of the reflection-padded k, pe and v; the
    ``+ pe_q - pe_k`` term; fc over the stacked q/k/v heads, then the grouped shift conv)."""
    q, k, v = (F.conv2d(x, c.weight, c.bias) for c in (m.conv1, m.conv2, m.conv3))
    b, c, h, w = q.shape
    s, heads, hd, kk, pad = m.stride, m.head, m.head_dim, m.kernel_att, m.padding_att
    ho, wo = -(-h // s), -(-w // s)
    loc = torch.stack([torch.linspace(-1, 1, w, dtype=x.dtype).repeat(h, 1),
                       torch.linspace(-1, 1, h, dtype=x.dtype).unsqueeze(1).repeat(1, w)]).unsqueeze(0)
    pe = F.conv2d(loc, m.conv_p.weight, m.conv_p.bias)
    q_att = q.reshape(b * heads, hd, h, w) * hd**-0.5
    k_att, v_att = k.reshape(b * heads, hd, h, w), v.reshape(b * heads, hd, h, w)
    q_att, q_pe = q_att[:, :, ::s, ::s], pe[:, :, ::s, ::s]

    def unfold(t):
        return F.unfold(_reflect_pad(t, pad), kk, dilation=m.dilation, stride=s).reshape(-1, hd, kk * kk, ho, wo)

    att = (q_att.unsqueeze(2) * (unfold(k_att) + q_pe.unsqueeze(2) - unfold(pe))).sum(1).softmax(dim=1)
    out_att = (att.unsqueeze(1) * unfold(v_att)).sum(2).reshape(b, c, ho, wo)
    f_all = F.conv2d(torch.cat([t.reshape(b, heads, hd, h * w) for t in (q, k, v)], 1), m.fc.weight)
    f_conv = f_all.permute(0, 2, 1, 3).reshape(b, -1, h, w)
    out_conv = F.conv2d(f_conv, m.dep_conv.weight, None, stride=s, padding=m.kernel_conv // 2, groups=hd)
    return m.rate1 * out_att + m.rate2 * out_conv


def _layer(*args, dtype=torch.float64, **kw):
    m = ACmix(*args, **kw).to(dtype)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # away from the init (identical shift kernels, equal rates, near-uniform softmax)
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=dtype) * 0.3)
        m.conv1.weight.mul_(3.0)
    return m


def _official(m, x):
    return outputs_and_grads(lambda t: official_acmix(m, t), x, list(m.parameters()))


def test_official_key_layout_and_init():
    m = ACmix(64, 64)
    assert_key_layout(ACmix(64, 64), [
        ("rate1", (1,)), ("rate2", (1,)), ("conv1.weight", (64, 64, 1, 1)), ("conv1.bias", (64,)),
        ("conv2.weight", (64, 64, 1, 1)), ("conv2.bias", (64,)), ("conv3.weight", (64, 64, 1, 1)),
        ("conv3.bias", (64,)), ("conv_p.weight", (16, 2, 1, 1)), ("conv_p.bias", (16,)), ("fc.weight", (9, 12, 1, 1)),
        ("dep_conv.weight", (64, 9, 3, 3))])
    assert sum(p.numel() for p in m.parameters()) == 17822 and m.dep_conv.bias is None
    assert m.rate1.item() == 0.5 and m.rate2.item() == 0.5
    kernel = m.dep_conv.weight
    for n in range(9):  # one-hot shift kernels, the same for every output channel
        expected = torch.zeros(3, 3)
        expected[n // 3, n % 3] = 1
        assert torch.equal(kernel[:, n], expected.expand(64, 3, 3))


# names whose gradient is only rounding noise (conv_p's bias cancels in pe_q - pe_k)
NOISE = ("conv_p.bias",)


def test_every_size_1_to_16_matches_official_math():
    """Kernel 7 (pad 3): sizes below 4 reflect repeatedly, where nn.ReflectionPad2d raised."""
    m = _layer(4, 8, head=2)
    names = param_names(m)
    generator = torch.Generator().manual_seed(0)
    for h in range(1, 17):
        for w in range(1, 17):
            x = torch.randn(2, 4, h, w, dtype=torch.float64, generator=generator)
            want = _official(m, x)
            for backend in BACKENDS:
                assert_close(run(m, x, "acmix", backend), want, atol=1e-10, names=names, skip=NOISE)


OPTIONS = {
    "stride2": dict(in_planes=6, out_planes=8, stride=2),
    "dilation2_k5": dict(in_planes=4, out_planes=8, kernel_att=5, dilation=2),
    "kernel_conv5_head4": dict(in_planes=8, out_planes=8, head=4, kernel_conv=5),
    "k3_stride3": dict(in_planes=5, out_planes=6, kernel_att=3, head=3, stride=3),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_options_match_official_math(name):
    m = _layer(**OPTIONS[name])
    names = param_names(m)
    for shape in [(2, 9, 12), (3, 7, 5), (2, 1, 4), (2, 16, 13)]:
        b, h, w = shape
        x = torch.randn(b, m.in_planes, h, w, dtype=torch.float64)
        want = _official(m, x)
        s = m.stride
        assert want[0].shape == (b, m.out_planes, -(-h // s), -(-w // s))
        for backend in BACKENDS:
            assert_close(run(m, x, "acmix", backend), want, atol=1e-10, names=names, skip=NOISE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_channels_last_and_non_contiguous(backend):
    m = _layer(8, 16, dtype=torch.float32)
    x = torch.randn(3, 8, 10, 12)
    want = _official(m, x)
    with use_backend(acmix=backend):
        # channels-last with batch >= 2 broke the official .view (Ultralytics converts models to channels-last)
        transposed = x.transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous strides
        for variant in (x, x.contiguous(memory_format=torch.channels_last), transposed):
            got = outputs_and_grads(m, variant, list(m.parameters()))
            assert_close(got, want, atol=1e-5, names=param_names(m), skip=NOISE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    m = _layer(2, 4, kernel_att=3, head=2, stride=2)
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    with use_backend(acmix=backend):
        assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_module_and_autocast(backend, dtype):
    """The official position encoding was fp32 (``.cuda()``), so a half model crashed."""
    m = ACmix(8, 16)
    x = torch.randn(2, 8, 9, 11)
    with use_backend(acmix=backend):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(m(x).float()).all()
        y = m.to(dtype)(x.to(dtype))
        assert y.dtype == dtype and torch.isfinite(y.float()).all()
        torch.testing.assert_close(y.float(), m.float()(x), atol=0.1, rtol=0.05)


def test_deterministic_mode():
    m = _layer(8, 8, dtype=torch.float32)
    x = torch.randn(2, 8, 9, 7)

    def once():
        y, grads = run(m, x, "acmix", "fused")
        return [y, *grads]

    deterministic_twice(once)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:Constant folding")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stride", [1, 2])
def test_onnx_dynamic_matches_onnxruntime(backend, stride, tmp_path):
    m = ACmix(8, 16, kernel_att=5, stride=stride)
    onnx_matches_onnxruntime(m, (1, 8, 12, 10), [(2, 8, 7, 9), (1, 8, 1, 2)], tmp_path, backend_op="acmix",
                             backend=backend)


@pytest.mark.parametrize("kw,error,match", [
    (dict(in_planes=8, out_planes=10, head=4), ValueError, r"out_planes=10 must be divisible by head=4"),
    (dict(in_planes=8, out_planes=8, kernel_att=6), ValueError, r"kernel_att must be odd"),
    (dict(in_planes=8, out_planes=8, kernel_conv=2), ValueError, r"kernel_conv must be odd"),
    (dict(in_planes=0, out_planes=8), ValueError, r"in_planes must be a positive integer, got 0"),
    (dict(in_planes=8, out_planes=8, stride=0), ValueError, r"stride must be a positive integer, got 0"),
    (dict(in_planes=8, out_planes=8, dilation=1.5), TypeError, r"dilation must be a positive integer"),
    (dict(in_planes=8, out_planes=8, backend="sdpa"), ValueError, r"backend for acmix must be None or one of"),
])
def test_bad_config(kw, error, match):
    with pytest.raises(error, match=match):
        ACmix(**kw)


def test_bad_input():
    with pytest.raises(ValueError, match=r"ACmix expects a \(N, 8, H, W\) tensor, got shape \(1, 4, 5, 5\)"):
        ACmix(8, 8)(torch.randn(1, 4, 5, 5))
    with pytest.raises(TypeError, match=r"ACmix has torch.float32 weights but got a torch.float64 input"):
        ACmix(8, 8)(torch.randn(1, 8, 5, 5, dtype=torch.float64))
