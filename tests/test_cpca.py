"""CPCA (CPCANet RepBlock): official keys, official math on outputs and gradients for every backend, ONNX, errors."""

import pytest
import torch

import official_conv_attentions as official
from attention_checks import onnx_matches_onnxruntime
from official_conv_attentions import one_thread  # noqa: F401 (autouse fixture)
from yoloattn.nn.backends import use_backend
from yoloattn.nn.cpca import CPCA, CPCA_OP, CPCA_ChannelAttention, CPCAChannelAttention, RepBlock

BACKENDS = list(CPCA_OP.backends)
SHAPES = [(2, 1, 1), (2, 1, 7), (2, 6, 1), (1, 3, 5), (2, 13, 9), (1, 22, 25), (1, 33, 40)]  # 33x40: > 1024 pixels
LAYOUTS = ("contiguous", "channels_last", "transposed")

LAYOUT_64 = [
    ("ca.fc1.weight", (16, 64, 1, 1)), ("ca.fc1.bias", (16,)),
    ("ca.fc2.weight", (64, 16, 1, 1)), ("ca.fc2.bias", (64,)),
    ("dconv5_5.weight", (64, 1, 5, 5)), ("dconv5_5.bias", (64,)),
    ("dconv1_7.weight", (64, 1, 1, 7)), ("dconv1_7.bias", (64,)),
    ("dconv7_1.weight", (64, 1, 7, 1)), ("dconv7_1.bias", (64,)),
    ("dconv1_11.weight", (64, 1, 1, 11)), ("dconv1_11.bias", (64,)),
    ("dconv11_1.weight", (64, 1, 11, 1)), ("dconv11_1.bias", (64,)),
    ("dconv1_21.weight", (64, 1, 1, 21)), ("dconv1_21.bias", (64,)),
    ("dconv21_1.weight", (64, 1, 21, 1)), ("dconv21_1.bias", (64,)),
    ("conv.weight", (64, 64, 1, 1)), ("conv.bias", (64,)),
]


def _input(n, c, h, w, layout):
    if layout == "transposed":  # a non-contiguous view that is not channels-last either
        return torch.randn(n, c, w, h).transpose(2, 3)
    x = torch.randn(n, c, h, w)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def _layer(c=8, *args, **kw):
    m = CPCA(c, *args, **kw)
    with torch.no_grad():  # non-default values everywhere
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def _run_backend(m, x, backend):
    with use_backend(cpca=backend):
        return official.run(lambda mod, t: mod(t), m, x)


def test_state_dict_layout_and_strict_load():
    m = CPCA(64, 64)
    assert [(k, tuple(v.shape)) for k, v in m.state_dict().items()] == LAYOUT_64
    state = {k: torch.randn(s) for k, s in LAYOUT_64}
    m.load_state_dict(state, strict=True)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in state.items())
    assert sum(p.numel() for p in m.parameters()) == 13_328
    assert (m.C, m.O) == (64, 64) and m.ca.input_channels == 64
    assert [k for k in CPCA(64, 64, 8).state_dict() if k.startswith("ca.")] == [k for k, _ in LAYOUT_64[:4]]
    assert CPCA(64, 64, 8).ca.fc1.out_channels == 8 and CPCA(64).ca.fc1.out_channels == 16


def test_aliases_and_channel_prior():
    assert RepBlock is CPCA and CPCA_ChannelAttention is CPCAChannelAttention
    assert CPCAChannelAttention.__name__ != "ChannelAttention"  # Ultralytics has a different ChannelAttention
    ca = CPCAChannelAttention(8, 2)
    x = torch.randn(3, 8, 5, 4)
    w = ca(x)
    assert w.shape == (3, 8, 1, 1) and (w > 0).all() and (w < 2).all()  # two sigmoids added


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_official_outputs_and_gradients(shape, backend):
    n, h, w = shape
    for reduce in (4, 8):
        m = _layer(8, 8, reduce)
        for layout in LAYOUTS:
            x = _input(n, 8, h, w, layout)
            official.assert_same(_run_backend(m, x, backend), official.run(official.cpca, m, x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_conv_gradient_sums_three_uses(backend):
    m = _layer(4)
    x = torch.randn(1, 4, 6, 5)
    _, grads, _ = _run_backend(m, x, backend)
    conv_grad = grads[1 + [n for n, _ in m.named_parameters()].index("conv.weight")]
    copies = [m.conv.weight.detach().clone().requires_grad_() for _ in range(3)]  # the three uses, split apart
    y = official.cpca(m, x, conv_weights=copies)
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    uses = torch.autograd.grad((y * r).sum(), copies)
    assert all(u.abs().sum() > 0 for u in uses)
    torch.testing.assert_close(conv_grad, uses[0] + uses[1] + uses[2], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    m = _layer(4, 4, 2).double()
    x = torch.randn(1, 4, 3, 4, dtype=torch.float64, requires_grad=True)
    with use_backend(cpca=backend):
        assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_train_eval_deterministic(backend):
    m = _layer(16)
    x = torch.randn(2, 16, 12, 10) * 4
    official.check_bf16_mode_free_deterministic(m, x, "cpca", backend)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_onnx_dynamic_matches_onnxruntime(backend, tmp_path):
    onnx_matches_onnxruntime(_layer(8), (1, 8, 24, 32), [(2, 8, 13, 40), (1, 8, 5, 3)], tmp_path,
                             backend_op="cpca", backend=backend,
                             expected=official.cpca)


@pytest.mark.parametrize("make,error,match", [
    (lambda: CPCA(0), ValueError, r"in_channels must be .*, got 0"),
    (lambda: CPCA(64, 32), ValueError, r"out_channels=32 must equal in_channels=64"),
    (lambda: CPCA(64, 64, 0), ValueError, r"channelAttention_reduce must be .*, got 0"),
    (lambda: CPCA(4, 4, 8), ValueError, r"in_channels=4 // channelAttention_reduce=8 is 0"),
    (lambda: CPCA(64, 64, 2.0), TypeError, r"channelAttention_reduce must be "),
    (lambda: CPCA(8, backend="sdpa"), ValueError, r"backend for cpca must be None or one of"),
    (lambda: CPCAChannelAttention(8, 0), ValueError, r"internal_neurons must be .*, got 0"),
    (lambda: CPCA(8)(torch.randn(1, 4, 5, 5)), ValueError, r"CPCA expects a \(N, 8, H, W\) tensor"),
    (lambda: CPCA(8)(torch.randn(8, 5, 5)), ValueError, r"CPCA expects a \(N, 8, H, W\) tensor, got shape \(8, 5, 5\)"),
    (lambda: CPCA(8)(torch.ones(1, 8, 5, 5, dtype=torch.long)), TypeError, r"expects a floating-point input"),
])
def test_bad_configurations(make, error, match):
    with pytest.raises(error, match=match):
        make()
