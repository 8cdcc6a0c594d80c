"""Polarized self-attention (PSA_p / PSA_s): official keys and init, official math for every backend, ONNX, errors."""

import math

import pytest
import torch

import official_conv_attentions as official
from attention_checks import onnx_matches_onnxruntime
from official_conv_attentions import one_thread  # noqa: F401 (autouse fixture)
from yoloattn.nn.backends import use_backend
from yoloattn.nn.polarized import POLARIZED_ATTENTION, PSA_p, PSA_s, PolarizedSelfAttention

BACKENDS = list(POLARIZED_ATTENTION.backends)
SHAPES = [(2, 1, 1), (2, 1, 7), (2, 6, 1), (1, 3, 5), (2, 13, 9), (1, 16, 21)]
LAYOUTS = ("contiguous", "channels_last", "transposed")

LAYOUT_P_64 = [("conv_q_right.weight", (1, 64, 1, 1)), ("conv_v_right.weight", (32, 64, 1, 1)),
               ("conv_up.weight", (64, 32, 1, 1)), ("conv_q_left.weight", (32, 64, 1, 1)),
               ("conv_v_left.weight", (32, 64, 1, 1))]
LAYOUT_S_64 = [("conv_q_right.weight", (1, 64, 1, 1)), ("conv_v_right.weight", (32, 64, 1, 1)),
               ("conv_up.0.weight", (8, 32, 1, 1)), ("conv_up.0.bias", (8,)),
               ("conv_up.1.weight", (8, 1, 1)), ("conv_up.1.bias", (8, 1, 1)),
               ("conv_up.3.weight", (64, 8, 1, 1)), ("conv_up.3.bias", (64,)),
               ("conv_q_left.weight", (32, 64, 1, 1)), ("conv_v_left.weight", (32, 64, 1, 1))]


def _input(n, c, h, w, layout):
    if layout == "transposed":  # a non-contiguous view that is not channels-last either
        return torch.randn(n, c, w, h).transpose(2, 3)
    x = torch.randn(n, c, h, w)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def _layer(channels=8, mode="p", **kw):
    m = PolarizedSelfAttention(channels, mode, **kw)
    with torch.no_grad():  # larger than the official init, so the softmaxes are far from uniform
        for p in m.parameters():
            p.normal_(0, 0.6)
    return m


def _run_backend(m, x, backend):
    with use_backend(polarized_attention=backend):
        return official.run(lambda mod, t: mod(t), m, x)


@pytest.mark.parametrize("cls,mode,layout,count", [(PSA_p, "p", LAYOUT_P_64, 8_256), (PSA_s, "s", LAYOUT_S_64, 7_064)])
def test_state_dict_layout_and_strict_load(cls, mode, layout, count):
    m = cls(64, 64)
    assert [(k, tuple(v.shape)) for k, v in m.state_dict().items()] == layout
    state = {k: torch.randn(s) for k, s in layout}
    m.load_state_dict(state, strict=True)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in state.items())
    assert sum(p.numel() for p in m.parameters()) == count
    yolo = PolarizedSelfAttention(64, mode)  # the YOLO-facing class has the official keys
    yolo.load_state_dict(state, strict=True)
    x = torch.randn(1, 64, 6, 5)
    with torch.no_grad():
        assert torch.equal(yolo(x), m(x))


def test_official_attributes_and_init():
    m = PSA_s(256, 256, kernel_size=3)
    assert (m.inplanes, m.planes, m.inter_planes, m.kernel_size, m.stride, m.padding) == (256, 256, 128, 3, 1, 1)
    for conv in (m.conv_q_right, m.conv_v_right, m.conv_q_left, m.conv_v_left):
        assert conv.inited is True and conv.bias is None
        assert abs(conv.weight.std().item() / math.sqrt(2 / 256) - 1) < 0.2  # kaiming_normal_, fan_in, ReLU gain
    assert PSA_p(9, 9).inter_planes == 4 and PSA_s(9, 9).conv_up[0].out_channels == 1
    assert not isinstance(PSA_s(8, 8), PSA_p) and PSA_p(8, 8).mode == "p" and PSA_s(8, 8).mode == "s"
    assert "PSA" not in __import__("yoloattn.nn.polarized", fromlist=["__all__"]).__all__


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["p", "s"])
def test_matches_official_outputs_and_gradients(mode, shape, backend):
    n, h, w = shape
    # PSA_s's LayerNorm has C/8 channels: below 4 its output is nearly constant and the gradients before it are
    # rounding noise (in the official code too), so PSA_s is compared at 32 and 34 channels
    for channels in (8, 9) if mode == "p" else (32, 34):
        m = _layer(channels, mode)
        for layout in LAYOUTS:
            x = _input(n, channels, h, w, layout) * 2
            official.assert_same(_run_backend(m, x, backend), official.run(official.psa, m, x))


def test_parallel_spatial_mask_is_close_to_half():
    """The official PSA_p's spatial mask is σ(softmax over H·W) ≈ σ(1/HW): kept (official numbers)."""
    m = PSA_p(16, 16)
    x = torch.randn(1, 16, 9, 7)
    with torch.no_grad():
        spatial = m.channel_pool(x) / x  # the paper's spatial-only branch (official name channel_pool)
    assert spatial.min() > 0.5 and spatial.max() < 0.52


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["p", "s"])
def test_gradcheck_float64(mode, backend):
    m = _layer(8, mode).double()
    x = torch.randn(1, 8, 3, 4, dtype=torch.float64, requires_grad=True)
    with use_backend(polarized_attention=backend):
        assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["p", "s"])
def test_bf16_autocast_train_eval_deterministic(mode, backend):
    m = _layer(16, mode)
    x = torch.randn(2, 16, 12, 10) * 4
    official.check_bf16_mode_free_deterministic(m, x, "polarized_attention", backend)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["p", "s"])
def test_onnx_dynamic_matches_onnxruntime(mode, backend, tmp_path):
    onnx_matches_onnxruntime(_layer(16, mode), (1, 16, 24, 32), [(2, 16, 13, 40), (1, 16, 5, 3)], tmp_path,
                             backend_op="polarized_attention", backend=backend,
                             expected=official.psa)


@pytest.mark.parametrize("make,error,match", [
    (lambda: PSA_p(64, 32), ValueError, r"PSA_p multiplies its input by the masks: planes=32 must equal inplanes=64"),
    (lambda: PSA_s(64, 64, stride=2), ValueError, r"PSA_s needs stride=1 .*, got stride=2"),
    (lambda: PSA_s(4, 4), ValueError, r"PSA_s with mode='s' needs at least 8 channels .*, got 4"),
    (lambda: PSA_p(1, 1), ValueError, r"PSA_p with mode='p' needs at least 2 channels"),
    (lambda: PSA_p(8, 8, kernel_size=0), ValueError, r"kernel_size must be .*, got 0"),
    (lambda: PolarizedSelfAttention(64, "q"), ValueError, r"mode must be one of \('p', 's'\), got 'q'"),
    (lambda: PolarizedSelfAttention(64, mode=1), ValueError, r"mode must be one of \('p', 's'\), got 1"),
    (lambda: PolarizedSelfAttention(0), ValueError, r"channels must be .*, got 0"),
    (lambda: PolarizedSelfAttention(64, backend="onnx"), ValueError, r"backend for polarized_attention must be None"),
    (lambda: PSA_p(8, 8)(torch.randn(1, 4, 3, 3)), ValueError, r"PSA_p expects a \(N, 8, H, W\) tensor"),
])
def test_bad_configurations(make, error, match):
    with pytest.raises(error, match=match):
        make()
