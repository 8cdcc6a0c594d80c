"""ACmix: a mix of self-attention and convolution (Pan et al., CVPR 2022).

Three 1x1 convs give queries, keys and values. They feed two paths that are summed with learned rates:

- attention: every output pixel attends to a ``kernel_att × kernel_att`` neighbourhood of the
  reflection-padded keys and values, with a learned position encoding of normalised coordinates;
- convolution: a 1x1 conv mixes the q, k and v heads into ``kernel_conv²`` maps, and a grouped
  ``kernel_conv × kernel_conv`` conv, initialised as one-hot shift kernels, aggregates them.

:class:`ACmix` reproduces the ``ACmix`` class of the official repository (``LeapLabTHU/ACmix``,
``ResNet/test_bottleneck.py``): the same constructor, defaults, initialisation (rates 0.5, shift kernels,
no ``dep_conv.bias``) and ``state_dict`` keys, NCHW in and out. Deliberate differences:

- the position encoding is built on the input's device and in the input's dtype (the official
  ``position()`` is fp32 and moved with ``.cuda()``, so a half-precision model crashes and a model on
  another CUDA device or on MPS/XPU gets a device mismatch); it is cached per size, device and dtype;
- ``.reshape`` instead of ``.view``: channels-last inputs (Ultralytics converts models to channels-last)
  with batch >= 2 work;
- any H x W: reflection padding wider than the map reflects repeatedly (numpy's ``'reflect'``; a 1-pixel
  axis repeats its pixel), where ``nn.ReflectionPad2d`` raises for H or W <= ``kernel_att // 2``; with
  ``stride > 1`` the output is ``ceil(H / stride) × ceil(W / stride)``, like ``Conv(k=3, s=2)`` (the
  official view fails unless ``stride`` divides H and W);
- ``dilation > 1`` dilates the attention window as its padding implies (the official unfold ignores the
  dilation, so every ``dilation > 1`` crashed); ``kernel_conv`` other than 3 pads by ``kernel_conv // 2``
  (the official padding is fixed at 1, so the two paths' sizes disagreed); even kernels raise
  ``ValueError`` at construction.

Kept: the attention logits include ``q · (pe_q - pe_k)`` exactly as the official code (so
``conv_p.bias`` cancels and gets no gradient), borders reflect the position encoding too, the
attention path's channels are head-major and the conv path's are head-dim-major and they are added
channel by channel, there is no residual.

Backends (``set_backend(acmix=...)``): ``'fused'`` (default) reads the neighbours as strided slices of
the padded ``k - pe`` and ``v`` (:func:`yoloattn.nn.msda.local_logits`; the ``q·pe_q`` term is constant
over the neighbours and drops out of the softmax), makes q, k, v with one GEMM whose rows come out in
the conv path's order, and folds ``fc`` into ``dep_conv`` (one grouped conv); ``'reference'`` is the
official math with ``nn.Unfold``. At YOLOv8n's P3 (``ACmix(64, 64)``, 80x80, batch 1, CPU) ``'fused'``
measured 7-10x faster forward, 6-9x forward+backward, with about a tenth of the peak memory. The softmax
runs in at least fp32.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_image, positive_int
from .backends import Op
from .msda import _plain_graph, _softmax_neighbours, local_aggregate, local_logits, pointwise

__all__ = ["ACMIX", "ACmix"]

# backends: 'fused' (slices of the padded maps, one qkv GEMM, fc folded into dep_conv) and 'reference'
ACMIX = Op("acmix")


def _odd(name: str, value) -> int:
    positive_int(name, value)
    if value % 2 == 0:
        raise ValueError(f"{name} must be odd (the window is centred on the pixel), got {value}")
    return value


def _linspace(n, dtype: torch.dtype, device) -> Tensor:
    """``torch.linspace(-1, 1, n)`` (``[-1]`` for n = 1), computed in at least fp32."""
    ctype = torch.promote_types(dtype, torch.float32)
    if not _plain_graph():
        return torch.linspace(-1.0, 1.0, n, dtype=ctype, device=device)
    # traced: arange keeps n symbolic
    i = torch.arange(n, dtype=ctype, device=device)
    span = torch.as_tensor(n - 1, dtype=ctype, device=device).clamp(min=1.0)
    return i * (2.0 / span) - 1.0


def position(h, w, dtype: torch.dtype, device) -> Tensor:
    """(1, 2, h, w) normalised coordinates: channel 0 the column (x), channel 1 the row (y), in [-1, 1]."""
    loc_w = _linspace(w, dtype, device).reshape(1, w).expand(h, w)
    loc_h = _linspace(h, dtype, device).reshape(h, 1).expand(h, w)
    return torch.stack((loc_w, loc_h)).unsqueeze(0).to(dtype)


def _reflect_indices(n, pad: int, device) -> Tensor:
    """Source index of each of the ``n + 2·pad`` positions of a reflection-padded axis of length n.

    Mirror at the edges without repeating them, repeatedly when ``pad >= n``; n = 1 gives all zeros.
    """
    idx = torch.arange(-pad, n + pad, device=device)
    period = torch.as_tensor(2 * (n - 1), device=device).clamp(min=1)
    m = torch.remainder(idx, period)
    return torch.where(m < torch.as_tensor(n, device=device), m, period - m)


def reflect_pad(x: Tensor, pad: int) -> Tensor:
    """Reflection padding of the last two axes by ``pad``, for any size (see :func:`_reflect_indices`)."""
    if pad == 0:
        return x
    h, w = x.shape[-2], x.shape[-1]
    deterministic_cuda = x.is_cuda and torch.are_deterministic_algorithms_enabled()
    if not _plain_graph() and h > pad and w > pad and x.dim() in (3, 4) and not deterministic_cuda:
        return F.pad(x, (pad, pad, pad, pad), mode="reflect")  # the same values
    # gathers: any size, exportable with dynamic shapes, deterministic backward on CUDA
    x = x.index_select(-2, _reflect_indices(h, pad, x.device))
    return x.index_select(-1, _reflect_indices(w, pad, x.device))


class ACmix(nn.Module):
    """ACmix, NCHW in and out.

    Args:
        in_planes: input channels.
        out_planes: output channels; divisible by ``head``.
        kernel_att: odd attention window size.
        head: attention heads (``head_dim = out_planes // head``).
        kernel_conv: odd kernel of the convolution path.
        stride: output stride of both paths (output ``ceil(H / stride) × ceil(W / stride)``).
        dilation: spacing of the attention window's pixels.
        backend: ``None`` (the process-wide choice), ``'fused'`` or ``'reference'``.
    """

    def __init__(self, in_planes: int, out_planes: int, kernel_att: int = 7, head: int = 4, kernel_conv: int = 3,
                 stride: int = 1, dilation: int = 1, *, backend: str | None = None):
        super().__init__()
        positive_int("in_planes", in_planes)
        positive_int("out_planes", out_planes)
        _odd("kernel_att", kernel_att)
        positive_int("head", head)
        _odd("kernel_conv", kernel_conv)
        positive_int("stride", stride)
        positive_int("dilation", dilation)
        ACMIX.check_name(backend)
        if out_planes % head:
            raise ValueError(f"out_planes={out_planes} must be divisible by head={head}")
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.head = head
        self.kernel_att = kernel_att
        self.kernel_conv = kernel_conv
        self.stride = stride
        self.dilation = dilation
        self.backend = backend
        self.rate1 = nn.Parameter(torch.empty(1))
        self.rate2 = nn.Parameter(torch.empty(1))
        self.head_dim = out_planes // head

        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=1)
        self.conv2 = nn.Conv2d(in_planes, out_planes, kernel_size=1)
        self.conv3 = nn.Conv2d(in_planes, out_planes, kernel_size=1)
        self.conv_p = nn.Conv2d(2, self.head_dim, kernel_size=1)

        self.padding_att = (dilation * (kernel_att - 1) + 1) // 2
        self.pad_att = nn.ReflectionPad2d(self.padding_att)
        self.unfold = nn.Unfold(kernel_size=kernel_att, dilation=dilation, padding=0, stride=stride)
        self.softmax = nn.Softmax(dim=1)

        self.fc = nn.Conv2d(3 * head, kernel_conv * kernel_conv, kernel_size=1, bias=False)
        # the official conv is built with a bias and then has it set to None: no bias key
        self.dep_conv = nn.Conv2d(kernel_conv * kernel_conv * self.head_dim, out_planes, kernel_size=kernel_conv,
                                  bias=False, groups=self.head_dim, padding=kernel_conv // 2, stride=stride)
        self._positions: dict = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Rates 0.5; ``dep_conv`` as one-hot shift kernels (input channel n of a group -> tap n)."""
        with torch.no_grad():
            self.rate1.fill_(0.5)
            self.rate2.fill_(0.5)
            kc = self.kernel_conv
            kernel = torch.zeros(kc * kc, kc, kc)
            for n in range(kc * kc):
                kernel[n, n // kc, n % kc] = 1.0
            self.dep_conv.weight.copy_(kernel.repeat(self.out_planes, 1, 1, 1))

    def extra_repr(self) -> str:
        return (f"in_planes={self.in_planes}, out_planes={self.out_planes}, kernel_att={self.kernel_att}, "
                f"head={self.head}, kernel_conv={self.kernel_conv}, stride={self.stride}, dilation={self.dilation}")

    def position(self, h, w, dtype: torch.dtype, device) -> Tensor:
        """The (1, 2, h, w) coordinate map, cached per (h, w, dtype, device) outside traced graphs."""
        if _plain_graph() or not (isinstance(h, int) and isinstance(w, int)):
            return position(h, w, dtype, device)
        key = (h, w, dtype, str(device))
        loc = self._positions.get(key)
        if loc is None:
            if len(self._positions) >= 16:
                self._positions.clear()
            loc = self._positions[key] = position(h, w, dtype, device)
        return loc

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, in_planes, H, W) -> (N, out_planes, ceil(H / stride), ceil(W / stride))."""
        check_image(x, self, self.in_planes)
        return ACMIX(self, x, backend=self.backend)


def _reference(m: ACmix, x: Tensor) -> Tensor:
    """The official math, with nn.Unfold and the explicit ``+ pe_q - pe_k`` term."""
    q, k, v = m.conv1(x), m.conv2(x), m.conv3(x)
    scaling = float(m.head_dim) ** -0.5
    b, c, h, w = q.shape
    s, kk, hd, heads, pad = m.stride, m.kernel_att**2, m.head_dim, m.head, m.padding_att
    h_out, w_out = (h - 1) // s + 1, (w - 1) // s + 1

    pe = m.conv_p(m.position(h, w, q.dtype, q.device))  # (1, hd, h, w)
    q_att = q.reshape(b * heads, hd, h, w) * scaling
    k_att = k.reshape(b * heads, hd, h, w)
    v_att = v.reshape(b * heads, hd, h, w)
    if s > 1:
        q_att = q_att[:, :, ::s, ::s]
        q_pe = pe[:, :, ::s, ::s]
    else:
        q_pe = pe
    unfold_k = m.unfold(reflect_pad(k_att, pad)).reshape(b * heads, hd, kk, h_out, w_out)
    unfold_rpe = m.unfold(reflect_pad(pe, pad)).reshape(1, hd, kk, h_out, w_out)
    att = (q_att.unsqueeze(2) * (unfold_k + q_pe.unsqueeze(2) - unfold_rpe)).sum(1)  # (B·head, k², Ho, Wo)
    att = torch.softmax(att, dim=1, dtype=torch.promote_types(att.dtype, torch.float32)).to(att.dtype)
    unfold_v = m.unfold(reflect_pad(v_att, pad)).reshape(b * heads, hd, kk, h_out, w_out)
    out_att = (att.unsqueeze(1) * unfold_v).sum(2).reshape(b, m.out_planes, h_out, w_out)

    f_all = m.fc(torch.cat([t.reshape(b, heads, hd, h * w) for t in (q, k, v)], 1))  # (B, kc², hd, HW)
    f_conv = f_all.permute(0, 2, 1, 3).reshape(b, -1, h, w)  # channel = d·kc² + n
    out_conv = m.dep_conv(f_conv)
    return m.rate1 * out_att + m.rate2 * out_conv


def _fused(m: ACmix, x: Tensor) -> Tensor:
    s, hd, heads, pad, dil, cout = m.stride, m.head_dim, m.head, m.padding_att, m.dilation, m.out_planes
    b, _, h, w = x.shape
    h_out, w_out = (h - 1) // s + 1, (w - 1) // s + 1
    # one GEMM for q, k, v with rows ordered (d, t, head): the conv path's groups, read without a copy
    order = torch.arange(3 * cout, device=x.device).reshape(3, heads, hd).permute(2, 0, 1).reshape(-1)
    weight = torch.cat([m.conv1.weight, m.conv2.weight, m.conv3.weight])[order]
    bias = torch.cat([m.conv1.bias, m.conv2.bias, m.conv3.bias])[order]
    qkv = pointwise(x, weight, bias)  # (B, hd·3·head, h, w)
    parts = qkv.reshape(b, hd, 3, heads, h, w)
    q, k, v = (parts[:, :, i].transpose(1, 2) for i in range(3))  # (B, head, hd, h, w) strided views

    pe = m.conv_p(m.position(h, w, x.dtype, x.device)).reshape(1, 1, hd, h, w)
    hp, wp = h + 2 * pad, w + 2 * pad
    kp = reflect_pad((k - pe).reshape(b * heads, hd, h, w), pad).reshape(b, heads, hd, hp, wp)
    vp = reflect_pad(v.reshape(b * heads, hd, h, w), pad).reshape(b, heads, hd, hp, wp)
    q_s = q[..., ::s, ::s] * (float(hd) ** -0.5)
    attn = _softmax_neighbours(local_logits(q_s, kp, m.kernel_att, dil, s))  # (B, head, k², Ho, Wo)
    out_att = local_aggregate(attn, vp, m.kernel_att, dil, s).reshape(b, cout, h_out, w_out)

    # fc then dep_conv are both linear: one grouped conv with weight sum_n dep[o, n] · fc[n, m]
    folded = torch.einsum("onab,nm->omab", m.dep_conv.weight, m.fc.weight.reshape(m.fc.out_channels, 3 * heads))
    out_conv = F.conv2d(qkv, folded.to(qkv.dtype), None, stride=s, padding=m.kernel_conv // 2, groups=hd)
    return m.rate1 * out_att + m.rate2 * out_conv


ACMIX.register("fused")(_fused)
ACMIX.register("reference")(_reference)
