"""Multi-Scale Dilated Attention (MSDA) from DilateFormer (Jiao et al., IEEE TMM 2023).

Every pixel attends to a ``kernel_size × kernel_size`` neighbourhood of itself, sampled with a
dilation; the heads are split into groups and each group uses its own dilation (1, 2, 3 by default),
so one layer mixes several receptive fields. A 1x1 conv makes queries, keys and values; a linear
layer projects the concatenated groups.

:class:`MultiDilatelocalAttention` reproduces the official class of the DilateFormer repository
(``JIAOJIAYUASD/dilateformer``, ``models/dilateformer.py``): the same constructor, defaults and
``state_dict`` keys, channels-last ``(N, H, W, C)`` in and out. :class:`MSDA` is the YOLO-facing layer
with the same constructor, NCHW in and out. :class:`DilateAttention` is the official per-dilation
module (it has no parameters).

Deliberate differences from the official code:

- the official forward writes the attention output in place into a view of its *input* (the caller's
  tensor is overwritten, and backward then fails: "modified by an inplace operation"); here the groups
  are concatenated into a new tensor, with identical numbers;
- ``num_heads`` need not be a multiple of ``len(dilation)``: the heads are split into ``len(dilation)``
  contiguous blocks as evenly as possible (the first blocks get one head more), block ``i`` using
  ``dilation[i]``. Where the official code runs (``num_heads % len(dilation) == 0``) this is exactly its
  split, so ``MSDA(64)`` works with the default 8 heads and dilations (1, 2, 3) (3, 3 and 2 heads);
- bad settings (an even ``kernel_size``, ``dim % num_heads != 0``, fewer heads than dilations) raise
  ``ValueError`` at construction instead of a reshape error or an ``AssertionError``;
- ``dilation`` may also be a single integer.

Kept as in the official code: ``qk_scale`` is used as ``qk_scale or head_dim ** -0.5`` (so 0 means the
default); neighbours outside the image are zero keys and values that still take part in the softmax
(logit 0), so H or W smaller than the dilated kernel works; the outer ``scale`` attribute is unused;
the qkv conv has no bias by default (DilateFormer's models pass ``qkv_bias=True``).

Backends (``set_backend(msda=...)``): ``'fused'`` (default) reads the neighbours as shifted slices of
the zero-padded keys and values, so the ``k²``-fold unfold copies are never built, with a hand-written
backward that accumulates into the padded gradients in place; ``'reference'`` is the official math
(``nn.Unfold`` and batched matmuls, in the official order). The slice attention is also used by ACmix.
At YOLOv8n's P3 (``MSDA(64)``, 80x80, batch 1, CPU) ``'fused'`` measured about 5x faster forward, 3-4x
forward+backward, and half the peak memory of ``'reference'``. Softmaxes run in at least fp32 (the official
code used the input's dtype), so half-precision models normalise the attention weights in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._checks import check_image, flag, in_range, is_int, positive_int, real
from .backends import Op

__all__ = ["MSDA", "MSDA_OP", "DilateAttention", "MultiDilatelocalAttention", "local_aggregate", "local_logits"]

# backends: 'fused' (shifted slices of the padded keys/values, no unfold) and 'reference' (the official math)
MSDA_OP = Op("msda")


# -- neighbourhood attention by shifted slices (shared with ACmix) ---------------------------------------------
# Neighbour (a, b) of output pixel (i, j) is kp[..., a·dilation + i·stride, b·dilation + j·stride] of a padded map
# kp (*L, D, Hp, Wp): for each of the k² neighbours that is one strided slice of kp (a view), so the k²-fold unfold
# copies are never built; kernel index n = a·k + b (row-major, as nn.Unfold). One neighbour at a time keeps every
# temporary at the size of q (cache-resident), and the backward adds into the padded gradients in place.


def _plain_graph() -> bool:
    """Tracing, exporting or compiling: plain differentiable ops only (no custom Function, no ``out=``)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def _taps(k: int, dilation: int) -> list[tuple[int, int, int]]:
    """(n, row offset, column offset) of each neighbour in the padded map."""
    return [(a * k + b, a * dilation, b * dilation) for a in range(k) for b in range(k)]


def _tap(t: Tensor, oy: int, ox: int, ho, wo, stride: int) -> Tensor:
    """The neighbour at offset (oy, ox) of every output pixel: a strided slice of ``t`` (..., ho, wo)."""
    return t[..., oy:oy + (ho - 1) * stride + 1:stride, ox:ox + (wo - 1) * stride + 1:stride]


def _logits_plain(q: Tensor, kp: Tensor, k: int, dilation: int, stride: int) -> Tensor:
    ho, wo = q.shape[-2], q.shape[-1]
    return torch.stack([(q * _tap(kp, oy, ox, ho, wo, stride)).sum(-3) for _, oy, ox in _taps(k, dilation)], dim=-3)


def _aggregate_plain(attn: Tensor, vp: Tensor, k: int, dilation: int, stride: int) -> Tensor:
    ho, wo = attn.shape[-2], attn.shape[-1]
    out = None
    for n, oy, ox in _taps(k, dilation):
        term = attn[..., n:n + 1, :, :] * _tap(vp, oy, ox, ho, wo, stride)
        out = term if out is None else out + term
    return out


def _dots_into(out: Tensor, a: Tensor, b: Tensor, k: int, dilation: int, stride: int) -> Tensor:
    """out[..., n, :, :] = sum_d a · b[neighbour n]; a: (*L, D, ho, wo), b: (*L, D, Hp, Wp) padded."""
    ho, wo = a.shape[-2], a.shape[-1]
    buf = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    for n, oy, ox in _taps(k, dilation):
        torch.mul(a, _tap(b, oy, ox, ho, wo, stride), out=buf)
        torch.sum(buf, -3, out=out[..., n, :, :])
    return out


class _LocalLogits(torch.autograd.Function):
    """logits[n] = sum_d q · kp[neighbour n]; saves only q and kp."""

    @staticmethod
    def forward(ctx, q: Tensor, kp: Tensor, k: int, dilation: int, stride: int) -> Tensor:
        ctx.save_for_backward(q, kp)
        ctx.geometry = k, dilation, stride
        logits = q.new_empty((*q.shape[:-3], k * k, q.shape[-2], q.shape[-1]))
        return _dots_into(logits, q, kp, k, dilation, stride)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        q, kp = ctx.saved_tensors
        k, dilation, stride = ctx.geometry
        ho, wo = q.shape[-2], q.shape[-1]
        grad_q = grad_kp = None
        if ctx.needs_input_grad[0]:
            grad_q = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
            for n, oy, ox in _taps(k, dilation):
                grad_q.addcmul_(grad[..., n:n + 1, :, :], _tap(kp, oy, ox, ho, wo, stride))
        if ctx.needs_input_grad[1]:
            grad_kp = torch.zeros(kp.shape, dtype=kp.dtype, device=kp.device)
            for n, oy, ox in _taps(k, dilation):
                _tap(grad_kp, oy, ox, ho, wo, stride).addcmul_(grad[..., n:n + 1, :, :], q)
        return grad_q, grad_kp, None, None, None


class _LocalAggregate(torch.autograd.Function):
    """out = sum_n attn[n] · vp[neighbour n]; saves only attn and vp."""

    @staticmethod
    def forward(ctx, attn: Tensor, vp: Tensor, k: int, dilation: int, stride: int) -> Tensor:
        ctx.save_for_backward(attn, vp)
        ctx.geometry = k, dilation, stride
        ho, wo = attn.shape[-2], attn.shape[-1]
        out = torch.zeros((*vp.shape[:-2], ho, wo), dtype=vp.dtype, device=vp.device)
        for n, oy, ox in _taps(k, dilation):
            out.addcmul_(attn[..., n:n + 1, :, :], _tap(vp, oy, ox, ho, wo, stride))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        attn, vp = ctx.saved_tensors
        k, dilation, stride = ctx.geometry
        ho, wo = attn.shape[-2], attn.shape[-1]
        grad_attn = grad_vp = None
        if ctx.needs_input_grad[0]:
            grad_attn = _dots_into(attn.new_empty(attn.shape), grad, vp, k, dilation, stride)
        if ctx.needs_input_grad[1]:
            grad_vp = torch.zeros(vp.shape, dtype=vp.dtype, device=vp.device)
            for n, oy, ox in _taps(k, dilation):
                _tap(grad_vp, oy, ox, ho, wo, stride).addcmul_(attn[..., n:n + 1, :, :], grad)
        return grad_attn, grad_vp, None, None, None


def local_logits(q: Tensor, kp: Tensor, kernel_size: int, dilation: int = 1, stride: int = 1) -> Tensor:
    """Dot products of every query with its ``kernel_size²`` neighbours in a padded key map.

    Args:
        q: (*L, D, Ho, Wo) queries.
        kp: (*L, D, Hp, Wp) padded keys; neighbour (a, b) of output pixel (i, j) is
            ``kp[..., a·dilation + i·stride, b·dilation + j·stride]``.
        kernel_size: neighbourhood size k.
        dilation: spacing of the neighbours.
        stride: step between output pixels.

    Returns:
        (*L, k², Ho, Wo) logits, neighbour index n = a·k + b.
    """
    if _plain_graph():
        return _logits_plain(q, kp, kernel_size, dilation, stride)
    return _LocalLogits.apply(q, kp, kernel_size, dilation, stride)


def local_aggregate(attn: Tensor, vp: Tensor, kernel_size: int, dilation: int = 1, stride: int = 1) -> Tensor:
    """Attention-weighted sum of every pixel's ``kernel_size²`` neighbours in a padded value map.

    Args:
        attn: (*L, k², Ho, Wo) attention weights.
        vp: (*L, D, Hp, Wp) padded values (same geometry as :func:`local_logits`).
        kernel_size, dilation, stride: as :func:`local_logits`.

    Returns:
        (*L, D, Ho, Wo).
    """
    if _plain_graph():
        return _aggregate_plain(attn, vp, kernel_size, dilation, stride)
    return _LocalAggregate.apply(attn, vp, kernel_size, dilation, stride)


def _softmax_neighbours(logits: Tensor) -> Tensor:
    """Softmax over the neighbours (dim -3), in at least fp32, returned in the logits' dtype."""
    return torch.softmax(logits, dim=-3, dtype=torch.promote_types(logits.dtype, torch.float32)).to(logits.dtype)


def pointwise(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A 1x1 conv / channel Linear as one batched GEMM: (N, Cin, H, W) -> (N, Cout, H, W).

    ``weight``: (Cout, Cin[, 1, 1]). On the CPU this is several times faster than the convolution kernel
    for YOLO's shapes and gives the same result.
    """
    n, c, h, w = x.shape
    weight = weight.reshape(weight.shape[0], c).to(x.dtype)
    flat = x.reshape(n, c, h * w)
    if bias is None:
        out = torch.matmul(weight, flat)
    else:
        out = torch.baddbmm(bias.to(x.dtype).reshape(1, -1, 1), weight.expand(n, -1, -1), flat)
    return out.reshape(n, weight.shape[0], h, w)


# -- modules ---------------------------------------------------------------------------------------------------
class DilateAttention(nn.Module):
    """DilateFormer's attention of one dilation group (no parameters), the official ``DilateAttention``.

    Args:
        head_dim: channels per head.
        qk_scale: factor on the logits; ``qk_scale or head_dim ** -0.5`` as the official code.
        attn_drop: dropout on the attention weights.
        kernel_size: odd neighbourhood size.
        dilation: spacing of the neighbours in pixels.
    """

    def __init__(self, head_dim: int, qk_scale: float | None = None, attn_drop: float = 0.0, kernel_size: int = 3,
                 dilation: int = 1):
        super().__init__()
        positive_int("head_dim", head_dim)
        _check_kernel(kernel_size)
        positive_int("dilation", dilation)
        in_range("attn_drop", attn_drop, 0.0, 1.0, high_open=True)
        self.head_dim = head_dim
        self.scale = _scale(qk_scale, head_dim)
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.unfold = nn.Unfold(kernel_size, dilation, dilation * (kernel_size - 1) // 2, 1)
        self.attn_drop = nn.Dropout(attn_drop)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, kernel_size={self.kernel_size}, dilation={self.dilation}"

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q, k, v: (N, d, H, W) with d a multiple of ``head_dim`` -> (N, H, W, d), the official math."""
        b, d, h, w = q.shape
        heads, hd, kk, n = d // self.head_dim, self.head_dim, self.kernel_size**2, h * w
        q = q.reshape(b, heads, hd, 1, n).permute(0, 1, 4, 3, 2)  # (N, heads, HW, 1, hd)
        keys = self.unfold(k).reshape(b, heads, hd, kk, n).permute(0, 1, 4, 2, 3)  # (N, heads, HW, hd, k²)
        attn = (q @ keys) * self.scale  # (N, heads, HW, 1, k²)
        attn = self.attn_drop(_softmax_last(attn))
        values = self.unfold(v).reshape(b, heads, hd, kk, n).permute(0, 1, 4, 3, 2)  # (N, heads, HW, k², hd)
        return (attn @ values).transpose(1, 2).reshape(b, h, w, d)


def _softmax_last(x: Tensor) -> Tensor:
    return torch.softmax(x, dim=-1, dtype=torch.promote_types(x.dtype, torch.float32)).to(x.dtype)


def _scale(qk_scale, head_dim: int) -> float:
    if qk_scale is not None:
        real("qk_scale", qk_scale)
    return qk_scale or head_dim**-0.5


def _check_kernel(kernel_size) -> None:
    positive_int("kernel_size", kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd (the neighbourhood is centred on the pixel), got {kernel_size}")


def _dilations(dilation) -> tuple[int, ...]:
    if is_int(dilation):
        dilation = (dilation,)
    if not isinstance(dilation, Sequence) or isinstance(dilation, str) or len(dilation) == 0:
        raise TypeError(f"dilation must be a positive integer or a non-empty list of them, got {dilation!r}")
    for d in dilation:
        positive_int("each dilation", d)
    return tuple(dilation)


class MultiDilatelocalAttention(nn.Module):
    """DilateFormer's multi-scale dilated attention, channels-last ``(N, H, W, C)`` in and out.

    The official ``MultiDilatelocalAttention``; see :class:`MSDA` for the NCHW layer.

    Args:
        dim: channels (input and output).
        num_heads: attention heads; ``dim`` must be divisible by it and it must be ``>= len(dilation)``.
        qkv_bias: bias in the 1x1 qkv conv.
        qk_scale: factor on the logits; ``qk_scale or head_dim ** -0.5``.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
        kernel_size: odd neighbourhood size.
        dilation: one dilation per head group (a list), or a single integer.
        backend: ``None`` (the process-wide choice), ``'fused'`` or ``'reference'``.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, kernel_size: int = 3, dilation=[1, 2, 3],  # noqa: B006
                 *, backend: str | None = None):
        super().__init__()
        positive_int("dim", dim)
        positive_int("num_heads", num_heads)
        flag("qkv_bias", qkv_bias)
        in_range("attn_drop", attn_drop, 0.0, 1.0, high_open=True)
        in_range("proj_drop", proj_drop, 0.0, 1.0, high_open=True)
        _check_kernel(kernel_size)
        dilations = _dilations(dilation)
        MSDA_OP.check_name(backend)
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if num_heads < len(dilations):
            raise ValueError(f"num_heads={num_heads} must be >= len(dilation)={len(dilations)} "
                             f"(each dilation needs at least one head)")
        self.dim = dim
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.head_dim = head_dim
        self.dilation = dilation
        self.kernel_size = kernel_size
        self.scale = _scale(qk_scale, head_dim)  # unused, as in the official code
        self.num_dilation = len(dilations)
        self.backend = backend
        # heads of dilation i: a contiguous block; the official split when num_heads % len(dilation) == 0
        base, extra = divmod(num_heads, self.num_dilation)
        bounds = [0]
        for i in range(self.num_dilation):
            bounds.append(bounds[-1] + (base + (i < extra)) * head_dim)
        self.group_channels = tuple(zip(bounds[:-1], bounds[1:]))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=qkv_bias)
        self.dilate_attention = nn.ModuleList(
            [DilateAttention(head_dim, qk_scale, attn_drop, kernel_size, d) for d in dilations])
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"dilation={list(_dilations(self.dilation))}")

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, H, W, C) -> (N, H, W, C)."""
        check_image(x, self, self.dim, layout="NHWC")
        return MSDA_OP(self, x.permute(0, 3, 1, 2), "NHWC", backend=self.backend)


class MSDA(MultiDilatelocalAttention):
    """Multi-scale dilated attention as a YOLO layer: NCHW in and out, ``dim`` (= c1) first.

    Same constructor, defaults and ``state_dict`` as :class:`MultiDilatelocalAttention`; the output has
    the input's channel count. No residual inside (DilateFormer's ``DilateBlock`` adds it).
    """

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) -> (N, C, H, W)."""
        check_image(x, self, self.dim)
        return MSDA_OP(self, x, "NCHW", backend=self.backend)


def _project(m: MultiDilatelocalAttention, out_nhwc: Tensor | None, out_nchw: Tensor | None, layout: str) -> Tensor:
    if layout == "NHWC":
        if out_nhwc is None:
            out_nhwc = out_nchw.permute(0, 2, 3, 1)
        return m.proj_drop(m.proj(out_nhwc))
    if out_nchw is not None:
        return m.proj_drop(pointwise(out_nchw, m.proj.weight, m.proj.bias))
    return m.proj_drop(m.proj(out_nhwc)).permute(0, 3, 1, 2)


def _reference(m: MultiDilatelocalAttention, x: Tensor, layout: str) -> Tensor:
    """The official math: qkv conv, per dilation unfold attention, concatenation (not in place), Linear."""
    b, c, h, w = x.shape
    qkv = m.qkv(x).reshape(b, 3, c, h, w)
    outs = [att(qkv[:, 0, c0:c1], qkv[:, 1, c0:c1], qkv[:, 2, c0:c1])
            for att, (c0, c1) in zip(m.dilate_attention, m.group_channels)]
    return _project(m, torch.cat(outs, dim=-1), None, layout)  # (N, H, W, C) before the projection


def _fused(m: MultiDilatelocalAttention, x: Tensor, layout: str) -> Tensor:
    """Neighbours as shifted slices of the zero-padded keys/values; no unfold copies."""
    b, c, h, w = x.shape
    hd = m.head_dim
    qkv = pointwise(x, m.qkv.weight, m.qkv.bias).reshape(b, 3, c, h, w)
    outs = []
    for att, (c0, c1) in zip(m.dilate_attention, m.group_channels):
        heads, d, k = (c1 - c0) // hd, att.dilation, att.kernel_size
        q, key, val = (qkv[:, i, c0:c1].reshape(b, heads, hd, h, w) for i in range(3))  # views
        pad = d * (k - 1) // 2
        kp, vp = F.pad(key, (pad, pad, pad, pad)), F.pad(val, (pad, pad, pad, pad))  # zeros, as nn.Unfold
        attn = att.attn_drop(_softmax_neighbours(local_logits(q, kp, k, d) * att.scale))  # (N, heads, k², H, W)
        outs.append(local_aggregate(attn, vp, k, d).reshape(b, c1 - c0, h, w))
    return _project(m, None, torch.cat(outs, dim=1), layout)


MSDA_OP.register("fused")(_fused)
MSDA_OP.register("reference")(_reference)
