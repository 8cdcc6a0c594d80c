"""Deformable Large Kernel Attention (D-LKA, Azad et al., WACV 2024), the 2D module.

LKA (a 5x5 depthwise conv, then a 7x7 depthwise conv with dilation 3, then a 1x1 conv, multiplied onto
the input) with both depthwise convs made deformable: a plain conv predicts, for every output pixel,
an offset for each kernel tap, and the input is sampled there by bilinear interpolation (DCNv1).
``deformable_LKA_Attention`` wraps it in 1x1 projections, GELU and a residual.

:class:`deformable_LKA_Attention` (alias :class:`DLKA`), :class:`deformable_LKA` and :class:`DeformConv`
reproduce the classes of the official repository (``xmindflow/deformableLKA``,
``2D/deformable_LKA/deformable_LKA.py``): the same constructors, defaults and ``state_dict`` keys, NCHW
in and out. The deformable convolution itself is :class:`DeformableConv2d`, a pure-PyTorch module with
``torchvision.ops.DeformConv2d``'s weight layout and initialisation; torchvision is optional.

Deliberate differences from the official code:

- torchvision is not needed to build or run the layers (the official file imports it, and fvcore, at
  module level; copies of it also carry a ``DeformConv_3x3`` whose ``super()`` call is wrong, which is not
  reproduced);
- ``DeformConv`` accepts an int ``kernel_size`` (the official code indexes it and needs a tuple);
- the layers export to ONNX: ``torchvision.ops.deform_conv2d`` has no ONNX operator, so under
  ``torch.onnx.export``/``torch.jit.trace`` the sampling runs as ``grid_sample`` (opset >= 16) plus a
  product with the weights.

Kept: ``DeformConv``'s ``bias`` argument is accepted and unused (no bias key, as the official module), the
offsets are not zero-initialised (PyTorch's default conv init), the clones in the official forward are
dropped (they change nothing).

Backends of the deformable convolution (``set_backend(deform_conv2d=...)``), all the same function
(torchvision's sampling: zero outside the image, finite for H or W = 1):

- ``'torchvision'``: ``torchvision.ops.deform_conv2d``. Chosen by ``'auto'`` on CUDA; on the CPU its
  kernel measured 3-4x slower forward and about 7x slower forward+backward than ``'grid_sample'`` for
  D-LKA at YOLOv8n's P3-P5, so ``'auto'`` passes it over there. Not used under export/tracing (no ONNX operator); bf16 runs in fp32
  (torchvision has no bf16 kernel);
- ``'grid_sample'``: one ``F.grid_sample`` call for all taps (``align_corners=False`` normalisation, so a
  size-1 axis needs no division by zero), then the per-channel weighted sum; ``'auto'`` on the CPU and
  under export. It declines in deterministic mode on CUDA when gradients are needed (grid_sample's
  CUDA backward has no deterministic kernel). For training it keeps the ``k²`` samples of every pixel
  for the weight gradient (about 2x torchvision's peak memory at P3);
- ``'reference'``: the bilinear interpolation written out with gathers, as torchvision's kernel does it
  (floor, four corner weights, each corner zero outside the image), then the grouped product.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_image, flag, is_int, positive_int
from .backends import Decline, Op

__all__ = ["DEFORM_CONV2D", "DLKA", "DeformConv", "DeformableConv2d", "deform_conv2d", "deformable_LKA",
           "deformable_LKA_Attention"]

# backends: 'torchvision' (CUDA), 'grid_sample' (CPU, export) and 'reference' (explicit bilinear gathers)
DEFORM_CONV2D = Op("deform_conv2d")


def _pair(name: str, value, minimum: int) -> tuple[int, int]:
    if is_int(value):
        value = (value, value)
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise TypeError(f"{name} must be an integer or a pair of integers, got {value!r}")
    for v in value:
        positive_int(name, v, minimum)
    return int(value[0]), int(value[1])


@lru_cache(maxsize=1)
def _torchvision_deform_conv2d():
    try:
        from torchvision.ops import deform_conv2d as fn
    except Exception:  # noqa: BLE001 - any import failure means: not available
        return None
    return fn


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _needs_grad(m: DeformableConv2d, x: Tensor, offset: Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or offset.requires_grad or m.weight.requires_grad)


def deform_conv2d(x: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                  dilation=1, *, backend: str | None = None) -> Tensor:
    """Deformable convolution (DCNv1), ``torchvision.ops.deform_conv2d``'s semantics without a mask.

    Args:
        x: (N, Cin, H, W).
        offset: (N, 2·og·kh·kw, Ho, Wo); channel ``g·2K + 2k`` is the row (y) offset and ``g·2K + 2k + 1`` the
            column (x) offset of tap k = i·kw + j of offset group g.
        weight: (Cout, Cin / groups, kh, kw).
        bias: (Cout,) or None.
        stride, padding, dilation: ints or pairs.
        backend: a backend name for this call (``None``: the process-wide choice).

    Returns:
        (N, Cout, Ho, Wo).
    """
    conv = _Functional(weight, bias, _pair("stride", stride, 1), _pair("padding", padding, 0),
                       _pair("dilation", dilation, 1))
    return DEFORM_CONV2D(conv, x, offset, backend=backend)


class _Functional:
    """The attributes the backends read, for :func:`deform_conv2d` without a module."""

    def __init__(self, weight, bias, stride, padding, dilation):
        self.weight, self.bias, self.stride, self.padding, self.dilation = weight, bias, stride, padding, dilation


def _geometry(m, x: Tensor, offset: Tensor):
    kh, kw = m.weight.shape[-2:]
    groups = x.shape[1] // m.weight.shape[1]
    offset_groups = offset.shape[1] // (2 * kh * kw)
    return kh, kw, groups, offset_groups


def _coordinates(m, offset: Tensor, kh: int, kw: int, og: int, dtype: torch.dtype):
    """Sampling rows and columns, (N, og, K, Ho, Wo) each, in pixels (pixel centres at integers)."""
    b, _, ho, wo = offset.shape
    (sh, sw), (ph, pw), (dh, dw) = m.stride, m.padding, m.dilation
    device = offset.device
    off = offset.to(dtype).reshape(b, og, kh * kw, 2, ho, wo)
    rows = (torch.arange(kh, device=device, dtype=dtype) * dh).reshape(kh, 1, 1, 1) \
        + (torch.arange(ho, device=device, dtype=dtype) * sh - ph).reshape(1, 1, ho, 1)
    cols = (torch.arange(kw, device=device, dtype=dtype) * dw).reshape(1, kw, 1, 1) \
        + (torch.arange(wo, device=device, dtype=dtype) * sw - pw).reshape(1, 1, 1, wo)
    base_y = rows.expand(kh, kw, ho, wo).reshape(1, 1, kh * kw, ho, wo)
    base_x = cols.expand(kh, kw, ho, wo).reshape(1, 1, kh * kw, ho, wo)
    return base_y + off[:, :, :, 0], base_x + off[:, :, :, 1]


def _weighted_sum(m, samples: Tensor, groups: int, ho, wo) -> Tensor:
    """samples (N, Cin, K, L) -> (N, Cout, Ho, Wo): the grouped product with the weights, plus the bias."""
    b, cin, k, length = samples.shape
    weight = m.weight.to(samples.dtype)
    cout = weight.shape[0]
    if groups == cin and cout == cin:  # depthwise, as D-LKA: out[c] = sum_k w[c, k] · s[c, k]
        out = torch.matmul(weight.reshape(cin, 1, k), samples).reshape(b, cout, ho, wo)
    else:
        cols = samples.reshape(b, groups, (cin // groups) * k, length)
        out = torch.matmul(weight.reshape(groups, cout // groups, (cin // groups) * k), cols).reshape(b, cout, ho, wo)
    if m.bias is not None:
        out = out + m.bias.to(out.dtype).reshape(1, -1, 1, 1)
    return out


def _compute_dtype(x: Tensor) -> torch.dtype:
    # half-precision coordinates would be off by a sizeable fraction of a pixel at YOLO sizes
    return torch.promote_types(x.dtype, torch.float32)


def _grid_sample(m, x: Tensor, offset: Tensor) -> Tensor:
    """All taps in one grid_sample call, then the weighted sum."""
    b, cin, h, w = x.shape
    kh, kw, groups, og = _geometry(m, x, offset)
    ho, wo = offset.shape[-2], offset.shape[-1]
    dtype = _compute_dtype(x)
    y, xs = _coordinates(m, offset, kh, kw, og, dtype)
    # align_corners=False: pixel p sits at (2p + 1) / size - 1, no division by size - 1 (size 1 works)
    hs = torch.as_tensor(h, dtype=dtype, device=x.device)
    ws = torch.as_tensor(w, dtype=dtype, device=x.device)
    grid = torch.stack(((2 * xs + 1) / ws - 1, (2 * y + 1) / hs - 1), dim=-1).reshape(b * og, kh * kw * ho, wo, 2)
    samples = F.grid_sample(x.to(dtype).reshape(b * og, cin // og, h, w), grid, mode="bilinear",
                            padding_mode="zeros", align_corners=False)  # (N·og, Cin/og, K·Ho, Wo)
    out = _weighted_sum(m, samples.reshape(b, cin, kh * kw, ho * wo), groups, ho, wo)
    return out.to(x.dtype)


def _reference(m, x: Tensor, offset: Tensor) -> Tensor:
    """torchvision's bilinear sampling written out: floor, four corners, each zero outside the image."""
    b, cin, h, w = x.shape
    kh, kw, groups, og = _geometry(m, x, offset)
    ho, wo = offset.shape[-2], offset.shape[-1]
    k = kh * kw
    dtype = _compute_dtype(x)
    y, xs = _coordinates(m, offset, kh, kw, og, dtype)  # (N, og, K, Ho, Wo)
    y0, x0 = torch.floor(y), torch.floor(xs)
    ly, lx = y - y0, xs - x0
    hy, hx = 1 - ly, 1 - lx
    flat = x.to(dtype).reshape(b, og, cin // og, h * w)
    samples = None
    for dy, dx, weight in ((0, 0, hy * hx), (0, 1, hy * lx), (1, 0, ly * hx), (1, 1, ly * lx)):
        yc, xc = y0 + dy, x0 + dx
        inside = (yc >= 0) & (yc <= h - 1) & (xc >= 0) & (xc <= w - 1)
        index = (yc.clamp(0, h - 1) * w + xc.clamp(0, w - 1)).long().reshape(b, og, 1, k * ho * wo)
        values = torch.gather(flat, 3, index.expand(b, og, cin // og, k * ho * wo))
        term = values * torch.where(inside, weight, 0.0).reshape(b, og, 1, k * ho * wo)
        samples = term if samples is None else samples + term
    out = _weighted_sum(m, samples.reshape(b, cin, k, ho * wo), groups, ho, wo)
    return out.to(x.dtype)


def _torchvision(m, x: Tensor, offset: Tensor) -> Tensor:
    fn = _torchvision_deform_conv2d()
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64, torch.float16) else torch.float32  # no bf16 kernel
    bias = None if m.bias is None else m.bias.to(dtype)
    out = fn(x.to(dtype), offset.to(dtype), m.weight.to(dtype), bias, stride=m.stride, padding=m.padding,
             dilation=m.dilation)
    return out.to(x.dtype)


def _torchvision_can_run(m, x: Tensor, offset: Tensor):
    if _exporting():  # checked first: importing torchvision inside a trace would record its start-up ops
        return "torchvision.ops.deform_conv2d has no ONNX operator (exporting or tracing)"
    if _torchvision_deform_conv2d() is None:
        return "torchvision is not importable"
    if x.is_cuda and torch.are_deterministic_algorithms_enabled() and _needs_grad(m, x, offset):
        return "deterministic mode: torchvision's CUDA backward accumulates with atomic adds"
    return None


def _torchvision_auto_skip(m, x: Tensor, offset: Tensor):
    if x.device.type == "cpu":
        return Decline("on the CPU 'grid_sample' measured about 4x faster than torchvision's kernel")
    return None


def _grid_sample_can_run(m, x: Tensor, offset: Tensor):
    if x.is_cuda and torch.are_deterministic_algorithms_enabled() and _needs_grad(m, x, offset):
        return "deterministic mode: grid_sample has no deterministic CUDA backward"
    return None


DEFORM_CONV2D.register("torchvision", can_run=_torchvision_can_run, auto_skip=_torchvision_auto_skip)(_torchvision)
DEFORM_CONV2D.register("grid_sample", can_run=_grid_sample_can_run)(_grid_sample)
DEFORM_CONV2D.register("reference")(_reference)


class DeformableConv2d(nn.Module):
    """Deformable convolution (DCNv1) with ``torchvision.ops.DeformConv2d``'s parameters and init.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: int or (kh, kw).
        stride, padding, dilation: ints or pairs.
        groups: weight groups (``in_channels`` and ``out_channels`` divisible by it).
        bias: learnable bias.
        backend: ``None`` (the process-wide choice), ``'torchvision'``, ``'grid_sample'`` or ``'reference'``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, *, backend: str | None = None):
        super().__init__()
        positive_int("in_channels", in_channels)
        positive_int("out_channels", out_channels)
        positive_int("groups", groups)
        flag("bias", bias)
        DEFORM_CONV2D.check_name(backend)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must be divisible by "
                             f"groups={groups}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair("kernel_size", kernel_size, 1)
        self.stride = _pair("stride", stride, 1)
        self.padding = _pair("padding", padding, 0)
        self.dilation = _pair("dilation", dilation, 1)
        self.groups = groups
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's init: kaiming-uniform (a = sqrt(5)) weights, bias uniform in ±1/sqrt(fan_in)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}")

    def output_size(self, h, w) -> tuple:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1, (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1

    def forward(self, x: Tensor, offset: Tensor) -> Tensor:
        """x: (N, Cin, H, W), offset: (N, 2·og·kh·kw, Ho, Wo) -> (N, Cout, Ho, Wo)."""
        check_image(x, self, self.in_channels)
        k2 = 2 * self.kernel_size[0] * self.kernel_size[1]
        ho, wo = self.output_size(x.shape[2], x.shape[3])
        if isinstance(ho, int) and isinstance(wo, int):  # not traced
            if ho < 1 or wo < 1:
                raise ValueError(f"{type(self).__name__}: input {tuple(x.shape[2:])} is smaller than the dilated "
                                 f"kernel {self.kernel_size} with padding {self.padding}")
            og = offset.shape[1] // k2 if offset.dim() == 4 else 0
            if (offset.dim() != 4 or offset.shape[0] != x.shape[0] or og < 1 or offset.shape[1] != og * k2
                    or self.in_channels % og or tuple(offset.shape[2:]) != (ho, wo)):
                raise ValueError(f"offset must be (N, 2·offset_groups·{k2 // 2}, {ho}, {wo}) with offset_groups "
                                 f"dividing {self.in_channels}, got shape {tuple(offset.shape)}")
        return DEFORM_CONV2D(self, x, offset, backend=self.backend)


class DeformConv(nn.Module):
    """D-LKA's deformable conv: ``offset_net`` (a plain conv of the same geometry) predicts the offsets of a
    ``in_channels -> in_channels`` deformable conv.

    Args:
        in_channels: channels (input and output).
        groups: groups of the deformable conv (``in_channels`` for depthwise).
        kernel_size: int or (kh, kw).
        padding, stride, dilation: ints or pairs, for both convs.
        bias: unused, as in the official module (the deformable conv has no bias).
        backend: backend of the deformable conv (see :class:`DeformableConv2d`).
    """

    def __init__(self, in_channels: int, groups: int, kernel_size=(3, 3), padding=1, stride=1, dilation=1,
                 bias: bool = True, *, backend: str | None = None):
        super().__init__()
        positive_int("in_channels", in_channels)
        kh, kw = _pair("kernel_size", kernel_size, 1)
        flag("bias", bias)
        self.offset_net = nn.Conv2d(in_channels=in_channels, out_channels=2 * kh * kw, kernel_size=(kh, kw),
                                    padding=_pair("padding", padding, 0), stride=_pair("stride", stride, 1),
                                    dilation=_pair("dilation", dilation, 1), bias=True)
        self.deform_conv = DeformableConv2d(in_channels, in_channels, (kh, kw), padding=padding, groups=groups,
                                            stride=stride, dilation=dilation, bias=False, backend=backend)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) -> (N, C, Ho, Wo)."""
        return self.deform_conv(x, self.offset_net(x))


class deformable_LKA(nn.Module):  # noqa: N801 - the official class name
    """D-LKA's attention map: deformable 5x5 depthwise, deformable 7x7 depthwise with dilation 3, 1x1 conv,
    multiplied onto the input.

    Args:
        dim: channels.
        backend: backend of the deformable convs.
    """

    def __init__(self, dim: int, *, backend: str | None = None):
        super().__init__()
        positive_int("dim", dim)
        self.conv0 = DeformConv(dim, kernel_size=(5, 5), padding=2, groups=dim, backend=backend)
        self.conv_spatial = DeformConv(dim, kernel_size=(7, 7), stride=1, padding=9, groups=dim, dilation=3,
                                       backend=backend)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) -> (N, C, H, W)."""
        check_image(x, self, self.dim)
        return x * self.conv1(self.conv_spatial(self.conv0(x)))


class deformable_LKA_Attention(nn.Module):  # noqa: N801 - the official class name
    """D-LKA attention: ``proj_2(deformable_LKA(GELU(proj_1(x)))) + x``, NCHW in and out.

    Args:
        d_model: channels (input and output).
        backend: backend of the deformable convs (``set_backend(deform_conv2d=...)`` for all layers).
    """

    def __init__(self, d_model: int, *, backend: str | None = None):
        super().__init__()
        positive_int("d_model", d_model)
        self.d_model = d_model
        self.proj_1 = nn.Conv2d(d_model, d_model, 1)
        self.activation = nn.GELU()
        self.spatial_gating_unit = deformable_LKA(d_model, backend=backend)
        self.proj_2 = nn.Conv2d(d_model, d_model, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) -> (N, C, H, W)."""
        check_image(x, self, self.d_model)
        return self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(x)))) + x


DLKA = deformable_LKA_Attention
