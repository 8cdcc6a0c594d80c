"""Squeeze-enhanced Axial attention (Sea-Attention) from SeaFormer (Wan et al., ICLR 2023).

Queries, keys and values come from 1×1 conv + BatchNorm layers. Two branches use them:

- squeeze axial attention: q, k, v are averaged along W (rows) and along H (columns); each 1-D
  sequence gets a learned positional embedding (q and k only, 16 positions resampled linearly to
  the length) and multi-head attention runs along it; the row and column results, each through an
  activation and a 1×1 conv + BN, broadcast back to H×W and are added to v;
- detail enhancement: ``cat(q, k, v)`` through a 3×3 depthwise conv + BN, the activation and a
  1×1 conv + BN back to ``dim`` channels.

The axial branch, projected to ``dim`` channels, gates the detail branch through a hard sigmoid.

:class:`SeaAttention` reproduces ``Sea_Attention`` of the official repository (fudan-zvg/SeaFormer,
``seaformer-cls/seaformer.py``; the segmentation copy is the same for the official ``attn_ratio=2``):
constructor, defaults, state_dict keys (BatchNorm buffers included), initialisation and outputs,
with plain PyTorch in place of mmcv: :class:`Conv2d_BN` is an ``nn.Sequential`` of ``c`` (the conv)
and ``bn`` (``nn.BatchNorm2d``, what mmcv's ``build_norm_layer(dict(type='BN'))`` builds), so the keys
are the official ones. ``Sea_Attention`` is an alias; :class:`Conv2d_BN`,
:class:`SqueezeAxialPositionalEmbedding` and :class:`h_sigmoid` are the official helpers. There is no
residual inside (SeaFormer's ``Block`` adds ``x + drop_path(attn(x))`` outside).

Differences from the official code, deliberate:

- ``activation=None`` (the official default) crashed at construction (it is called). Here None
  means ``nn.ReLU6``, the activation every official SeaFormer model passes down
  (``SeaFormer(act_layer=nn.ReLU6)``); pass any ``nn.Module`` class to change it;
- the detail branch's depthwise conv has ``2·key_dim·num_heads + dh`` channels, as in the
  classification code; the segmentation code's ``2·dh`` crashed for ``attn_ratio != 2`` (its own
  default was 4) and equals it for 2, so checkpoints of both load;
- ``norm_cfg`` accepts mmcv's ``'BN'``/``'BN2d'`` (``nn.BatchNorm2d``) and ``'SyncBN'``
  (``nn.SyncBatchNorm``, same keys), with optional ``eps``/``momentum``/``requires_grad``;
  anything else raises ``ValueError``;
- in training mode the BatchNorm after the row attention sees N·H values per channel and the one
  after the column attention N·W, so training needs N·H > 1 and N·W > 1: a smaller input raises
  ``ValueError`` naming the size (BatchNorm's own message named neither the layer nor the size).
  Eval mode has no such limit; any H, W ≥ 1 works there;
- ``key_dim``, ``num_heads`` and ``int(attn_ratio·key_dim)`` must be positive (``ValueError``);
- the gradients are right at W = 1: PyTorch's CPU BatchNorm backward (seen on torch 2.14.1) returns
  wrong input gradients for a channels-last gradient with a non-canonical stride on a size-1 W axis,
  which is what the official forward's ``mean(-2)`` and broadcast sums hand it at W = 1 (errors of
  O(1) in the input gradient; gradcheck fails). Every BatchNorm output here passes its gradient on
  with canonical strides (values unchanged; a copy only when needed). Forward numbers are the official ones.

ONNX export with dynamic H/W works (the positional embeddings are resampled with a traced size).

Backends (``set_backend(sea_attention=...)``): ``'reference'`` is the official code. ``'fused'``
computes q, k and v with one GEMM (the three convs' weights stacked; in training each keeps its own
BatchNorm statistics, written back after one ``F.batch_norm`` over the stacked channels), which is
``cat(q, k, v)`` with no concatenation, runs the depthwise conv channels-last on the CPU (one copy;
0.7 vs 13 ms for 256 channels at 80×80 on one thread), runs the 1×1 convs as GEMMs, folds every
BatchNorm into its conv in eval mode, skips the positional resampling at length 16 (an identity)
and uses ``F.hardsigmoid`` (bit-identical to ``h_sigmoid``); it equals the reference to fp32
rounding. ``'auto'`` uses it in eval mode only: in training it measured no faster (the layer is
bound by memory traffic over its ``2·key_dim·num_heads + dh`` channels, which both backends share).
It needs plain ``nn.BatchNorm2d`` norms (``'SyncBN'`` layers run the reference).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_image, flag, positive_int, real
from .backends import Op
from .msca import conv_channels_last, is_channels_last, pointwise

__all__ = ["SEA_ATTENTION", "Conv2d_BN", "SeaAttention", "Sea_Attention", "SqueezeAxialPositionalEmbedding",
           "h_sigmoid"]

# backends: 'fused' (one GEMM for q/k/v, folded BatchNorms in eval; 'auto' in eval only) and 'reference'
SEA_ATTENTION = Op("sea_attention")

_NORMS = {"BN": nn.BatchNorm2d, "BN2d": nn.BatchNorm2d, "SyncBN": nn.SyncBatchNorm}
_DEFAULT_NORM = dict(type="BN", requires_grad=True)


def build_norm(norm_cfg: dict | None, channels: int) -> nn.Module:
    """mmcv's ``build_norm_layer(norm_cfg, channels)[1]`` for the BatchNorm types SeaFormer uses."""
    cfg = dict(_DEFAULT_NORM if norm_cfg is None else norm_cfg)
    if not isinstance(norm_cfg, (dict, type(None))):
        raise TypeError(f"norm_cfg must be a dict such as dict(type='BN'), got {norm_cfg!r}")
    kind = cfg.pop("type", None)
    if kind not in _NORMS:
        raise ValueError(f"norm_cfg type must be one of {tuple(_NORMS)}, got {kind!r}")
    requires_grad = flag("norm_cfg requires_grad", cfg.pop("requires_grad", True))
    unknown = set(cfg) - {"eps", "momentum"}
    if unknown:
        raise ValueError(f"norm_cfg accepts type, requires_grad, eps and momentum; got also {sorted(unknown)}")
    layer = _NORMS[kind](channels, **cfg)
    for p in layer.parameters():
        p.requires_grad_(requires_grad)
    return layer


class Conv2d_BN(nn.Sequential):  # noqa: N801 (the official name)
    """SeaFormer's conv + norm pair: children ``c`` (``nn.Conv2d``) and ``bn`` (BatchNorm, γ = ``bn_weight_init``).

    Args:
        a, b: input and output channels.
        ks, stride, pad, dilation, groups: the conv's geometry.
        bn_weight_init: initial BatchNorm γ (0 makes the pair output 0 at initialisation).
        bias: give the conv a bias (the official code never does).
        norm_cfg: mmcv-style norm config (see :func:`build_norm`).
    """

    def __init__(self, a: int, b: int, ks=1, stride=1, pad=0, dilation=1, groups=1, bn_weight_init=1,
                 bias: bool = False, norm_cfg: dict | None = None):
        super().__init__()
        positive_int("a", a)
        positive_int("b", b)
        self.inp_channel = a
        self.out_channel = b
        self.ks = ks
        self.pad = pad
        self.stride = stride
        self.dilation = dilation
        self.groups = groups
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, dilation, groups, bias=flag("bias", bias)))
        bn = build_norm(norm_cfg, b)
        nn.init.constant_(bn.weight, real("bn_weight_init", bn_weight_init))
        nn.init.constant_(bn.bias, 0)
        self.add_module("bn", bn)


class SqueezeAxialPositionalEmbedding(nn.Module):
    """A learned (1, dim, shape) embedding, resampled linearly to the sequence length and added.

    Args:
        dim: channels.
        shape: stored positions (SeaFormer uses 16).

    Shapes:
        x: (B, dim, L) -> (B, dim, L), any L >= 1.
    """

    def __init__(self, dim: int, shape: int):
        super().__init__()
        positive_int("dim", dim)
        positive_int("shape", shape)
        self.pos_embed = nn.Parameter(torch.randn([1, dim, shape]))

    def forward(self, x: Tensor) -> Tensor:
        return x + F.interpolate(self.pos_embed, size=x.shape[2], mode="linear", align_corners=False)


class h_sigmoid(nn.Module):  # noqa: N801 (the official name)
    """Hard sigmoid ``relu6(x + 3) / 6`` (equal to ``F.hardsigmoid`` bit for bit)."""

    def __init__(self, inplace: bool = True):
        super().__init__()
        self.relu = nn.ReLU6(inplace=inplace)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(x + 3) / 6


class SeaAttention(nn.Module):
    """SeaFormer's squeeze-enhanced axial attention (``Sea_Attention``).

    Args:
        dim: input (and output) channels.
        key_dim: channels per head of the queries and keys.
        num_heads: attention heads.
        attn_ratio: value channels per head are ``int(attn_ratio * key_dim)``.
        activation: an ``nn.Module`` class, instantiated four times; None means ``nn.ReLU6`` (the official
            default None crashed; ReLU6 is what SeaFormer's models use).
        norm_cfg: mmcv-style BatchNorm config (``dict(type='BN')``, ``'BN2d'`` or ``'SyncBN'``).
        backend: ``None`` (follow :func:`yoloattn.nn.set_backend`), ``'auto'``, ``'fused'`` or ``'reference'``.

    Shapes:
        x: (N, dim, H, W) -> (N, dim, H, W); any H, W >= 1 in eval mode, N·H > 1 and N·W > 1 in training.
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float = 2, activation=None,
                 norm_cfg: dict | None = None, *, backend: str | None = None):
        super().__init__()
        positive_int("dim", dim)
        positive_int("key_dim", key_dim)
        positive_int("num_heads", num_heads)
        attn_ratio_value = real("attn_ratio", attn_ratio)
        if int(attn_ratio_value * key_dim) < 1:
            raise ValueError(f"attn_ratio * key_dim must be at least 1 (value channels per head), got "
                             f"attn_ratio={attn_ratio!r}, key_dim={key_dim}")
        if activation is None:
            activation = nn.ReLU6
        if not callable(activation):
            raise TypeError(f"activation must be an nn.Module class such as nn.ReLU6, got {activation!r}")
        if norm_cfg is None:
            norm_cfg = dict(_DEFAULT_NORM)
        SEA_ATTENTION.check_name(backend)
        self.dim = dim
        self.backend = backend
        self.num_heads = num_heads
        self.scale = key_dim**-0.5
        self.key_dim = key_dim
        self.nh_kd = nh_kd = key_dim * num_heads
        self.d = int(attn_ratio * key_dim)
        self.dh = dh = int(attn_ratio * key_dim) * num_heads
        self.attn_ratio = attn_ratio

        self.to_q = Conv2d_BN(dim, nh_kd, 1, norm_cfg=norm_cfg)
        self.to_k = Conv2d_BN(dim, nh_kd, 1, norm_cfg=norm_cfg)
        self.to_v = Conv2d_BN(dim, dh, 1, norm_cfg=norm_cfg)
        self.proj = nn.Sequential(activation(), Conv2d_BN(dh, dim, bn_weight_init=0, norm_cfg=norm_cfg))
        self.proj_encode_row = nn.Sequential(activation(), Conv2d_BN(dh, dh, bn_weight_init=0, norm_cfg=norm_cfg))
        self.pos_emb_rowq = SqueezeAxialPositionalEmbedding(nh_kd, 16)
        self.pos_emb_rowk = SqueezeAxialPositionalEmbedding(nh_kd, 16)
        self.proj_encode_column = nn.Sequential(activation(), Conv2d_BN(dh, dh, bn_weight_init=0,
                                                                        norm_cfg=norm_cfg))
        self.pos_emb_columnq = SqueezeAxialPositionalEmbedding(nh_kd, 16)
        self.pos_emb_columnk = SqueezeAxialPositionalEmbedding(nh_kd, 16)
        cqkv = 2 * nh_kd + dh
        self.dwconv = Conv2d_BN(cqkv, cqkv, ks=3, stride=1, pad=1, dilation=1, groups=cqkv, norm_cfg=norm_cfg)
        self.act = activation()
        self.pwconv = Conv2d_BN(cqkv, dim, ks=1, norm_cfg=norm_cfg)
        self.sigmoid = h_sigmoid()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, key_dim={self.key_dim}, num_heads={self.num_heads}, attn_ratio={self.attn_ratio}"

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, dim, H, W) -> (N, dim, H, W)."""
        check_image(x, self, self.dim)
        b, _, h, w = x.shape
        if isinstance(h, int) and isinstance(w, int):
            for what, size, bn in (("N·H", b * h, self.proj_encode_row[1].bn),
                                   ("N·W", b * w, self.proj_encode_column[1].bn)):
                if bn.training and size < 2:
                    raise ValueError(f"{type(self).__name__} in training mode needs {what} > 1 (its BatchNorm after "
                                     f"the {'row' if what == 'N·H' else 'column'} attention normalises over {what} "
                                     f"values per channel), got an input of shape {tuple(x.shape)}; use eval mode "
                                     f"or a larger batch or map")
        return SEA_ATTENTION(self, x, backend=self.backend)


def _contiguous_grad(t: Tensor) -> Tensor:
    """``t``, whose gradient gets canonical strides (in ``t``'s layout) before it reaches the BatchNorm before ``t``.

    Works around a PyTorch CPU BatchNorm backward bug (seen on torch 2.14.1, train and eval): a
    gradient that is channels-last with a non-canonical stride on a size-1 W axis yields wrong input
    gradients. Such gradients arise here: the backward of ``mean(-2)`` on a W = 1 map, and the backward
    of the broadcast ``(B, dh, H, 1) + (B, dh, 1, W)`` sum when the gradient above it is channels-last;
    the official module's input gradients were wrong by up to O(1) at W = 1. Values are unchanged; the
    copy happens only when the strides are not canonical.
    """
    if t.requires_grad and not torch.jit.is_tracing():
        channels_last = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
        t.register_hook(lambda grad: _canonical(grad, channels_last))
    return t


def _canonical(grad: Tensor | None, channels_last: bool) -> Tensor | None:
    if grad is None or grad.dim() != 4:
        return grad
    n, c, h, w = grad.shape
    if channels_last:
        fmt, strides = torch.channels_last, (h * w * c, 1, w * c, c)
    else:
        fmt, strides = torch.contiguous_format, (c * h * w, h * w, w, 1)
    return grad if grad.stride() == strides else grad.clone(memory_format=fmt)


def _axial(m: SeaAttention, q: Tensor, k: Tensor, v: Tensor, dim: int, pos_q, pos_k, encode) -> Tensor:
    """One squeeze axial attention: ``dim=-1`` averages W (rows, output (B, dh, H, 1)), ``-2`` averages H."""
    b = q.shape[0]
    n = q.shape[2] if dim == -1 else q.shape[3]
    heads = m.num_heads
    q_axis = pos_q(q.mean(dim)).reshape(b, heads, -1, n).permute(0, 1, 3, 2)  # (B, heads, L, key_dim)
    k_axis = pos_k(k.mean(dim)).reshape(b, heads, -1, n)  # (B, heads, key_dim, L)
    v_axis = v.mean(dim).reshape(b, heads, -1, n).permute(0, 1, 3, 2)  # (B, heads, L, d)
    attn = (torch.matmul(q_axis, k_axis) * m.scale).softmax(dim=-1)
    out = torch.matmul(attn, v_axis).permute(0, 1, 3, 2)  # (B, heads, d, L)
    shape = (b, m.dh, n, 1) if dim == -1 else (b, m.dh, 1, n)
    return _contiguous_grad(encode(out.reshape(shape)))


def _reference(m: SeaAttention, x: Tensor) -> Tensor:
    q, k, v = (_contiguous_grad(pair(x)) for pair in (m.to_q, m.to_k, m.to_v))
    qkv = _contiguous_grad(m.dwconv(torch.cat([q, k, v], dim=1)))
    qkv = _contiguous_grad(m.pwconv(m.act(qkv)))  # detail enhancement
    xx_row = _axial(m, q, k, v, -1, m.pos_emb_rowq, m.pos_emb_rowk, m.proj_encode_row)
    xx_column = _axial(m, q, k, v, -2, m.pos_emb_columnq, m.pos_emb_columnk, m.proj_encode_column)
    xx = v.add(xx_row.add(xx_column))
    return m.sigmoid(_contiguous_grad(m.proj(xx))) * qkv


# -- fused -------------------------------------------------------------------------------------------------------
def _same_batch_norms(bns) -> str | None:
    """Why ``bns`` cannot run as one ``F.batch_norm`` over their concatenated channels, or None."""
    first = bns[0]
    for bn in bns:
        if type(bn) is not nn.BatchNorm2d:
            return f"its norms are {type(bn).__name__}, not nn.BatchNorm2d"
        if not (bn.affine and bn.track_running_stats) or bn.momentum is None:
            return "its BatchNorms are not affine with tracked running statistics and a fixed momentum"
        if (bn.training, bn.eps, bn.momentum) != (first.training, first.eps, first.momentum):
            return "its q/k/v BatchNorms differ in mode, eps or momentum"
    return None


def _stacked_batch_norm(bns, t: Tensor) -> Tensor:
    """What ``cat([bn(t_i) for bn, t_i in zip(bns, t.split(...))])`` gives, as one ``F.batch_norm`` over ``t``.

    BatchNorm is per channel, so the concatenated parameters give the same result; in training the
    updated running statistics are written back to each BatchNorm's own buffers (as it would update them).
    """
    first = bns[0]
    weight = torch.cat([bn.weight for bn in bns])
    bias = torch.cat([bn.bias for bn in bns])
    mean = torch.cat([bn.running_mean for bn in bns])
    var = torch.cat([bn.running_var for bn in bns])
    out = F.batch_norm(t, mean, var, weight, bias, first.training, first.momentum, first.eps)
    if first.training:
        with torch.no_grad():
            sizes = [bn.num_features for bn in bns]
            for bn, m_i, v_i in zip(bns, mean.split(sizes), var.split(sizes)):
                bn.running_mean.copy_(m_i)
                bn.running_var.copy_(v_i)
                bn.num_batches_tracked.add_(1)
    return out


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """An eval-mode BatchNorm folded into the conv before it: (weight, bias) of the combined conv."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv.weight * scale.reshape(-1, 1, 1, 1), bias


def _frozen(bn: nn.Module) -> bool:
    return type(bn) is nn.BatchNorm2d and not bn.training and bn.track_running_stats


def _pointwise_bn(pair: Conv2d_BN, x: Tensor, channels_last: bool = False) -> Tensor:
    """``pair(x)`` for a 1×1 Conv2d_BN: a GEMM, with the BatchNorm folded in when it is frozen (eval)."""
    if _frozen(pair.bn):
        return pointwise(*_folded(pair.c, pair.bn), x, channels_last=channels_last)
    return pair.bn(pointwise(pair.c.weight, pair.c.bias, x, channels_last=channels_last))


def _add_position(pos: SqueezeAxialPositionalEmbedding, t: Tensor) -> Tensor:
    table = pos.pos_embed
    if t.shape[2] == table.shape[2] and not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
        return t + table  # linear resampling to the same length is the identity
    return t + F.interpolate(table, size=t.shape[2], mode="linear", align_corners=False)


def _axial_fused(m: SeaAttention, squeezed: Tensor, rows: bool) -> Tensor:
    """Squeeze axial attention on ``squeezed`` (B, 2·nh_kd + dh, L), the mean of cat(q, k, v) along one axis."""
    b, _, n = squeezed.shape
    heads = m.num_heads
    q, k, v = squeezed.split([m.nh_kd, m.nh_kd, m.dh], dim=1)
    pos_q, pos_k, encode = ((m.pos_emb_rowq, m.pos_emb_rowk, m.proj_encode_row) if rows else
                            (m.pos_emb_columnq, m.pos_emb_columnk, m.proj_encode_column))
    q = _add_position(pos_q, q).reshape(b, heads, -1, n).transpose(2, 3)  # (B, heads, L, key_dim)
    k = _add_position(pos_k, k).reshape(b, heads, -1, n)  # (B, heads, key_dim, L)
    v = v.reshape(b, heads, -1, n).transpose(2, 3)  # (B, heads, L, d)
    attn = (torch.matmul(q, k) * m.scale).softmax(dim=-1)
    out = torch.matmul(attn, v).transpose(2, 3).reshape(b, m.dh, n)  # (B, dh, L)
    return _contiguous_grad(encode(out.unsqueeze(-1) if rows else out.unsqueeze(-2)))


def _fused_can_run(m: SeaAttention, x: Tensor) -> str | None:
    return _same_batch_norms([m.to_q.bn, m.to_k.bn, m.to_v.bn])


def _fused(m: SeaAttention, x: Tensor) -> Tensor:
    out_cl = is_channels_last(x)
    convs = (m.to_q.c, m.to_k.c, m.to_v.c)
    weight = torch.cat([c.weight for c in convs])  # (2·nh_kd + dh, dim, 1, 1): the three 1x1 convs as one GEMM
    bias = None if all(c.bias is None for c in convs) else torch.cat(
        [c.weight.new_zeros(c.out_channels) if c.bias is None else c.bias for c in convs])
    bns = [m.to_q.bn, m.to_k.bn, m.to_v.bn]
    if all(_frozen(bn) for bn in bns):  # eval: the BatchNorms folded into the stacked GEMM
        scale = torch.cat([bn.weight * torch.rsqrt(bn.running_var + bn.eps) for bn in bns])
        shift = torch.cat([bn.bias - bn.running_mean * bn.weight * torch.rsqrt(bn.running_var + bn.eps) for bn in bns])
        qkv_in = pointwise(weight * scale.reshape(-1, 1, 1, 1), shift if bias is None else shift + bias * scale, x)
    else:
        qkv_in = _stacked_batch_norm(bns, pointwise(weight, bias, x))
    qkv_in = _contiguous_grad(qkv_in)  # = cat([q, k, v]), NCHW
    # the depthwise conv runs channels-last on the CPU: 0.7 vs 13 ms for 256 channels at 80x80 on one thread
    dw_in = qkv_in.contiguous(memory_format=torch.channels_last) if conv_channels_last(x) else qkv_in
    if _frozen(m.dwconv.bn):
        dw_weight, dw_bias = _folded(m.dwconv.c, m.dwconv.bn)
        detail = F.conv2d(dw_in, dw_weight, dw_bias, padding=1, groups=m.dwconv.c.groups)
    else:
        detail = _contiguous_grad(m.dwconv(dw_in))
    detail = _contiguous_grad(_pointwise_bn(m.pwconv, m.act(detail), channels_last=out_cl))
    xx_row = _axial_fused(m, qkv_in.mean(-1), rows=True)  # (B, dh, H, 1)
    xx_column = _axial_fused(m, qkv_in.mean(-2), rows=False)  # (B, dh, 1, W)
    xx = qkv_in[:, 2 * m.nh_kd:] + (xx_row + xx_column)  # v + ...
    xx = _contiguous_grad(_pointwise_bn(m.proj[1], m.proj[0](xx), channels_last=out_cl))
    return F.hardsigmoid(xx) * detail


def _fused_auto_skip(m: SeaAttention, x: Tensor) -> str | None:
    if any(bn.training for bn in (m.to_q.bn, m.dwconv.bn, m.proj[1].bn)):
        return "in training mode it measured no faster than the reference (its gains are the folded BatchNorms)"
    return None


SEA_ATTENTION.register("fused", can_run=_fused_can_run, auto_skip=_fused_auto_skip)(_fused)
SEA_ATTENTION.register("reference")(_reference)

Sea_Attention = SeaAttention
