"""Channel-Prior Convolutional Attention (CPCA) from CPCANet (Huang et al., 2023).

A 1×1 conv and GELU, then a channel prior (a shared two-layer MLP on the average- and the
max-pooled map, each through its own sigmoid, the two added), then a multi-scale depthwise
pyramid (5×5, and 1×7/7×1, 1×11/11×1, 1×21/21×1 strip pairs on the 5×5 output) whose sum, mixed by
a 1×1 conv, gates the map; a last 1×1 conv projects the result.

:class:`CPCA` reproduces the official ``RepBlock`` of CPCANet (Cuthbert-Huang/CPCANet,
``CPCANet/nnunet/network_architecture/CPCANet.py``): constructor, defaults, state_dict keys and
outputs. ``RepBlock`` is an alias. Its channel attention is :class:`CPCAChannelAttention` (the
official ``ChannelAttention``, renamed because Ultralytics has a different class of that name).

Quirks of the official code, kept so its weights give its numbers:

- **one 1×1 conv (``conv``) is used three times per forward**: before the channel prior, to mix the
  pyramid's sum into the spatial attention, and to project the gated map. Its gradient is the sum
  of the three uses; the state_dict has one ``conv.weight``/``conv.bias``;
- the spatial "attention" has no sigmoid (it is a linear map of the pyramid's sum);
- the channel weights are ``σ(mlp(avg)) + σ(mlp(max))``, in (0, 2), not CBAM's ``σ(mlp(avg) + mlp(max))``;
- there is no residual inside (CPCANet's ``Block`` adds ``x + drop_path(RepBlock(bn(x)))`` outside).

Differences from the official code, deliberate:

- ``out_channels`` defaults to ``in_channels`` (the official code requires it and asserts equality),
  so ``CPCA(c)`` works; a different value raises ``ValueError``;
- ``in_channels < channelAttention_reduce`` (a zero-width MLP) raises ``ValueError``.

Any H, W ≥ 1 works, and the layer exports to ONNX with dynamic H/W (global pools only).

Backends (``set_backend(cpca=...)``): ``'fused'`` (default) and ``'reference'`` (the official sequence
of modules). ``'fused'`` computes the three 1×1 convs as GEMMs writing channels-last maps, runs the
depthwise pyramid channels-last with :mod:`yoloattn.nn.msca`'s fast depthwise weight gradients, runs
the channel MLP once on the stacked average and max vectors, adds the branches in place in the
official order and writes the output NCHW (in training through one copy whose backward stays
channels-last). It equals the reference to fp32 rounding, not bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_image, positive_int
from .backends import Op
from .msca import _custom_backward, conv_channels_last, depthwise, is_channels_last, nchw_output, pointwise, strip_pairs

__all__ = ["CPCA", "CPCA_OP", "CPCAChannelAttention", "CPCA_ChannelAttention", "RepBlock"]

# backends: 'fused' (GEMM 1x1 convs, channels-last depthwise pyramid) and 'reference' (the official modules)
CPCA_OP = Op("cpca")


class CPCAChannelAttention(nn.Module):
    """CPCANet's channel prior: ``σ(fc2(relu(fc1(avg(x))))) + σ(fc2(relu(fc1(max(x)))))``.

    Returns the weights, not the weighted map (the block multiplies once).

    Args:
        input_channels: channels of the map.
        internal_neurons: hidden width of the shared MLP (``fc1``/``fc2`` are 1×1 convs).

    Shapes:
        inputs: (N, C, H, W) -> (N, C, 1, 1), values in (0, 2).
    """

    def __init__(self, input_channels: int, internal_neurons: int):
        super().__init__()
        positive_int("input_channels", input_channels)
        positive_int("internal_neurons", internal_neurons)
        self.fc1 = nn.Conv2d(input_channels, internal_neurons, kernel_size=1, stride=1, bias=True)
        self.fc2 = nn.Conv2d(internal_neurons, input_channels, kernel_size=1, stride=1, bias=True)
        self.input_channels = input_channels

    def forward(self, inputs: Tensor) -> Tensor:
        """inputs: (N, C, H, W) -> (N, C, 1, 1)."""
        check_image(inputs, self, self.input_channels)
        return _channel_prior_reference(self, inputs)


def _channel_prior_reference(ca: CPCAChannelAttention, inputs: Tensor) -> Tensor:
    avg = torch.sigmoid(ca.fc2(F.relu(ca.fc1(F.adaptive_avg_pool2d(inputs, 1)))))
    peak = torch.sigmoid(ca.fc2(F.relu(ca.fc1(F.adaptive_max_pool2d(inputs, 1)))))
    return (avg + peak).view(-1, ca.input_channels, 1, 1)


def _channel_prior_fused(ca: CPCAChannelAttention, inputs: Tensor) -> Tensor:
    """The same, the MLP run once on the stacked (2N, C) average and max vectors."""
    n, c = inputs.shape[:2]
    # adaptive_max_pool2d (not amax): its gradient goes to one maximum on ties, as the official code's
    pooled = torch.cat([F.adaptive_avg_pool2d(inputs, 1), F.adaptive_max_pool2d(inputs, 1)]).view(2 * n, c)
    hidden = F.relu(F.linear(pooled, ca.fc1.weight.flatten(1), ca.fc1.bias))
    weights = torch.sigmoid(F.linear(hidden, ca.fc2.weight.flatten(1), ca.fc2.bias))
    return (weights[:n] + weights[n:]).view(n, c, 1, 1)


class CPCA(nn.Module):
    """CPCANet's channel-prior convolutional attention block (``RepBlock``).

    Args:
        in_channels: input (and output) channels.
        out_channels: must equal ``in_channels`` (the official signature has it); None means ``in_channels``.
        channelAttention_reduce: the channel MLP's hidden width is ``in_channels // channelAttention_reduce``
            (CPCANet's configs use 8 and 16; the class default is 4).
        backend: ``None`` (follow :func:`yoloattn.nn.set_backend`), ``'auto'``, ``'fused'`` or ``'reference'``.

    Shapes:
        inputs: (N, C, H, W) -> (N, C, H, W), any H, W >= 1.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, channelAttention_reduce: int = 4, *,
                 backend: str | None = None):
        super().__init__()
        positive_int("in_channels", in_channels)
        out_channels = in_channels if out_channels is None else positive_int("out_channels", out_channels)
        if out_channels != in_channels:
            raise ValueError(f"CPCA keeps the channel count: out_channels={out_channels} must equal "
                             f"in_channels={in_channels} (pass channelAttention_reduce as the third argument "
                             f"or by keyword)")
        positive_int("channelAttention_reduce", channelAttention_reduce)
        if in_channels // channelAttention_reduce < 1:
            raise ValueError(f"in_channels={in_channels} // channelAttention_reduce={channelAttention_reduce} is 0: "
                             f"the channel MLP would have no hidden units; use channelAttention_reduce <= "
                             f"{in_channels}")
        CPCA_OP.check_name(backend)
        self.C = in_channels
        self.O = out_channels
        self.backend = backend
        c = in_channels
        self.ca = CPCAChannelAttention(input_channels=c, internal_neurons=c // channelAttention_reduce)
        self.dconv5_5 = nn.Conv2d(c, c, kernel_size=5, padding=2, groups=c)
        self.dconv1_7 = nn.Conv2d(c, c, kernel_size=(1, 7), padding=(0, 3), groups=c)
        self.dconv7_1 = nn.Conv2d(c, c, kernel_size=(7, 1), padding=(3, 0), groups=c)
        self.dconv1_11 = nn.Conv2d(c, c, kernel_size=(1, 11), padding=(0, 5), groups=c)
        self.dconv11_1 = nn.Conv2d(c, c, kernel_size=(11, 1), padding=(5, 0), groups=c)
        self.dconv1_21 = nn.Conv2d(c, c, kernel_size=(1, 21), padding=(0, 10), groups=c)
        self.dconv21_1 = nn.Conv2d(c, c, kernel_size=(21, 1), padding=(10, 0), groups=c)
        self.conv = nn.Conv2d(c, c, kernel_size=(1, 1), padding=0)
        self.act = nn.GELU()

    def extra_repr(self) -> str:
        return f"channels={self.C}, hidden={self.ca.fc1.out_channels}"

    def forward(self, inputs: Tensor) -> Tensor:
        """inputs: (N, C, H, W) -> (N, C, H, W)."""
        check_image(inputs, self, self.C)
        return CPCA_OP(self, inputs, backend=self.backend)

    def strips(self) -> tuple[tuple[nn.Conv2d, nn.Conv2d], ...]:
        """The (horizontal, vertical) strip-conv pairs in the official order."""
        return ((self.dconv1_7, self.dconv7_1), (self.dconv1_11, self.dconv11_1), (self.dconv1_21, self.dconv21_1))


def _reference(block: CPCA, inputs: Tensor) -> Tensor:
    inputs = block.act(block.conv(inputs))  # shared conv, use 1
    inputs = block.ca(inputs) * inputs
    x_init = block.dconv5_5(inputs)
    x_1 = block.dconv7_1(block.dconv1_7(x_init))
    x_2 = block.dconv11_1(block.dconv1_11(x_init))
    x_3 = block.dconv21_1(block.dconv1_21(x_init))
    x = x_1 + x_2 + x_3 + x_init  # ((x1 + x2) + x3) + x_init: the 5x5 output last
    spatial_att = block.conv(x)  # use 2
    return block.conv(spatial_att * inputs)  # use 3


def _fused(block: CPCA, inputs: Tensor) -> Tensor:
    cl = conv_channels_last(inputs)
    weight, bias = block.conv.weight, block.conv.bias
    u = F.gelu(pointwise(weight, bias, inputs, channels_last=cl))  # (N, C, H, W), channels-last on the CPU
    u = _channel_prior_fused(block.ca, u) * u
    x_init = depthwise(block.dconv5_5, u)
    x_1, x_2, x_3 = strip_pairs(block.strips(), x_init)
    # ((x1 + x2) + x3) + x_init accumulated into x1: a conv's backward needs its input, not its output,
    # and an add's backward needs neither operand, so this is autograd-safe and bit-identical
    total = x_1.add_(x_2)
    total.add_(x_3)
    total.add_(x_init)
    gated = pointwise(weight, bias, total, channels_last=cl) * u
    if cl and not is_channels_last(inputs) and _custom_backward(inputs, weight):  # training: see nchw_output
        return nchw_output(pointwise(weight, bias, gated, channels_last=True))
    return pointwise(weight, bias, gated, channels_last=is_channels_last(inputs))


CPCA_OP.register("fused")(_fused)
CPCA_OP.register("reference")(_reference)

# official names (CPCA_ChannelAttention is the YOLO community's name for the sub-block)
RepBlock = CPCA
CPCA_ChannelAttention = CPCAChannelAttention
