"""HAB (HAT's hybrid attention block): key layout, both backends against a token-level restatement of the official
block over every H, W in 1..16 (padding and shifted-window masks), HAT's own rpi/mask interface, dtypes, ONNX,
errors."""

import pytest
import torch
import torch.nn.functional as F

from attention_checks import (assert_close, assert_key_layout, deterministic_twice, onnx_matches_onnxruntime,
                              outputs_and_grads, param_names, run)
from attention_checks import single_thread  # noqa: F401  (fixture)
from yoloattn import use_backend
from yoloattn.nn.hat import CAB, HAB, HATChannelAttention, WindowAttention

pytestmark = pytest.mark.usefixtures("single_thread")
BACKENDS = ["sdpa", "reference"]


def _region(t, n, ws, ss):
    """HAT's three bands of the shifted map: [0, n-ws) -> 0, [n-ws, n-ss) -> 1, [n-ss, n) -> 2."""
    if ss == 0:
        return torch.zeros_like(t)
    return torch.where(t < n - ws, 0, torch.where(t < n - ss, 1, 2))


def official_hab(m, x):
    """The HAB forward on an (N, H, W, C) map, at token level: every real token attends to the real tokens of its
    window in the padded, cyclically shifted map (bias from HAT's table, -100 between shifted bands); CAB and
    the MLP as HAT's code."""
    b, h, w, c = x.shape
    ws, ss, nh = m.window_size, m.shift_size, m.num_heads
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    xn = F.layer_norm(x, (c,), m.norm1.weight, m.norm1.bias, m.norm1.eps)

    cab = m.conv_block.cab
    z = F.conv2d(xn.permute(0, 3, 1, 2), cab[0].weight, cab[0].bias, padding=1)
    z = F.conv2d(F.gelu(z), cab[2].weight, cab[2].bias, padding=1)
    ca = cab[3].attention
    y = F.adaptive_avg_pool2d(z, 1)
    y = torch.sigmoid(F.conv2d(F.relu(F.conv2d(y, ca[1].weight, ca[1].bias)), ca[3].weight, ca[3].bias))
    conv_x = (z * y).permute(0, 2, 3, 1).reshape(b, h * w, c)

    rows = (torch.arange(h) - ss) % hp  # where each row sits after padding and the roll by -ss
    cols = (torch.arange(w) - ss) % wp
    yy, xx = rows[:, None].expand(h, w).flatten(), cols[None, :].expand(h, w).flatten()
    window = (yy // ws) * (wp // ws) + xx // ws
    label = _region(yy, hp, ws, ss) * 3 + _region(xx, wp, ws, ss)
    iy, ix = yy % ws, xx % ws
    index = (iy[:, None] - iy[None, :] + ws - 1) * (2 * ws - 1) + (ix[:, None] - ix[None, :] + ws - 1)
    bias = m.attn.relative_position_bias_table[index].permute(2, 0, 1)  # (heads, L, L)
    same_window = window[:, None] == window[None, :]
    mask = torch.where(same_window, torch.where(label[:, None] == label[None, :], 0.0, -100.0), float("-inf"))
    qkv = F.linear(xn.reshape(b, h * w, c), m.attn.qkv.weight, m.attn.qkv.bias)
    q, k, v = qkv.reshape(b, h * w, 3, nh, c // nh).permute(2, 0, 3, 1, 4)
    attn = ((q * m.attn.scale) @ k.transpose(-2, -1) + bias + mask.to(x.dtype)).softmax(-1)
    out = (attn @ v).transpose(1, 2).reshape(b, h * w, c)
    attn_x = F.linear(out, m.attn.proj.weight, m.attn.proj.bias)

    t = x.reshape(b, h * w, c) + attn_x + conv_x * m.conv_scale
    tn = F.layer_norm(t, (c,), m.norm2.weight, m.norm2.bias, m.norm2.eps)
    t = t + F.linear(F.gelu(F.linear(tn, m.mlp.fc1.weight, m.mlp.fc1.bias)), m.mlp.fc2.weight, m.mlp.fc2.bias)
    return t.reshape(b, h, w, c)


def _layer(dtype=torch.float64, **kw):
    cfg = dict(dim=8, input_resolution=None, num_heads=2, window_size=4, shift_size=2, compress_ratio=2,
               squeeze_factor=4, mlp_ratio=2.0)
    m = HAB(**{**cfg, **kw}).to(dtype)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        m.attn.relative_position_bias_table.normal_(0, 1, generator=generator)
        m.attn.qkv.weight.mul_(3.0)
        m.conv_block.cab[3].attention[3].bias.normal_(0, 1, generator=generator)
    return m


def _official(m, x):
    return outputs_and_grads(lambda t: official_hab(m, t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), x,
                             list(m.parameters()))


def test_official_key_layout():
    m = HAB(64, (20, 20), 4, window_size=7)
    assert_key_layout(m, [
        ("norm1.weight", (64,)), ("norm1.bias", (64,)), ("attn.relative_position_bias_table", (169, 4)),
        ("attn.qkv.weight", (192, 64)), ("attn.qkv.bias", (192,)), ("attn.proj.weight", (64, 64)),
        ("attn.proj.bias", (64,)), ("conv_block.cab.0.weight", (21, 64, 3, 3)), ("conv_block.cab.0.bias", (21,)),
        ("conv_block.cab.2.weight", (64, 21, 3, 3)), ("conv_block.cab.2.bias", (64,)),
        ("conv_block.cab.3.attention.1.weight", (2, 64, 1, 1)), ("conv_block.cab.3.attention.1.bias", (2,)),
        ("conv_block.cab.3.attention.3.weight", (64, 2, 1, 1)), ("conv_block.cab.3.attention.3.bias", (64,)),
        ("norm2.weight", (64,)), ("norm2.bias", (64,)), ("mlp.fc1.weight", (256, 64)), ("mlp.fc1.bias", (256,)),
        ("mlp.fc2.weight", (64, 256)), ("mlp.fc2.bias", (64,))])
    assert sum(p.numel() for p in m.parameters()) == 75259
    assert HAB(96, None, 6, window_size=16).attn.relative_position_bias_table.shape == (961, 6)
    assert list(HAB(64, None, 4, 7).state_dict()) == list(m.state_dict())  # input_resolution is not needed


def test_input_resolution_as_official():
    m = HAB(64, (7, 7), 4, window_size=7, shift_size=3)  # min(resolution) <= window: no shift, whole map
    assert (m.window_size, m.shift_size) == (7, 0)
    m = HAB(64, (5, 9), 4, window_size=7, shift_size=3)
    assert (m.window_size, m.shift_size) == (5, 0) and m.attn.relative_position_bias_table.shape == (81, 4)
    assert (HAB(64, None, 4, 7, 3).window_size, HAB(64, None, 4, 7, 3).shift_size) == (7, 3)
    assert HAB(64).num_heads == 2 and HAB(96).num_heads == 3 and HAB(100).num_heads == 2


def test_every_size_1_to_16_matches_official_block():
    """Window 4, shift 2: padding to whole windows, masks for the padded size, crop."""
    m = _layer()
    names = param_names(m)
    generator = torch.Generator().manual_seed(0)
    for h in range(1, 17):
        for w in range(1, 17):
            x = torch.randn(2, 8, h, w, dtype=torch.float64, generator=generator)
            want = _official(m, x)
            for backend in BACKENDS:
                assert_close(run(m, x, "hab", backend), want, atol=1e-10, names=names)


OPTIONS = {
    "no_shift": dict(shift_size=0),
    "window3_shift1": dict(window_size=3, shift_size=1),
    "window5_shift3_scale": dict(window_size=5, shift_size=3, qk_scale=0.7, qkv_bias=False, conv_scale=0.5),
    "one_head": dict(num_heads=1, window_size=2, shift_size=1),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_options_match_official_block(name):
    m = _layer(**OPTIONS[name])
    for shape in [(2, 10, 6), (3, 7, 11), (2, 1, 5)]:
        b, h, w = shape
        x = torch.randn(b, 8, h, w, dtype=torch.float64)
        want = _official(m, x)
        for backend in BACKENDS:
            assert_close(run(m, x, "hab", backend), want, atol=1e-10, names=param_names(m))


def _hat_mask(h, w, ws, ss):
    """HAT's calculate_mask: band labels of the (h, w) map, -100 between different labels inside a window."""
    rows, cols = _region(torch.arange(h), h, ws, ss), _region(torch.arange(w), w, ws, ss)
    labels = (rows[:, None] * 3 + cols[None, :]).reshape(h // ws, ws, w // ws, ws).permute(0, 2, 1, 3)
    labels = labels.reshape(-1, ws * ws)
    return torch.where(labels[:, None, :] != labels[:, :, None], -100.0, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hat_token_interface_with_hat_rpi_and_mask(backend):
    m = _layer(dtype=torch.float32, window_size=4, shift_size=2)
    h, w = 8, 12
    x = torch.randn(2, h * w, 8)
    ys, xs = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    rpi = (ys[:, None] - ys[None, :] + 3) * 7 + (xs[:, None] - xs[None, :] + 3)
    assert torch.equal(rpi, m.attn.relative_position_index)
    want = official_hab(m, x.reshape(2, h, w, 8)).reshape(2, h * w, 8)
    with use_backend(hab=backend):
        for args in ((rpi, _hat_mask(h, w, 4, 2)), (rpi, None), (None, None)):
            torch.testing.assert_close(m(x, (h, w), *args), want, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match=r"attn_mask of shape \(6, 16, 16\) does not fit 9x12 with window 4"):
            m(torch.randn(2, 9 * 12, 8), (9, 12), rpi, _hat_mask(h, w, 4, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_attention_alone(backend):
    attn = WindowAttention(8, 4, 2).double()
    x = torch.randn(6, 16, 8, dtype=torch.float64)
    mask = _hat_mask(8, 12, 4, 2).double()
    with use_backend(hab=backend):
        y = attn(x, mask=mask)
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(6, 16, 3, 2, 4).permute(2, 0, 3, 1, 4)
    bias = attn.relative_position_bias_table[attn.relative_position_index].permute(2, 0, 1)
    logits = (q * attn.scale) @ k.transpose(-2, -1) + bias + mask[:, None]
    want = F.linear((logits.softmax(-1) @ v).transpose(1, 2).reshape(6, 16, 8), attn.proj.weight, attn.proj.bias)
    torch.testing.assert_close(y, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shift", [0, 2])
def test_sdpa_in_chunks_of_windows(shift, monkeypatch):
    """Large maps run qkv, attention and projection over chunks of windows (bounded memory); same result."""
    import yoloattn.nn.hat as hat

    m = _layer(shift_size=shift)
    x = torch.randn(2, 8, 13, 16, dtype=torch.float64)
    want = _official(m, x)
    monkeypatch.setattr(hat, "_CHUNK", 3 * 2 * 16 * 32)  # 3 of the 16 windows per chunk (images·n·heads·n each)
    assert_close(run(m, x, "hab", "sdpa"), want, atol=1e-10, names=param_names(m))


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_and_non_contiguous(backend):
    m = _layer(dtype=torch.float32)
    x = torch.randn(2, 8, 9, 10)
    want = _official(m, x)
    with use_backend(hab=backend):
        transposed = x.transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous strides
        for variant in (x.contiguous(memory_format=torch.channels_last), transposed):
            got = outputs_and_grads(m, variant, list(m.parameters()))
            assert_close(got, want, atol=1e-5, names=param_names(m))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    m = _layer(window_size=2, shift_size=1)
    x = torch.randn(1, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    with use_backend(hab=backend):
        assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_module_and_autocast(backend, dtype):
    """A shifted block of a half model crashed in the official code (fp32 mask promoted the logits)."""
    m = HAB(32, None, 2, window_size=4, shift_size=2)
    x = torch.randn(2, 32, 9, 7)
    with use_backend(hab=backend):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(m(x).float()).all()
        y = m.to(dtype)(x.to(dtype))
        assert y.dtype == dtype and torch.isfinite(y.float()).all()
        torch.testing.assert_close(y.float(), m.float()(x), atol=0.1, rtol=0.05)


def test_dropout_and_drop_path_train_eval():
    m = HAB(32, None, 2, window_size=4, shift_size=2, drop=0.2, attn_drop=0.3, drop_path=0.5)
    plain = HAB(32, None, 2, window_size=4, shift_size=2)
    plain.load_state_dict(m.state_dict())
    x = torch.randn(4, 32, 8, 8)
    for backend in BACKENDS:
        with use_backend(hab=backend):
            torch.testing.assert_close(m.eval()(x), plain.eval()(x))
            y = m.train()(x)
            assert torch.isfinite(y).all() and not torch.allclose(y, plain(x))


def test_deterministic_mode():
    m = _layer(dtype=torch.float32)
    x = torch.randn(2, 8, 9, 7)

    def once():
        y, grads = run(m, x, "hab", "sdpa")
        return [y, *grads]

    deterministic_twice(once)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:Constant folding")
@pytest.mark.parametrize("backend", BACKENDS)
def test_onnx_dynamic_matches_onnxruntime(backend, tmp_path):
    m = HAB(32, None, 2, window_size=4, shift_size=2)
    onnx_matches_onnxruntime(m, (1, 32, 12, 10), [(2, 32, 7, 9), (1, 32, 1, 2), (1, 32, 8, 8)], tmp_path,
                             backend_op="hab", backend=backend)


def test_parts_as_official():
    ca = HATChannelAttention(16, 4)
    x = torch.randn(2, 16, 5, 3)
    a = ca.attention
    want = x * torch.sigmoid(a[3](torch.relu(a[1](F.adaptive_avg_pool2d(x, 1)))))
    torch.testing.assert_close(ca(x), want)
    assert [k for k in CAB(16, 2, 4).state_dict()][0] == "cab.0.weight"


@pytest.mark.parametrize("kw,error,match", [
    (dict(dim=16), ValueError, r"num_feat=16 must be >= squeeze_factor=30"),
    (dict(dim=64, num_heads=3), ValueError, r"dim=64 must be divisible by num_heads=3"),
    (dict(dim=64, window_size=4, shift_size=4), ValueError, r"shift_size must be in \[0, window_size=4\), got 4"),
    (dict(dim=64, shift_size=-1), ValueError, r"shift_size must be in \[0, window_size=7\), got -1"),
    (dict(dim=64, compress_ratio=65, squeeze_factor=2), ValueError, r"num_feat=64 must be >= compress_ratio=65"),
    (dict(dim=64, window_size=0), ValueError, r"window_size must be a positive integer, got 0"),
    (dict(dim=64, input_resolution=(8,)), TypeError, r"input_resolution must be a positive integer or a pair"),
    (dict(dim=64, drop_path=1.0), ValueError, r"drop_path must be in \[0.0, 1.0\)"),
    (dict(dim=64, backend="fused"), ValueError, r"backend for hab must be None or one of"),
])
def test_bad_config(kw, error, match):
    with pytest.raises(error, match=match):
        HAB(**kw)


def test_bad_input():
    m = HAB(32, None, 2, window_size=4)
    with pytest.raises(ValueError, match=r"HAB expects a \(N, 32, H, W\) tensor, got shape \(1, 16, 4, 4\)"):
        m(torch.randn(1, 16, 4, 4))
    with pytest.raises(ValueError, match=r"HAB on tokens \(N, H·W, C\) needs x_size=\(H, W\)"):
        m(torch.randn(1, 16, 32))
    with pytest.raises(ValueError, match=r"x_size, rpi_sa and attn_mask are for HAT's token input"):
        m(torch.randn(1, 32, 4, 4), (4, 4))
