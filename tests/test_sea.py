"""Sea-Attention (SeaFormer): official keys (BN buffers too), official math in train and eval for every backend."""

import pytest
import torch
import torch.nn as nn

import official_conv_attentions as official
from attention_checks import onnx_matches_onnxruntime
from official_conv_attentions import one_thread  # noqa: F401 (autouse fixture)
from yoloattn.nn.backends import BackendUnavailableError, use_backend
from yoloattn.nn.sea import SEA_ATTENTION, Conv2d_BN, Sea_Attention, SeaAttention, h_sigmoid

BACKENDS = list(SEA_ATTENTION.backends)
EVAL_SHAPES = [(2, 1, 1), (1, 1, 7), (1, 6, 1), (2, 16, 16), (2, 13, 20), (1, 3, 17)]
TRAIN_SHAPES = [(2, 1, 7), (1, 5, 3), (2, 16, 16), (2, 13, 20)]
LAYOUTS = ("contiguous", "channels_last", "transposed")
CONFIGS = [dict(dim=8, key_dim=4, num_heads=2), dict(dim=6, key_dim=3, num_heads=1, attn_ratio=1.5),
           dict(dim=8, key_dim=2, num_heads=3, attn_ratio=4)]  # the segmentation code crashed on attn_ratio=4


def _bn_keys(prefix, c):
    return [(f"{prefix}.bn.{k}", (c,)) for k in ("weight", "bias", "running_mean", "running_var")] + [
        (f"{prefix}.bn.num_batches_tracked", ())]


# Sea_Attention(64, key_dim=16, num_heads=4, attn_ratio=2, activation=nn.ReLU6): nh_kd 64, dh 128, dwconv 256
LAYOUT_64 = (
    [("to_q.c.weight", (64, 64, 1, 1))] + _bn_keys("to_q", 64)
    + [("to_k.c.weight", (64, 64, 1, 1))] + _bn_keys("to_k", 64)
    + [("to_v.c.weight", (128, 64, 1, 1))] + _bn_keys("to_v", 128)
    + [("proj.1.c.weight", (64, 128, 1, 1))] + _bn_keys("proj.1", 64)
    + [("proj_encode_row.1.c.weight", (128, 128, 1, 1))] + _bn_keys("proj_encode_row.1", 128)
    + [("pos_emb_rowq.pos_embed", (1, 64, 16)), ("pos_emb_rowk.pos_embed", (1, 64, 16))]
    + [("proj_encode_column.1.c.weight", (128, 128, 1, 1))] + _bn_keys("proj_encode_column.1", 128)
    + [("pos_emb_columnq.pos_embed", (1, 64, 16)), ("pos_emb_columnk.pos_embed", (1, 64, 16))]
    + [("dwconv.c.weight", (256, 1, 3, 3))] + _bn_keys("dwconv", 256)
    + [("pwconv.c.weight", (64, 256, 1, 1))] + _bn_keys("pwconv", 64)
)


def _input(n, c, h, w, layout):
    if layout == "transposed":  # a non-contiguous view that is not channels-last either
        return torch.randn(n, c, w, h).transpose(2, 3)
    x = torch.randn(n, c, h, w)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def _layer(**kw):
    m = SeaAttention(**kw)
    with torch.no_grad():  # BN γ starts at 0 in three places: make every path carry signal
        for name, p in m.named_parameters():
            if name.endswith("bn.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.4)
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.normal_(0, 0.3)
                bn.running_var.uniform_(0.5, 2.0)
    return m


def _run_backend(m, x, backend):
    with use_backend(sea_attention=backend):
        return official.run(lambda mod, t: mod(t), m, x)


def test_state_dict_layout_and_strict_load():
    m = Sea_Attention(64, 16, 4, attn_ratio=2, activation=nn.ReLU6)
    assert [(k, tuple(v.shape)) for k, v in m.state_dict().items()] == LAYOUT_64
    state = {k: (torch.tensor(7) if k.endswith("num_batches_tracked") else torch.rand(s)) for k, s in LAYOUT_64}
    m.load_state_dict(state, strict=True)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in state.items())
    assert sum(p.numel() for p in m.parameters()) == 81_920
    assert Sea_Attention is SeaAttention
    # the default activation=None is nn.ReLU6 (the official default crashed); separate instances
    m = SeaAttention(64, 16, 4)
    assert [type(a) for a in (m.proj[0], m.proj_encode_row[0], m.proj_encode_column[0], m.act)] == [nn.ReLU6] * 4
    assert len({id(a) for a in (m.proj[0], m.proj_encode_row[0], m.proj_encode_column[0], m.act)}) == 4
    assert (m.nh_kd, m.d, m.dh, m.scale) == (64, 32, 128, 16**-0.5)
    assert type(m.to_q.bn) is nn.BatchNorm2d and isinstance(m.sigmoid, h_sigmoid)


def test_official_init_gates_at_one_half():
    """BN γ = 0 after the axial branch: at initialisation the output is h_sigmoid(0) · detail = detail / 2."""
    m = SeaAttention(8, 4, 2).eval()
    for pair in (m.proj[1], m.proj_encode_row[1], m.proj_encode_column[1]):
        assert torch.equal(pair.bn.weight, torch.zeros(pair.bn.num_features))
    x = torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        detail = m.pwconv(m.act(m.dwconv(torch.cat([m.to_q(x), m.to_k(x), m.to_v(x)], 1))))
        for backend in BACKENDS:
            with use_backend(sea_attention=backend):
                torch.testing.assert_close(m(x), detail * 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_matches_official_outputs_gradients_and_statistics(train, backend):
    """Eval in fp32; training in fp64: BatchNorm over a handful of values amplifies fp32 rounding enough to flip
    a ReLU6 input sitting within 1e-5 of its kink, which changes gradients by O(1) there (seen at 2x13x20)."""
    dtype = torch.float64 if train else torch.float32
    tolerance = dict(atol=1e-9, rtol=1e-8, grad_rtol=1e-6) if train else {}  # BN over 2 values: ill-conditioned
    for config in CONFIGS:
        m = _layer(**config).train(train).to(dtype)
        for n, h, w in TRAIN_SHAPES if train else EVAL_SHAPES:
            for layout in LAYOUTS:
                x = _input(n, config["dim"], h, w, layout).to(dtype)
                official.assert_same(_run_backend(m, x, backend), official.run(official.sea, m, x), **tolerance)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_updates_running_statistics_like_the_official_module(backend):
    m = _layer(dim=8, key_dim=4, num_heads=2).train()
    x = torch.randn(2, 8, 6, 5)
    with use_backend(sea_attention=backend):
        _, _, buffers = official.run(lambda mod, t: mod(t), m, x)
    _, _, expected = official.run(official.sea, m, x)
    names = [n for n, _ in m.named_buffers()]
    for name, u, v in zip(names, buffers, expected):
        torch.testing.assert_close(u, v, atol=1e-6, rtol=1e-5, msg=name)
    tracked = [t for name, t in zip(names, buffers) if name.endswith("num_batches_tracked")]
    assert len(tracked) == 8 and all(int(t) == 1 for t in tracked)


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_activation(backend):
    m = _layer(dim=8, key_dim=4, num_heads=2, activation=nn.GELU).eval()
    assert type(m.act) is nn.GELU
    x = torch.randn(2, 8, 7, 9)
    with use_backend(sea_attention="reference"):
        expected = official.run(lambda mod, t: mod(t), m, x)
    official.assert_same(_run_backend(m, x, backend), expected)


def test_sync_batch_norm_keys_and_fallback():
    m = _layer(dim=8, key_dim=4, num_heads=2, norm_cfg=dict(type="SyncBN", requires_grad=True)).eval()
    assert type(m.to_q.bn) is nn.SyncBatchNorm
    assert list(m.state_dict()) == list(SeaAttention(8, 4, 2).state_dict())
    x = torch.randn(1, 8, 5, 6)
    with torch.no_grad():
        with use_backend(sea_attention="reference"):
            expected = m(x)
        torch.testing.assert_close(m(x), expected, atol=0, rtol=0)  # 'auto' falls back to the reference
        with use_backend(sea_attention="fused"), pytest.raises(BackendUnavailableError, match="SyncBatchNorm"):
            m(x)
    frozen = SeaAttention(8, 4, 2, norm_cfg=dict(type="BN2d", requires_grad=False, eps=1e-3, momentum=0.03))
    assert frozen.to_v.bn.eps == 1e-3 and frozen.to_v.bn.momentum == 0.03
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if ".bn." in n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("shape", [(3, 4), (5, 1)], ids=["3x4", "5x1"])
def test_gradcheck_float64(shape, train, backend):
    """5x1: without the gradient guard in sea.py, PyTorch's CPU BatchNorm backward gets the official math wrong."""
    m = _layer(dim=4, key_dim=2, num_heads=2, attn_ratio=1).double().train(train)
    x = torch.randn(2, 4, *shape, dtype=torch.float64, requires_grad=True)
    with use_backend(sea_attention=backend):
        assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_train_eval_deterministic(backend):
    m = _layer(dim=16, key_dim=8, num_heads=2)
    x = torch.randn(2, 16, 12, 10) * 4
    with use_backend(sea_attention=backend):
        for train in (True, False):
            m.train(train)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = m(x)
            assert torch.isfinite(y.float()).all()
        y_bf16 = m.to(torch.bfloat16).eval()(x.bfloat16())
        assert y_bf16.dtype == torch.bfloat16 and torch.isfinite(y_bf16.float()).all()
        m.float()
        assert not torch.allclose(m.train()(x), m.eval()(x))  # BatchNorm: batch vs running statistics
        torch.use_deterministic_algorithms(True)
        try:
            m.train()(x.requires_grad_()).sum().backward()
        finally:
            torch.use_deterministic_algorithms(False)
        assert torch.isfinite(x.grad).all()


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_onnx_dynamic_matches_onnxruntime(backend, tmp_path):
    onnx_matches_onnxruntime(_layer(dim=8, key_dim=4, num_heads=2), (1, 8, 16, 16), [(2, 8, 13, 40), (1, 8, 5, 3)],
                             tmp_path,
                             backend_op="sea_attention", backend=backend,
                             expected=official.sea)


@pytest.mark.parametrize("make,error,match", [
    (lambda: SeaAttention(8, 0, 2), ValueError, r"key_dim must be"),
    (lambda: SeaAttention(8, 4, 0), ValueError, r"num_heads must be"),
    (lambda: SeaAttention(8, 4, 2, attn_ratio=0.1), ValueError, r"attn_ratio \* key_dim must be at least 1"),
    (lambda: SeaAttention(8, 4, 2, attn_ratio="2"), TypeError, r"attn_ratio must be a number"),
    (lambda: SeaAttention(8, 4, 2, activation="relu"), TypeError, r"activation must be an nn.Module class"),
    (lambda: SeaAttention(8, 4, 2, norm_cfg=dict(type="GN")), ValueError, r"norm_cfg type must be one of "
                                                                          r"\('BN', 'BN2d', 'SyncBN'\), got 'GN'"),
    (lambda: SeaAttention(8, 4, 2, norm_cfg=dict(type="BN", num_groups=2)), ValueError, r"got also \['num_groups'\]"),
    (lambda: SeaAttention(8, 4, 2, backend="onnx"), ValueError, r"backend for sea_attention must be None"),
    (lambda: Conv2d_BN(8, 8, bias=1), TypeError, r"bias must be True or False"),
    (lambda: SeaAttention(8, 4, 2).train()(torch.randn(1, 8, 1, 6)), ValueError,
     r"SeaAttention in training mode needs N·H > 1 .* got an input of shape \(1, 8, 1, 6\)"),
    (lambda: SeaAttention(8, 4, 2).train()(torch.randn(1, 8, 5, 1)), ValueError, r"needs N·W > 1 .*\(1, 8, 5, 1\)"),
    (lambda: SeaAttention(8, 4, 2)(torch.randn(1, 6, 5, 5)), ValueError, r"SeaAttention expects a \(N, 8, H, W\)"),
])
def test_bad_configurations(make, error, match):
    with pytest.raises(error, match=match):
        make()
