"""Test-only re-statements of the official forwards of EMA, CPCA, MSCA, PSA and Sea-Attention.

Each function reads a yoloattn module's parameters (and buffers) and recomputes the official
forward with plain functional ops in the official order (see /work/notes/spec_conv_attentions.md
for the official code's steps). They share nothing with the modules' code, so a module and its
re-statement agreeing means the module computes the official numbers.

Also: :func:`run` (outputs and gradients of a forward), :func:`assert_same` (compare two runs) and the
``one_thread`` fixture (imported by the test modules).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F


# -- EMA (YOLOonMe/EMA-attention-module) ------------------------------------------------------------------------
def ema(m, x):
    b, c, h, w = x.shape
    g = m.groups
    cg = c // g
    gx = x.reshape(b * g, cg, h, w)
    x_h = F.adaptive_avg_pool2d(gx, (h, 1))  # AdaptiveAvgPool2d((None, 1))
    x_w = F.adaptive_avg_pool2d(gx, (1, w)).permute(0, 1, 3, 2)
    hw = F.conv2d(torch.cat([x_h, x_w], dim=2), m.conv1x1.weight, m.conv1x1.bias)
    a_h, a_w = hw[:, :, :h], hw[:, :, h:]
    x1 = F.group_norm(gx * torch.sigmoid(a_h) * torch.sigmoid(a_w.permute(0, 1, 3, 2)), cg, m.gn.weight, m.gn.bias,
                      m.gn.eps)
    x2 = F.conv2d(gx, m.conv3x3.weight, m.conv3x3.bias, padding=1)
    s1 = torch.softmax(F.adaptive_avg_pool2d(x1, 1).reshape(b * g, 1, cg), dim=-1)
    s2 = torch.softmax(F.adaptive_avg_pool2d(x2, 1).reshape(b * g, 1, cg), dim=-1)
    weights = torch.bmm(s1, x2.reshape(b * g, cg, h * w)) + torch.bmm(s2, x1.reshape(b * g, cg, h * w))
    return (gx * torch.sigmoid(weights.reshape(b * g, 1, h, w))).reshape(b, c, h, w)


# -- CPCA (Cuthbert-Huang/CPCANet RepBlock) ---------------------------------------------------------------------
def _dw(conv, t):
    return F.conv2d(t, conv.weight, conv.bias, padding=conv.padding, groups=conv.groups)


def cpca(m, x, conv_weights=None):
    """``conv_weights``: three tensors standing in for ``m.conv.weight`` in its three uses (default: it, thrice)."""
    uses = iter(conv_weights or [m.conv.weight] * 3)
    conv = lambda t: F.conv2d(t, next(uses), m.conv.bias)  # noqa: E731 (the one conv, used three times)
    ca = m.ca

    def mlp(v):
        return torch.sigmoid(F.conv2d(F.relu(F.conv2d(v, ca.fc1.weight, ca.fc1.bias)), ca.fc2.weight, ca.fc2.bias))

    u = F.gelu(conv(x))
    u = (mlp(F.adaptive_avg_pool2d(u, 1)) + mlp(F.adaptive_max_pool2d(u, 1))) * u
    s0 = _dw(m.dconv5_5, u)
    s1 = _dw(m.dconv7_1, _dw(m.dconv1_7, s0))
    s2 = _dw(m.dconv11_1, _dw(m.dconv1_11, s0))
    s3 = _dw(m.dconv21_1, _dw(m.dconv1_21, s0))
    s = ((s1 + s2) + s3) + s0
    return conv(conv(s) * u)


# -- MSCA (Visual-Attention-Network/SegNeXt AttentionModule / SpatialAttention) -----------------------------------
def msca(m, x):
    a = _dw(m.conv0, x)
    total = a
    for i in range(m.n_branches):
        total = total + _dw(getattr(m, f"conv{i}_2"), _dw(getattr(m, f"conv{i}_1"), a))
    return F.conv2d(total, m.conv3.weight, m.conv3.bias) * x


def msca_spatial(m, x):
    y = F.gelu(F.conv2d(x, m.proj_1.weight, m.proj_1.bias))
    y = msca(m.spatial_gating_unit, y)
    return F.conv2d(y, m.proj_2.weight, m.proj_2.bias) + x


# -- PSA (DeLightCMU/PSA PSA_p / PSA_s) -------------------------------------------------------------------------
def _up(m, t):
    if m.mode == "p":
        return F.conv2d(t, m.conv_up.weight)
    c0, ln, _, c3 = m.conv_up
    t = F.conv2d(t, c0.weight, c0.bias)
    t = F.relu(F.layer_norm(t, ln.normalized_shape, ln.weight, ln.bias, ln.eps))
    return F.conv2d(t, c3.weight, c3.bias)


def _psa_channel_only(m, x):  # the official `spatial_pool`
    n, _, h, w = x.shape
    v = F.conv2d(x, m.conv_v_right.weight).reshape(n, -1, h * w)
    q = torch.softmax(F.conv2d(x, m.conv_q_right.weight).reshape(n, 1, h * w), dim=2)
    ctx = torch.bmm(v, q.transpose(1, 2)).unsqueeze(-1)
    return x * torch.sigmoid(_up(m, ctx))


def _psa_spatial_only(m, x):  # the official `channel_pool`
    n, _, h, w = x.shape
    g = F.adaptive_avg_pool2d(F.conv2d(x, m.conv_q_left.weight), 1).reshape(n, 1, -1)
    theta = F.conv2d(x, m.conv_v_left.weight).reshape(n, -1, h * w)
    if m.mode == "p":
        s = torch.softmax(torch.bmm(g, theta), dim=2)
    else:
        s = torch.bmm(g, torch.softmax(theta, dim=2))
    return x * torch.sigmoid(s.reshape(n, 1, h, w))


def psa(m, x):
    if m.mode == "p":
        return _psa_spatial_only(m, x) + _psa_channel_only(m, x)
    return _psa_spatial_only(m, _psa_channel_only(m, x))


# -- Sea-Attention (fudan-zvg/SeaFormer seaformer-cls Sea_Attention) ---------------------------------------------
def _conv_bn(pair, t):
    c, bn = pair.c, pair.bn
    t = F.conv2d(t, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
    t = F.batch_norm(t, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training, bn.momentum, bn.eps)
    if t.requires_grad:  # PyTorch's CPU BatchNorm backward mishandles some W = 1 gradient layouts (see sea.py)
        t.register_hook(lambda g: None if g is None else g.contiguous())
    return t


def sea(m, x):
    """Updates ``m``'s BatchNorm statistics in training mode, as the official module would."""
    if any(bn.training for bn in m.modules() if isinstance(bn, torch.nn.BatchNorm2d)):
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.num_batches_tracked.add_(1)
    b, _, h, w = x.shape
    relu6 = lambda t: F.hardtanh(t, 0.0, 6.0)  # noqa: E731 (the official activation, nn.ReLU6)
    q, k, v = _conv_bn(m.to_q, x), _conv_bn(m.to_k, x), _conv_bn(m.to_v, x)
    qkv = _conv_bn(m.pwconv, relu6(_conv_bn(m.dwconv, torch.cat([q, k, v], dim=1))))

    def axis(t_q, t_k, t_v, n, pos_q, pos_k, encode, shape):
        pq = F.interpolate(pos_q.pos_embed, size=n, mode="linear", align_corners=False)
        pk = F.interpolate(pos_k.pos_embed, size=n, mode="linear", align_corners=False)
        qa = (t_q + pq).reshape(b, m.num_heads, -1, n).permute(0, 1, 3, 2)
        ka = (t_k + pk).reshape(b, m.num_heads, -1, n)
        va = t_v.reshape(b, m.num_heads, -1, n).permute(0, 1, 3, 2)
        attn = torch.softmax(torch.matmul(qa, ka) * m.scale, dim=-1)
        out = torch.matmul(attn, va).permute(0, 1, 3, 2).reshape(shape)
        return _conv_bn(encode[1], relu6(out))

    row = axis(q.mean(-1), k.mean(-1), v.mean(-1), h, m.pos_emb_rowq, m.pos_emb_rowk, m.proj_encode_row,
               (b, m.dh, h, 1))
    col = axis(q.mean(-2), k.mean(-2), v.mean(-2), w, m.pos_emb_columnq, m.pos_emb_columnk, m.proj_encode_column,
               (b, m.dh, 1, w))
    xx = v + (row + col)
    xx = _conv_bn(m.proj[1], relu6(xx))
    return F.hardtanh(xx + 3, 0.0, 6.0) / 6 * qkv  # h_sigmoid


# -- test setup -------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests run thousands of tiny ops: one thread is faster than two there, and a busy machine's
    oversubscription (two OpenMP threads spinning on shared cores) slows them down 10x or more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- comparison helpers -----------------------------------------------------------------------------------------
def run(fn, module, x, seed: int = 1):
    """(output, grads of x and every parameter, buffers after) of ``fn(module, x)`` on a deep copy of ``module``.

    The loss is ``(y * r).sum()`` with a fixed random ``r``, so every output element matters.
    """
    module = copy.deepcopy(module)
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    y = fn(module, x)
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad((y * r).sum(), [x, *params], allow_unused=True)
    buffers = [t.detach().clone() for t in module.buffers()]
    return y.detach(), grads, buffers


def assert_same(a, b, atol=1e-5, rtol=1e-4, grad_rtol=1e-4):
    """Outputs within ``atol``/``rtol``; each gradient within ``grad_rtol`` of its own scale; buffers close."""
    (ya, ga, ba), (yb, gb, bb) = a, b
    torch.testing.assert_close(ya, yb, atol=atol, rtol=rtol)
    for i, (u, v) in enumerate(zip(ga, gb)):
        assert (u is None) == (v is None), f"gradient {i}: one is None"
        if u is not None:
            scale = max(v.abs().max().item(), 1e-2)  # a gradient that is rounding noise (|g| < 1e-6) passes
            torch.testing.assert_close(u, v, atol=grad_rtol * scale, rtol=grad_rtol,
                                       msg=lambda s, i=i: f"gradient {i}: {s}")
    for u, v in zip(ba, bb):
        torch.testing.assert_close(u, v, atol=atol, rtol=rtol)


def check_bf16_mode_free_deterministic(m, x, op: str, backend: str):
    """Under ``backend`` of ``op``: finite in bf16 autocast and as a bf16 module; train and eval give bitwise the
    same output (the layer has no BatchNorm or dropout); a backward in deterministic mode runs and is finite."""
    from yoloattn.nn.backends import use_backend

    with use_backend(**{op: backend}):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        assert torch.isfinite(y.float()).all()
        y_bf16 = m.to(torch.bfloat16)(x.bfloat16())  # the whole layer in bf16
        assert y_bf16.dtype == torch.bfloat16 and torch.isfinite(y_bf16.float()).all()
        m.float()
        y_train = m.train()(x)
        torch.testing.assert_close(m.eval()(x), y_train, atol=0, rtol=0)
        torch.use_deterministic_algorithms(True)
        try:
            m(x.requires_grad_()).sum().backward()
        finally:
            torch.use_deterministic_algorithms(False)
        assert torch.isfinite(x.grad).all()
