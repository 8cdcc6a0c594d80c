"""MSCA (SegNeXt): official keys, official math on outputs and gradients for every backend, layouts, ONNX, errors."""

import pytest
import torch

import official_conv_attentions as official
from attention_checks import onnx_matches_onnxruntime
from official_conv_attentions import one_thread  # noqa: F401 (autouse fixture)
from yoloattn.nn.backends import use_backend
from yoloattn.nn.msca import MSCA, MSCA_OP, AttentionModule, MSCAAttention, MSCASpatialAttention, depthwise, strip_pairs

BACKENDS = list(MSCA_OP.backends)
SHAPES = [(2, 1, 1), (2, 1, 7), (2, 6, 1), (1, 3, 5), (2, 13, 9), (1, 22, 25), (1, 33, 40)]  # 33x40: > 1024 pixels
LAYOUTS = ("contiguous", "channels_last", "transposed")

LAYOUT_64 = [
    ("conv0.weight", (64, 1, 5, 5)), ("conv0.bias", (64,)),
    ("conv0_1.weight", (64, 1, 1, 7)), ("conv0_1.bias", (64,)),
    ("conv0_2.weight", (64, 1, 7, 1)), ("conv0_2.bias", (64,)),
    ("conv1_1.weight", (64, 1, 1, 11)), ("conv1_1.bias", (64,)),
    ("conv1_2.weight", (64, 1, 11, 1)), ("conv1_2.bias", (64,)),
    ("conv2_1.weight", (64, 1, 1, 21)), ("conv2_1.bias", (64,)),
    ("conv2_2.weight", (64, 1, 21, 1)), ("conv2_2.bias", (64,)),
    ("conv3.weight", (64, 64, 1, 1)), ("conv3.bias", (64,)),
]
SPATIAL_LAYOUT_64 = ([("proj_1.weight", (64, 64, 1, 1)), ("proj_1.bias", (64,))]
                     + [("spatial_gating_unit." + k, s) for k, s in LAYOUT_64]
                     + [("proj_2.weight", (64, 64, 1, 1)), ("proj_2.bias", (64,))])


def _input(n, c, h, w, layout, dtype=torch.float32):
    if layout == "transposed":  # a non-contiguous view that is not channels-last either
        return torch.randn(n, c, w, h, dtype=dtype).transpose(2, 3)
    x = torch.randn(n, c, h, w, dtype=dtype)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def _layer(cls, c=8, **kw):
    m = cls(c, **kw)
    with torch.no_grad():  # non-default values everywhere (biases are small at PyTorch's init)
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def _run_backend(m, x, backend):
    with use_backend(msca=backend):
        return official.run(lambda mod, t: mod(t), m, x)


@pytest.mark.parametrize("cls,layout", [(MSCA, LAYOUT_64), (MSCASpatialAttention, SPATIAL_LAYOUT_64)])
def test_state_dict_layout_and_strict_load(cls, layout):
    m = cls(64)
    assert [(k, tuple(v.shape)) for k, v in m.state_dict().items()] == layout
    state = {k: torch.randn(s) for k, s in layout}
    m.load_state_dict(state, strict=True)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in state.items())
    assert sum(p.numel() for p in m.parameters()) == (11_200 if cls is MSCA else 19_520)


def test_aliases():
    assert AttentionModule is MSCA and MSCAAttention is MSCA
    assert MSCASpatialAttention(8).d_model == 8


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("cls", [MSCA, MSCASpatialAttention])
def test_matches_official_outputs_and_gradients(cls, shape, backend):
    m = _layer(cls)
    restated = official.msca if cls is MSCA else official.msca_spatial
    n, h, w = shape
    for layout in LAYOUTS:
        x = _input(n, 8, h, w, layout)
        official.assert_same(_run_backend(m, x, backend), official.run(restated, m, x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_kernels_match_official(backend):
    kw = dict(kernel_sizes=[3, [1, 5], (1, 9), [1, 3], [1, 1]], paddings=[1, [0, 2], (0, 4), [0, 1], [0, 0]])
    m = _layer(MSCA, **kw)
    assert m.n_branches == 4 and m.conv1_2.kernel_size == (9, 1) and m.conv1_2.padding == (4, 0)
    x = _input(2, 8, 11, 7, "channels_last")
    official.assert_same(_run_backend(m, x, backend), official.run(official.msca, m, x))
    single = _layer(MSCA, kernel_sizes=[(3, 5)], paddings=[(1, 2)])  # no strip branch at all
    official.assert_same(_run_backend(single, x, backend), official.run(official.msca, single, x))


@pytest.mark.parametrize("kernel", [(5, 5), (1, 7), (7, 1), (1, 21), (21, 1), (3, 5), (1, 1)], ids=str)
def test_depthwise_helper_gradients(kernel):
    """The custom weight gradient: GEMM form (maps up to 1024 pixels, and 1xk kernels), oneDNN k x 1, columns."""
    for shape in [(2, 6, 9, 13), (1, 6, 1, 1), (2, 6, 1, 7), (2, 6, 40, 36), (1, 6, 3, 35)]:
        for layout in ("contiguous", "channels_last"):
            conv = torch.nn.Conv2d(6, 6, kernel, padding=(kernel[0] // 2, kernel[1] // 2), groups=6).double()
            x = _input(*shape, layout, dtype=torch.float64).requires_grad_()
            r = torch.randn(shape, dtype=torch.float64)
            mine = torch.autograd.grad((depthwise(conv, x) * r).sum(), [x, conv.weight, conv.bias])
            plain = torch.autograd.grad((conv(x) * r).sum(), [x, conv.weight, conv.bias])
            for u, v in zip(mine, plain):
                torch.testing.assert_close(u, v, atol=1e-10, rtol=1e-10)


def test_strip_pairs_match_plain_convs():
    pairs = [(torch.nn.Conv2d(4, 4, (1, k), padding=(0, k // 2), groups=4).double(),
              torch.nn.Conv2d(4, 4, (k, 1), padding=(k // 2, 0), groups=4).double()) for k in (3, 7, 21)]
    for shape in [(2, 4, 5, 9), (1, 4, 40, 33)]:
        x = _input(*shape, "channels_last", dtype=torch.float64).requires_grad_()
        params = [p for pair in pairs for conv in pair for p in conv.parameters()]
        mine = strip_pairs(pairs, x)
        plain = [v(h(x)) for h, v in pairs]
        r = [torch.randn(shape, dtype=torch.float64) for _ in pairs]
        g_mine = torch.autograd.grad(sum((t * w).sum() for t, w in zip(mine, r)), [x, *params])
        g_plain = torch.autograd.grad(sum((t * w).sum() for t, w in zip(plain, r)), [x, *params])
        for u, v in zip(mine + list(g_mine), plain + list(g_plain)):
            torch.testing.assert_close(u, v, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [MSCA, MSCASpatialAttention])
def test_gradcheck_float64(cls, backend):
    m = _layer(cls, 3).double()
    x = torch.randn(1, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    with use_backend(msca=backend):
        assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_train_eval_deterministic(backend):
    m = _layer(MSCASpatialAttention, 16)
    x = torch.randn(2, 16, 12, 10) * 4
    official.check_bf16_mode_free_deterministic(m, x, "msca", backend)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [MSCA, MSCASpatialAttention])
def test_onnx_dynamic_matches_onnxruntime(cls, backend, tmp_path):
    onnx_matches_onnxruntime(_layer(cls, 8), (1, 8, 24, 32), [(2, 8, 13, 40), (1, 8, 5, 3)], tmp_path,
                             backend_op="msca", backend=backend,
                             expected=official.msca if cls is MSCA else official.msca_spatial)


@pytest.mark.parametrize("make,error,match", [
    (lambda: MSCA(0), ValueError, r"dim must be .*, got 0"),
    (lambda: MSCA(8.0), TypeError, r"dim must be .*, got 8.0"),
    (lambda: MSCA(8, kernel_sizes=[4, [1, 7]], paddings=[2, [0, 3]]), ValueError, r"kernel_sizes\[0\] must be odd"),
    (lambda: MSCA(8, kernel_sizes=[5, [1, 7]], paddings=[2, [0, 2]]), ValueError,
     r"paddings\[1\] must be \(0, 3\) for kernel \(1, 7\)"),
    (lambda: MSCA(8, kernel_sizes=[5, [1, 7]], paddings=[2]), ValueError, r"the same length, got 2 and 1"),
    (lambda: MSCA(8, kernel_sizes=[5, [1, 7, 3]], paddings=[2, [0, 3]]), TypeError, r"kernel_sizes\[1\] must be"),
    (lambda: MSCA(8, kernel_sizes=[], paddings=[]), TypeError, r"non-empty lists"),
    (lambda: MSCA(8, backend="sdpa"), ValueError, r"backend for msca must be None or one of \('auto', 'fused', "
                                                   r"'reference'\), got 'sdpa'"),
    (lambda: MSCASpatialAttention(-1), ValueError, r"d_model must be .*, got -1"),
    (lambda: MSCA(8)(torch.randn(1, 4, 5, 5)), ValueError, r"MSCA expects a \(N, 8, H, W\) tensor, got shape "
                                                           r"\(1, 4, 5, 5\)"),
    (lambda: MSCA(8)(torch.randn(1, 8, 0, 5)), ValueError, r"needs N, H and W >= 1"),
    (lambda: MSCA(8)(torch.randn(1, 8, 5, 5, dtype=torch.float64)), TypeError, r"float32 weights but got a "
                                                                                r"torch.float64 input"),
])
def test_bad_configurations(make, error, match):
    with pytest.raises(error, match=match):
        make()
