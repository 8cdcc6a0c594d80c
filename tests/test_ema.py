"""EMA: official keys, official math on outputs and gradients for every backend, ONNX with dynamic shapes, errors."""

import numpy as np
import pytest
import torch

import official_conv_attentions as official
from official_conv_attentions import one_thread  # noqa: F401 (autouse fixture)
from yoloattn.nn.backends import use_backend
from yoloattn.nn.ema import EMA, EMA_OP, EfficientMultiScaleAttention

BACKENDS = list(EMA_OP.backends)
SHAPES = [(2, 1, 1), (2, 1, 7), (2, 6, 1), (1, 3, 5), (2, 13, 9), (1, 16, 21)]
LAYOUTS = ("contiguous", "channels_last", "transposed")
CONFIGS = [(8, 4), (8, 8), (12, 3), (8, 1)]  # (channels, factor): 2, 1, 4 and 8 channels per group

LAYOUT_64 = [("gn.weight", (2,)), ("gn.bias", (2,)), ("conv1x1.weight", (2, 2, 1, 1)), ("conv1x1.bias", (2,)),
             ("conv3x3.weight", (2, 2, 3, 3)), ("conv3x3.bias", (2,))]


def _input(n, c, h, w, layout):
    if layout == "transposed":  # a non-contiguous view that is not channels-last either
        return torch.randn(n, c, w, h).transpose(2, 3)
    x = torch.randn(n, c, h, w)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def _layer(channels=8, factor=4, **kw):
    m = EMA(channels, factor=factor, **kw)
    with torch.no_grad():  # non-default values everywhere (GN starts at the identity)
        for p in m.parameters():
            p.normal_(0, 0.5)
    return m


def _run_backend(m, x, backend):
    with use_backend(ema=backend):
        return official.run(lambda mod, t: mod(t), m, x)


def test_state_dict_layout_and_strict_load():
    m = EMA(64)
    assert [(k, tuple(v.shape)) for k, v in m.state_dict().items()] == LAYOUT_64
    state = {k: torch.randn(s) for k, s in LAYOUT_64}
    m.load_state_dict(state, strict=True)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in state.items())
    assert sum(p.numel() for p in m.parameters()) == 48
    assert list(EMA(256).state_dict()) == [k for k, _ in LAYOUT_64]  # the keys depend on channels // factor only
    assert EMA(256).conv3x3.weight.shape == (8, 8, 3, 3) and EMA(64, factor=8).gn.num_groups == 8
    assert EMA(64, 64).groups == 32 and EfficientMultiScaleAttention is EMA


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_official_outputs_and_gradients(shape, backend):
    n, h, w = shape
    for channels, factor in CONFIGS:
        m = _layer(channels, factor)
        for layout in LAYOUTS:
            x = _input(n, channels, h, w, layout)
            official.assert_same(_run_backend(m, x, backend), official.run(official.ema, m, x))


def test_reference_is_the_official_numbers_bit_for_bit():
    m = _layer(16, 4)
    x = torch.randn(2, 16, 11, 13)
    with use_backend(ema="reference"), torch.no_grad():
        assert torch.equal(m(x), official.ema(m, x))


def test_auto_choice():
    m, small, large = _layer(), torch.randn(1, 8, 4, 4), torch.randn(1, 8, 48, 40)
    assert EMA_OP.select(None, m, small).name == "reference"  # small map
    assert EMA_OP.select(None, m, large).name == "fused"  # training (the weights need gradients), large map
    with torch.no_grad():
        assert EMA_OP.select(None, m, large).name == "reference"  # forward only
    assert EMA_OP.select("onnx", m, small).name == "onnx"


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    m = _layer(4, 2).double()
    x = torch.randn(1, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    with use_backend(ema=backend):
        assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_train_eval_deterministic(backend):
    m = _layer(32, 8)
    x = torch.randn(2, 32, 12, 10) * 4
    official.check_bf16_mode_free_deterministic(m, x, "ema", backend)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("backend", [None, "onnx", "fused"])
def test_onnx_dynamic_matches_onnxruntime(backend, tmp_path):
    """The official pools cannot be exported with dynamic H/W; 'auto' switches to the 'onnx' backend under export."""
    ort = pytest.importorskip("onnxruntime")
    m = _layer(16, 4).eval()
    path = tmp_path / "ema.onnx"
    with use_backend(ema=backend or "auto"), torch.no_grad():
        torch.onnx.export(m, (torch.randn(1, 16, 24, 32),), str(path), opset_version=17, dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(2, 16, 13, 40), (1, 16, 5, 3)]:
        x = torch.randn(shape)
        with torch.no_grad():
            expected = official.ema(m, x).numpy()
        np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("make,error,match", [
    (lambda: EMA(48), ValueError, r"channels=48 must be a multiple of factor=32"),
    (lambda: EMA(16), ValueError, r"channels=16 must be a multiple of factor=32"),
    (lambda: EMA(64, 8), ValueError, r"c2=8 must be None or equal to channels=64; .* factor=8"),
    (lambda: EMA(64, factor=0), ValueError, r"factor must be .*, got 0"),
    (lambda: EMA(64, factor=2.0), TypeError, r"factor must be "),
    (lambda: EMA(0), ValueError, r"channels must be .*, got 0"),
    (lambda: EMA(64, backend="sdpa"), ValueError, r"backend for ema must be None or one of \('auto', 'fused', "
                                                  r"'onnx', 'reference'\), got 'sdpa'"),
    (lambda: EMA(64)(torch.randn(1, 32, 5, 5)), ValueError, r"EMA expects a \(N, 64, H, W\) tensor"),
    (lambda: EMA(64)(torch.randn(1, 64, 5, 0)), ValueError, r"needs N, H and W >= 1"),
])
def test_bad_configurations(make, error, match):
    with pytest.raises(error, match=match):
        make()
