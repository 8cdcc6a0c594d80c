"""Efficient Multi-Scale Attention (EMA, Ouyang et al., ICASSP 2023).

The channels are split into ``factor`` groups and every group is processed as its own small image
(the groups go into the batch dimension). Two branches see each group: a 1×1 branch (coordinate
attention: the map is averaged along W and along H, both profiles go through one shared 1×1 conv,
their sigmoids re-weight the map, then GroupNorm) and a 3×3 branch (a 3×3 conv). Each branch's
globally pooled, channel-softmaxed descriptor weights the other branch's map ("cross-spatial
learning"); the sum is a one-channel map whose sigmoid gates the group.

:class:`EMA` reproduces ``EMA`` of the official repository (YOLOonMe/EMA-attention-module, file
``EMA_attention_module``): constructor, defaults, state_dict keys (``gn``, ``conv1x1``, ``conv3x3``;
they depend only on ``channels // factor``), and outputs. There is no residual and no BatchNorm,
so train and eval behave the same.

Differences from the official code, deliberate:

- ``c2`` (second positional argument, unused by the official code, which exists so YOLO's
  ``parse_model`` can call ``EMA(c1, c2)``) must be None or equal to ``channels``: the output always
  has ``channels`` channels, and ``EMA(64, 8)`` — which the official code reads as ``c2=8,
  factor=32`` — would otherwise silently ignore a meant ``factor``. Pass ``factor`` by keyword;
- ``channels`` must be a multiple of ``factor`` (``ValueError`` naming both; the official code
  asserted ``channels // factor > 0`` and then failed in ``reshape``);
- ONNX export with dynamic H/W works: the official ``AdaptiveAvgPool2d((None, 1))``/``((1, None))``
  cannot be exported with a traced size ("output_size is not constant"). Under
  ``torch.onnx.export`` and ``torch.jit.trace``, ``'auto'`` picks the ``'onnx'`` backend, which
  averages with ``mean`` (ONNX ReduceMean) instead: the same math, equal to the official numbers to
  fp32 rounding (about 1e-7 on the profiles; ``AdaptiveAvgPool2d(1)`` and ``mean`` are bit-identical).

Any H, W ≥ 1 works (with H·W = 1, GroupNorm sees one value and the 1×1 branch is its bias).

Backends (``set_backend(ema=...)``):

- ``'fused'``: the 3×3 branch as one grouped conv (``groups=factor``, weights tiled) channels-last
  on the CPU instead of a conv over B·factor micro-images of ``channels // factor`` channels, where
  oneDNN is slow (fwd+bwd at 64 channels, 80×80: ~6 vs ~22 ms on one thread); means for the pools.
  ``'auto'`` uses it in training on maps larger than 40×40, where it measured faster;
- ``'onnx'``: the official sequence of ops with ``mean`` for the profile pools; ``'auto'`` uses it
  while exporting or tracing;
- ``'reference'``: the official code; ``'auto'`` uses it otherwise (forward, small maps).

The non-reference backends equal the official numbers to fp32 rounding, not bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_image, positive_int
from .backends import Op

__all__ = ["EMA", "EMA_OP", "EfficientMultiScaleAttention"]

# backends: 'fused' (grouped 3x3 conv, training on large maps), 'onnx' (mean instead of adaptive pools, under export)
# and 'reference' (the official code)
EMA_OP = Op("ema")


class EMA(nn.Module):
    """Efficient multi-scale attention: ``x * σ(cross-spatial weights)`` per channel group.

    Args:
        channels: input (and output) channels; a multiple of ``factor``.
        c2: unused; None or ``channels`` (the official signature has it for YOLO's ``parse_model``).
        factor: number of channel groups (the official name); each has ``channels // factor`` channels.
        backend: ``None`` (follow :func:`yoloattn.nn.set_backend`), ``'auto'``, ``'fused'``, ``'onnx'`` or
            ``'reference'``.

    Shapes:
        x: (N, channels, H, W) -> (N, channels, H, W), any H, W >= 1.
    """

    def __init__(self, channels: int, c2: int | None = None, factor: int = 32, *, backend: str | None = None):
        super().__init__()
        positive_int("channels", channels)
        if c2 is not None and (positive_int("c2", c2) != channels):
            raise ValueError(f"EMA keeps the channel count: c2={c2} must be None or equal to channels={channels}; "
                             f"c2 is the second positional argument, so pass the group count as factor={c2}")
        positive_int("factor", factor)
        if channels % factor:
            raise ValueError(f"EMA splits the channels into factor groups: channels={channels} must be a multiple of "
                             f"factor={factor}")
        EMA_OP.check_name(backend)
        self.channels = channels
        self.groups = factor
        self.backend = backend
        cg = channels // factor
        self.softmax = nn.Softmax(-1)
        self.agp = nn.AdaptiveAvgPool2d((1, 1))
        self.pool_h = nn.AdaptiveAvgPool2d((None, 1))
        self.pool_w = nn.AdaptiveAvgPool2d((1, None))
        self.gn = nn.GroupNorm(cg, cg)
        self.conv1x1 = nn.Conv2d(cg, cg, kernel_size=1, stride=1, padding=0)
        self.conv3x3 = nn.Conv2d(cg, cg, kernel_size=3, stride=1, padding=1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, factor={self.groups}"

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, channels, H, W) -> (N, channels, H, W)."""
        check_image(x, self, self.channels)
        return EMA_OP(self, x, backend=self.backend)


def _ema(m: EMA, x: Tensor, pool_h, pool_w) -> Tensor:
    """The official forward with the two profile pools passed in."""
    b, c, h, w = x.shape
    g = m.groups
    group_x = x.reshape(b * g, -1, h, w)  # (B·g, c/g, H, W): group j of sample i is row i·g + j
    x_h = pool_h(group_x)  # (B·g, c/g, H, 1), mean over W
    x_w = pool_w(group_x).permute(0, 1, 3, 2)  # (B·g, c/g, W, 1), mean over H
    hw = m.conv1x1(torch.cat([x_h, x_w], dim=2))
    x_h, x_w = torch.split(hw, [h, w], dim=2)
    x1 = m.gn(group_x * x_h.sigmoid() * x_w.permute(0, 1, 3, 2).sigmoid())
    x2 = m.conv3x3(group_x)
    x11 = m.softmax(m.agp(x1).reshape(b * g, -1, 1).permute(0, 2, 1))  # (B·g, 1, c/g)
    x12 = x2.reshape(b * g, c // g, -1)  # (B·g, c/g, HW)
    x21 = m.softmax(m.agp(x2).reshape(b * g, -1, 1).permute(0, 2, 1))
    x22 = x1.reshape(b * g, c // g, -1)
    weights = (torch.matmul(x11, x12) + torch.matmul(x21, x22)).reshape(b * g, 1, h, w)
    return (group_x * weights.sigmoid()).reshape(b, c, h, w)


def _reference(m: EMA, x: Tensor) -> Tensor:
    return _ema(m, x, m.pool_h, m.pool_w)


def _onnx(m: EMA, x: Tensor) -> Tensor:
    # ReduceMean instead of adaptive pooling, which ONNX cannot export with a traced output size
    return _ema(m, x, lambda t: t.mean(3, keepdim=True), lambda t: t.mean(2, keepdim=True))


def _fused(m: EMA, x: Tensor) -> Tensor:
    """The official math with the 3×3 branch as one grouped conv over all groups (channels-last on the CPU).

    The official code runs its 3×3 conv on B·g micro-images of c/g channels (often 2), where oneDNN is slow
    (its backward is ~20 ms at 64 channels and 80×80 on one thread); a conv with ``groups=g`` and the weights
    tiled g times computes the same, in ~6 ms channels-last. Everything else is the official code on the
    (B·g, c/g, H, W) view, with ``mean`` for the profile pools (exportable; equal to fp32 rounding).
    """
    b, c, h, w = x.shape
    g = m.groups
    cg = c // g
    group_x = x.reshape(b * g, cg, h, w)
    x_h = group_x.mean(3, keepdim=True)  # (B·g, c/g, H, 1)
    x_w = group_x.mean(2, keepdim=True).permute(0, 1, 3, 2)  # (B·g, c/g, W, 1)
    hw = m.conv1x1(torch.cat([x_h, x_w], dim=2))
    x_h, x_w = torch.split(hw, [h, w], dim=2)
    x1 = m.gn(group_x * x_h.sigmoid() * x_w.permute(0, 1, 3, 2).sigmoid())  # (B·g, c/g, H, W)
    conv_in = x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x
    x2 = F.conv2d(conv_in, m.conv3x3.weight.repeat(g, 1, 1, 1), m.conv3x3.bias.repeat(g), padding=1, groups=g)
    s1 = torch.softmax(x1.mean((2, 3)), dim=-1)  # (B·g, c/g): x1's pooled descriptor weights x2
    s2 = torch.softmax(x2.mean((2, 3)).reshape(b * g, cg), dim=-1)  # and x2's weights x1
    # Σ_i s1[i]·x2[i] over each group's channels, reduced where x2's layout has them (innermost if channels-last)
    if x2.is_contiguous(memory_format=torch.channels_last) and not x2.is_contiguous():
        a = (x2.permute(0, 2, 3, 1).reshape(b, h * w, g, cg) * s1.reshape(b, 1, g, cg)).sum(-1)  # (B, HW, g)
        a = a.transpose(1, 2).reshape(b * g, 1, h * w)
    else:
        a = torch.bmm(s1.unsqueeze(1), x2.reshape(b * g, cg, h * w))
    weights = (a + torch.bmm(s2.unsqueeze(1), x1.reshape(b * g, cg, h * w))).reshape(b * g, 1, h, w)
    return (group_x * weights.sigmoid()).reshape(b, c, h, w)


def _only_when_exporting(m: EMA, x: Tensor) -> str | None:
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return None
    return "'auto' uses it only under ONNX export or tracing (the reference gives the official numbers bit for bit)"


def _fused_auto_skip(m: EMA, x: Tensor) -> str | None:
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return "under export 'auto' uses the 'onnx' backend (the official sequence of ops)"
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or m.conv3x3.weight.requires_grad)
    if not needs_grad or x.shape[2] * x.shape[3] <= _FUSED_MIN_PIXELS:
        return "it only pays off in training on large maps (measured: forward alone and maps up to 40x40 are no faster)"
    return None


# 'auto' takes the fused backend for training on maps larger than this (YOLOv8n's P3 at 640: 80x80)
_FUSED_MIN_PIXELS = 1600

EMA_OP.register("fused", auto_skip=_fused_auto_skip)(_fused)
EMA_OP.register("onnx", auto_skip=_only_when_exporting)(_onnx)
EMA_OP.register("reference")(_reference)

EfficientMultiScaleAttention = EMA
