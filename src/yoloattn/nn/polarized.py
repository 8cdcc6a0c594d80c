"""Polarized Self-Attention (PSA, Liu et al., 2021), parallel and sequential layouts.

Two branches, each keeping full resolution in the dimension it does not collapse:

- channel-only: a 1-channel query is softmaxed over H·W and pools a half-width value map into a
  context vector; a 1×1 "up" conv and a sigmoid give per-channel weights ``mask_ch (N, C, 1, 1)``;
- spatial-only: the globally averaged half-width query is dotted with a half-width value map at every
  pixel; a softmax over H·W and a sigmoid give per-pixel weights ``mask_sp (N, 1, H, W)``.

The parallel layout returns ``x·mask_sp(x) + x·mask_ch(x)``; the sequential layout returns
``t·mask_sp(t)`` with ``t = x·mask_ch(x)``. No residual in either.

:class:`PSA_p` and :class:`PSA_s` reproduce the official classes of the same names
(DeLightCMU/PSA, ``semantic-segmentation/network/PSA.py``): constructor
``(inplanes, planes, kernel_size=1, stride=1)``, initialisation (``kaiming_normal_``, fan-in, on the
four input convs), state_dict keys and outputs. :class:`PolarizedSelfAttention` is the YOLO-facing
name, ``PolarizedSelfAttention(channels, mode='p'|'s')``, with the keys of the matching class. (The
name ``PSA`` is never used: Ultralytics' YOLOv10/11 block has it.)

Quirks of the official code, kept so its weights give its numbers:

- **the branch methods are named after what they pool, not what they attend**: ``spatial_pool``
  (the ``*_right`` convs) is the paper's *channel-only* branch and ``channel_pool`` (the ``*_left``
  convs) the paper's *spatial-only* branch (upstream issue DeLightCMU/PSA#5). The keys keep the
  official names; the docstrings below say which branch is which;
- in ``PSA_p`` the channel-only branch has no LayerNorm before its sigmoid (the paper has one), and
  the spatial-only branch softmaxes ``g·Θ`` over H·W after the product (the paper softmaxes the
  pooled query over channels before it). The softmax values sum to 1 over H·W, so this mask is
  close to σ(1/HW) ≈ 0.5 everywhere;
- in ``PSA_s`` the "up" conv is a bottleneck ``C/2 → C/8 → C`` with LayerNorm and ReLU, and the
  spatial-only branch softmaxes each value channel over H·W before the product.

Differences from the official code, deliberate:

- ``planes`` must equal ``inplanes`` and ``stride`` must be 1 (``ValueError``): the official code
  builds other values and then fails in the forward (``x * mask`` cannot broadcast);
- ``planes`` must be at least 2 (``PSA_p``) or 8 (``PSA_s``): below that a conv has no channels;
- ``kernel_size`` is accepted and stored, and unused, as in the official code (every conv is 1×1).

Any H, W ≥ 1 works; ONNX export with dynamic H/W works (global average pooling, softmax, matmul,
LayerNorm).

Backends (``set_backend(polarized_attention=...)``): ``'fused'`` (default) uses that all four input
convs are bias-free 1×1 convs, so they commute with the pooling: the channel-only context is
``W_v·(X·q)`` (the input pooled by the query first), the spatial-only query is ``W_q·mean(X)``, and in
``PSA_p`` the spatial logits are ``(W_vᵀ·g)ᵀ·X``; the only products over the full map are then a
two-row product and a pooling (``PSA_p``) or one half-width product whose weights absorb the channel
mask (``PSA_s``). Same math, equal to the reference to fp32 rounding. ``'reference'`` is the official code.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ._checks import check_image, choice, positive_int
from .backends import Op

__all__ = ["POLARIZED_ATTENTION", "PSA_p", "PSA_s", "PolarizedSelfAttention"]

# backends: 'fused' (convs folded into the pooling, exact algebra) and 'reference' (the official code)
POLARIZED_ATTENTION = Op("polarized_attention")

MODES = ("p", "s")
_RATIO = 4  # PSA_s's bottleneck: inter -> inter // 4


class PolarizedSelfAttention(nn.Module):
    """Polarized self-attention, parallel (``mode='p'``, keys of ``PSA_p``) or sequential (``'s'``, ``PSA_s``).

    Args:
        channels: input (and output) channels; at least 2 (``'p'``) or 8 (``'s'``).
        mode: ``'p'`` (parallel: ``x·mask_sp + x·mask_ch``) or ``'s'`` (sequential: channel, then spatial).
        backend: ``None`` (follow :func:`yoloattn.nn.set_backend`), ``'auto'``, ``'fused'`` or ``'reference'``.

    Shapes:
        x: (N, channels, H, W) -> (N, channels, H, W), any H, W >= 1.
    """

    def __init__(self, channels: int, mode: str = "p", *, backend: str | None = None):
        super().__init__()
        positive_int("channels", channels)
        choice("mode", mode, MODES)
        minimum = 2 if mode == "p" else 2 * _RATIO
        if channels < minimum:
            raise ValueError(f"{type(self).__name__} with mode={mode!r} needs at least {minimum} channels (its "
                             f"half-width{'' if mode == 'p' else ' and bottleneck'} convs would have none), got "
                             f"{channels}")
        POLARIZED_ATTENTION.check_name(backend)
        self.mode = mode
        self.backend = backend
        self.inplanes = channels
        self.inter_planes = channels // 2
        self.planes = channels
        inter = self.inter_planes

        # registration order as the official classes (it fixes the state_dict order)
        self.conv_q_right = nn.Conv2d(channels, 1, kernel_size=1, stride=1, padding=0, bias=False)
        self.conv_v_right = nn.Conv2d(channels, inter, kernel_size=1, stride=1, padding=0, bias=False)
        if mode == "p":
            self.conv_up = nn.Conv2d(inter, channels, kernel_size=1, stride=1, padding=0, bias=False)
        else:
            self.conv_up = nn.Sequential(
                nn.Conv2d(inter, inter // _RATIO, kernel_size=1),
                nn.LayerNorm([inter // _RATIO, 1, 1]),
                nn.ReLU(inplace=True),
                nn.Conv2d(inter // _RATIO, channels, kernel_size=1),
            )
        self.softmax_right = nn.Softmax(dim=2)
        self.sigmoid = nn.Sigmoid()
        self.conv_q_left = nn.Conv2d(channels, inter, kernel_size=1, stride=1, padding=0, bias=False)  # g
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_v_left = nn.Conv2d(channels, inter, kernel_size=1, stride=1, padding=0, bias=False)  # theta
        self.softmax_left = nn.Softmax(dim=2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: He-normal (fan-in, ReLU gain) on the four input convs."""
        for conv in (self.conv_q_right, self.conv_v_right, self.conv_q_left, self.conv_v_left):
            nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in", nonlinearity="relu")
            conv.inited = True

    def extra_repr(self) -> str:
        return f"channels={self.inplanes}, mode={self.mode!r}"

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) -> (N, C, H, W)."""
        check_image(x, self, self.inplanes)
        return POLARIZED_ATTENTION(self, x, backend=self.backend)

    # -- the official branch methods (reference math), named as in the official code -----------------------------
    def spatial_pool(self, x: Tensor) -> Tensor:
        """The paper's **channel-only** branch (official name kept): ``x * mask_ch``, mask (N, C, 1, 1)."""
        input_x = self.conv_v_right(x)  # (N, C/2, H, W)
        batch, channel, height, width = input_x.shape
        input_x = input_x.reshape(batch, channel, height * width)
        context_mask = self.softmax_right(self.conv_q_right(x).reshape(batch, 1, height * width))  # (N, 1, HW)
        context = torch.matmul(input_x, context_mask.transpose(1, 2)).unsqueeze(-1)  # (N, C/2, 1, 1)
        mask_ch = self.sigmoid(self.conv_up(context))  # (N, C, 1, 1)
        return x * mask_ch

    def channel_pool(self, x: Tensor) -> Tensor:
        """The paper's **spatial-only** branch (official name kept): ``x * mask_sp``, mask (N, 1, H, W)."""
        g_x = self.conv_q_left(x)  # (N, C/2, H, W)
        batch, channel, height, width = g_x.shape
        avg_x = self.avg_pool(g_x).reshape(batch, channel, 1).permute(0, 2, 1)  # (N, 1, C/2)
        theta_x = self.conv_v_left(x).reshape(batch, self.inter_planes, height * width)  # (N, C/2, HW)
        if self.mode == "p":
            context = self.softmax_left(torch.matmul(avg_x, theta_x))  # softmax after the product, over HW
        else:
            context = torch.matmul(avg_x, self.softmax_left(theta_x))  # softmax of each channel, over HW
        mask_sp = self.sigmoid(context.reshape(batch, 1, height, width))
        return x * mask_sp


def _reference(m: PolarizedSelfAttention, x: Tensor) -> Tensor:
    if m.mode == "p":
        context_channel = m.spatial_pool(x)
        context_spatial = m.channel_pool(x)
        return context_spatial + context_channel
    return m.channel_pool(m.spatial_pool(x))


def _fused(m: PolarizedSelfAttention, x: Tensor) -> Tensor:
    n, c, h, w = x.shape
    flat = x.flatten(2)  # (N, C, HW): a view for NCHW and channels-last input
    dtype = x.dtype
    w_q_right = m.conv_q_right.weight.reshape(1, c).to(dtype)
    w_v_right = m.conv_v_right.weight.reshape(-1, c).to(dtype)
    w_q_left = m.conv_q_left.weight.reshape(-1, c).to(dtype)
    w_v_left = m.conv_v_left.weight.reshape(-1, c).to(dtype)
    mean = flat.mean(2)  # (N, C)
    if m.mode == "p":
        # spatial-only logits g·(W_v X) = (W_vᵀ g)ᵀ X with g = W_q mean(X): both branches' logits in one product
        g = torch.matmul(mean, w_q_left.t())  # (N, C/2)
        rows = torch.cat([w_q_right.expand(n, 1, c), torch.matmul(g, w_v_left).unsqueeze(1)], dim=1)  # (N, 2, C)
        logits = torch.bmm(rows, flat)  # (N, 2, HW)
        query = torch.softmax(logits[:, :1], dim=2)  # (N, 1, HW), the channel-only query
        mask_sp = torch.sigmoid(torch.softmax(logits[:, 1:], dim=2)).reshape(n, 1, h, w)
        context = torch.matmul(w_v_right, torch.bmm(flat, query.transpose(1, 2)))  # W_v (X q): (N, C/2, 1)
        mask_ch = torch.sigmoid(m.conv_up(context.unsqueeze(-1)))  # (N, C, 1, 1)
        return x * (mask_sp + mask_ch)
    query = torch.softmax(torch.matmul(w_q_right, flat), dim=2)  # (N, 1, HW)
    context = torch.matmul(w_v_right, torch.bmm(flat, query.transpose(1, 2)))  # (N, C/2, 1)
    mask_ch = torch.sigmoid(m.conv_up(context.unsqueeze(-1)))  # (N, C, 1, 1)
    # the spatial-only branch sees t = x·mask_ch: mean(t) = mask_ch·mean(x) and W_v t = (W_v·diag(mask_ch)) x
    scale = mask_ch.reshape(n, 1, c)
    g = torch.matmul(mean.unsqueeze(1) * scale, w_q_left.t())  # (N, 1, C/2)
    theta = torch.softmax(torch.bmm(w_v_left * scale, flat), dim=2)  # (N, C/2, HW)
    mask_sp = torch.sigmoid(torch.bmm(g, theta)).reshape(n, 1, h, w)
    return x * mask_ch * mask_sp


POLARIZED_ATTENTION.register("fused")(_fused)
POLARIZED_ATTENTION.register("reference")(_reference)


class _OfficialPSA(PolarizedSelfAttention):
    """The official constructor ``(inplanes, planes, kernel_size=1, stride=1)``; subclasses fix the mode.

    Args:
        inplanes: input channels.
        planes: output channels; must equal ``inplanes`` (the masks multiply the input).
        kernel_size: unused (stored), as in the official code; every conv is 1×1.
        stride: must be 1 (the official code builds other strides, then fails in the forward).
        backend: as :class:`PolarizedSelfAttention`.
    """

    _MODE = ""

    def __init__(self, inplanes: int, planes: int, kernel_size: int = 1, stride: int = 1, *,
                 backend: str | None = None):
        positive_int("inplanes", inplanes)
        positive_int("planes", planes)
        positive_int("kernel_size", kernel_size)
        positive_int("stride", stride)
        name = type(self).__name__
        if planes != inplanes:
            raise ValueError(f"{name} multiplies its input by the masks: planes={planes} must equal "
                             f"inplanes={inplanes}")
        if stride != 1:
            raise ValueError(f"{name} needs stride=1 (the masks multiply the full-size input), got stride={stride}")
        super().__init__(inplanes, mode=self._MODE, backend=backend)
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = (kernel_size - 1) // 2


class PSA_p(_OfficialPSA):  # noqa: N801 (the official name)
    """The official parallel PSA: ``PSA_p(inplanes, planes, kernel_size=1, stride=1)``; ``planes >= 2``.

    Args: as :class:`_OfficialPSA` (``planes == inplanes``, ``stride == 1``, ``kernel_size`` unused).
    """

    _MODE = "p"


class PSA_s(_OfficialPSA):  # noqa: N801 (the official name)
    """The official sequential PSA: ``PSA_s(inplanes, planes, kernel_size=1, stride=1)``; ``planes >= 8``.

    Args: as :class:`_OfficialPSA` (``planes == inplanes``, ``stride == 1``, ``kernel_size`` unused).
    """

    _MODE = "s"
