"""Multi-Scale Convolutional Attention (MSCA) from SegNeXt (Guo et al., NeurIPS 2022).

A 5×5 depthwise conv, then three pairs of depthwise strip convs (1×7 then 7×1, 1×11 then 11×1,
1×21 then 21×1) on its output; the four maps are summed, mixed by a 1×1 conv, and the result gates
the input element-wise. There is no sigmoid: the "attention" is a linear map of the input.

:class:`MSCA` reproduces ``AttentionModule(dim)`` of the official repository
(Visual-Attention-Network/SegNeXt, ``mmseg/models/backbones/mscan.py``), which mmsegmentation 1.x
ships as ``MSCAAttention(channels, kernel_sizes, paddings)``; both names are aliases here, and the
state_dict keys (``conv0``, ``conv{i}_1``, ``conv{i}_2``, ``conv3``) are the same in both.
:class:`MSCASpatialAttention` is SegNeXt's ``SpatialAttention(d_model)`` (mmsegmentation 1.x:
``MSCASpatialAttention``): ``proj_1`` → GELU → MSCA → ``proj_2``, plus the input. It is not called
``SpatialAttention`` because Ultralytics has a different class of that name.

Differences from the official code, deliberate:

- the official code clones the input before using it; nothing is modified in place, so the copy
  is dropped (bit-identical);
- ``kernel_sizes``/``paddings`` (the mmsegmentation 1.x arguments) are checked: every kernel side
  must be odd and every padding must keep the size (``(k - 1) // 2``); the official code crashed at
  the sum (or silently changed the size of the map) otherwise. Any number of strip branches is
  accepted (the official forward hard-codes three);
- the residual is kept where SegNeXt puts it: inside :class:`MSCASpatialAttention` only, around
  ``proj_2(msca(gelu(proj_1(x))))``, never around :class:`MSCA` itself (the MSCAN block adds a
  second, layer-scaled residual around the whole wrapper, outside both classes).

Any H, W ≥ 1 works (zero padding keeps the size; there is no pooling), and the layer exports to
ONNX with dynamic H/W.

Backends (``set_backend(msca=...)``): ``'fused'`` (default) and ``'reference'`` (the official sequence of
modules). ``'fused'`` computes the same math faster on the CPU:

- the depthwise convs run channels-last (PyTorch's NCHW kernel for a 1×21 depthwise conv is 14–20×
  slower than its channels-last one), the 1×1 convs are GEMMs that write the layout the next op wants,
  and the branches are added in place in the official order;
- in training, the depthwise weight gradients — oneDNN's are slow for every kernel but 3×3 and k×1
  (a 1×21 at 64 channels, 80×80: ~40 ms on one thread, 80× its forward) — come from
  :func:`depthwise`: each 1×k conv runs as the k×1 conv of its transposed kernel on the H/W-transposed
  map, a 5×5 gradient is five 5×1 ones, and small maps use batched GEMMs; and the NCHW result is one
  copy whose backward returns the gradient channels-last, so the whole backward stays channels-last.

It equals the reference to fp32 rounding (the sums run in another order), not bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._checks import check_image, is_int, positive_int
from .backends import Op
from .functional.depthwise_conv import DEPTHWISE_CONV
from .functional.depthwise_conv import kernel_info as depthwise_kernel_info

__all__ = ["MSCA", "MSCA_OP", "AttentionModule", "MSCAAttention", "MSCASpatialAttention", "SegNeXtSpatialAttention"]

# backends: 'fused' (channels-last depthwise convs, 1x1 convs as GEMMs) and 'reference' (the official modules)
MSCA_OP = Op("msca")

DEFAULT_KERNEL_SIZES = (5, (1, 7), (1, 11), (1, 21))
DEFAULT_PADDINGS = (2, (0, 3), (0, 5), (0, 10))


# -- shared helpers (also used by yoloattn.nn.cpca / polarized / sea) -------------------------------------------
def pointwise(weight: Tensor, bias: Tensor | None, x: Tensor, channels_last: bool = False) -> Tensor:
    """A 1×1 conv as one batched GEMM: x (N, Cin, H, W), any layout -> (N, Cout, H, W).

    The output is NCHW-contiguous, or channels-last with ``channels_last=True``; either way the GEMM
    writes it directly (the input is read as a strided matrix, no copy for NCHW or channels-last
    input). On the CPU this is faster than the convolution kernel for these shapes.

    Args:
        weight: (Cout, Cin, 1, 1) or (Cout, Cin).
        bias: (Cout,) or None.
        x: (N, Cin, H, W).
        channels_last: write the output channels-last.
    """
    n, c, h, w = x.shape
    weight = weight.reshape(weight.shape[0], c).to(x.dtype)
    cout = weight.shape[0]
    flat = x.flatten(2)  # (N, Cin, HW): a view for NCHW and channels-last input
    if channels_last:
        rows = flat.transpose(1, 2)  # (N, HW, Cin)
        out = (torch.matmul(rows, weight.t()) if bias is None
               else torch.baddbmm(bias.to(x.dtype).view(1, 1, cout), rows, weight.t().expand(n, c, cout)))
        return out.view(n, h, w, cout).permute(0, 3, 1, 2)  # (N, Cout, H, W) channels-last
    out = (torch.matmul(weight, flat) if bias is None
           else torch.baddbmm(bias.to(x.dtype).view(1, cout, 1), weight.expand(n, cout, c), flat))
    return out.view(n, cout, h, w)


def conv_channels_last(x: Tensor) -> bool:
    """Whether the fast paths run depthwise convs channels-last for this input (the CPU: much faster there)."""
    return x.device.type == "cpu"


# Weight gradients of depthwise convs (see depthwise()): maps up to this many pixels use the GEMM formulation;
# larger ones oneDNN's channels-last k×1 kernel, which is fast there (a 2-D kernel runs as one k×1 per column).
_GEMM_WEIGHT_GRAD_MAX_PIXELS = 1024


def _custom_backward(x: Tensor, *weights: Tensor) -> bool:
    """Whether :class:`_DepthwiseConv` runs: a CPU autograd call outside autocast, tracing and compiling."""
    return (x.device.type == "cpu" and torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad
            for w in weights)) and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing()
            and not torch.onnx.is_in_onnx_export() and not torch.compiler.is_compiling())


def depthwise(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)`` for a stride-1, undilated depthwise conv, with a faster weight gradient on the CPU.

    PyTorch's CPU weight gradient of a depthwise conv (oneDNN) is fast for 3×3 and, channels-last on
    larger maps, for k×1 kernels, and slow otherwise: a 1×21 kernel at 64 channels and 80×80 takes about
    40 ms on one thread (80× its forward), a 5×5 about 10 ms, a 21×1 at 256 channels and 20×20 about 5 ms.
    In float32 with the compiled weight-gradient kernel built, this is the ``depthwise_conv`` op
    (:mod:`.functional.depthwise_conv`: that kernel for kernels 5 and wider, PyTorch's own backward for
    narrower ones). Otherwise :class:`_DepthwiseConv` keeps PyTorch's forward and input gradient and computes
    the weight gradient with the fast k×1 kernel, column by column, on large maps, and as batched GEMMs on
    small ones (see :func:`_weight_grad`). Same math; the sums run in another order. Where neither can run
    (not the CPU, no gradient, autocast, tracing, compiling) this is plainly ``conv(x)``.
    """
    if not _custom_backward(x, conv.weight):
        return conv(x)
    if _compiled_kernel_runs(x, conv):
        return DEPTHWISE_CONV(x, conv.weight, conv.bias)
    return _DepthwiseConv.apply(x, conv.weight, conv.bias, conv.padding)


def _compiled_kernel_runs(x: Tensor, conv: nn.Conv2d) -> bool:
    """Whether the ``depthwise_conv`` op (compiled weight gradient) takes this float32, 'same'-padded conv."""
    k = conv.kernel_size
    return (x.dtype == torch.float32 and conv.weight.dtype == torch.float32 and k[0] % 2 == 1 and k[1] % 2 == 1
            and tuple(conv.padding) == (k[0] // 2, k[1] // 2) and depthwise_kernel_info()["available"])


def strip_pairs(pairs, x: Tensor) -> list[Tensor]:
    """``[vertical(horizontal(x)) for horizontal, vertical in pairs]`` for depthwise (1, k) → (k, 1) strip pairs.

    With the custom backward, each 1×k conv runs as the k×1 conv of its transposed kernel on the H/W-transposed
    map (one transposed copy of ``x`` for all pairs, one per output), so that every strip conv gets oneDNN's
    fast k×1 gradient kernels; transposing a channels-last map costs about a copy.
    """
    if not _custom_backward(x, *(w for pair in pairs for conv in pair for w in (conv.weight,))):
        return [vertical(horizontal(x)) for horizontal, vertical in pairs]
    if all(_compiled_kernel_runs(x, conv) for pair in pairs for conv in pair):
        # the compiled kernel takes 1xk strips directly (2-3x the transposed k x 1 route below)
        return [depthwise(vertical, depthwise(horizontal, x)) for horizontal, vertical in pairs]
    cl = torch.channels_last
    x_t = None
    out = []
    for horizontal, vertical in pairs:
        if horizontal.kernel_size[0] == 1 and horizontal.kernel_size[1] > 1:
            if x_t is None:
                x_t = x.transpose(2, 3).contiguous(memory_format=cl)  # (N, C, W, H)
            y_t = _DepthwiseConv.apply(x_t, horizontal.weight.transpose(2, 3), horizontal.bias,
                                       horizontal.padding[::-1])
            y = y_t.transpose(2, 3).contiguous(memory_format=cl)
        else:
            y = depthwise(horizontal, x)
        out.append(depthwise(vertical, y))
    return out


class _DepthwiseConv(torch.autograd.Function):
    """Depthwise conv (stride 1, no dilation) whose weight gradient is :func:`_weight_grad`'s."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = tuple(padding)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, padding=padding, groups=x.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = None
        if want_x:
            grad_x = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], list(ctx.padding), [1, 1],
                                                         False, [0, 0], x.shape[1], [True, False, False])[0]
        if want_w:
            grad_w = _weight_grad(x, grad, weight, ctx.padding)
        grad_b = grad.sum((0, 2, 3)) if want_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


def _weight_grad(x: Tensor, grad: Tensor, weight: Tensor, padding: tuple[int, int]) -> Tensor:
    """Weight gradient (C, 1, kh, kw) of a depthwise conv: x and grad (N, C, H, W), zero padding (ph, pw)."""
    kh, kw = weight.shape[2:]
    ph, pw = padding
    h, w = x.shape[2:]
    if h * w <= _GEMM_WEIGHT_GRAD_MAX_PIXELS or kw > 1 and kh == 1:
        return _weight_grad_gemm(x, grad, kh, kw, ph, pw)
    c = x.shape[1]
    if kw == 1:
        return torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], [ph, 0], [1, 1], False, [0, 0], c,
                                                   [False, True, False])[1]
    # a 2-D kernel: column j is the weight gradient of a kh×1 conv on the input shifted by j - pw along W
    cl = torch.channels_last
    grad = grad.contiguous(memory_format=cl)
    padded = F.pad(x, (pw, pw))
    column = weight[..., :1]
    return torch.cat([torch.ops.aten.convolution_backward(
        grad, padded[..., j:j + w].contiguous(memory_format=cl), column, None, [1, 1], [ph, 0], [1, 1], False,
        [0, 0], c, [False, True, False])[1] for j in range(kw)], dim=3)


def _diagonals(prod: Tensor, taps: int, pad: int) -> Tensor:
    """(B, L, L) -> (B, taps): the sums of the diagonals at offsets -pad .. taps - 1 - pad."""
    return torch.stack([torch.diagonal(prod, offset=o, dim1=1, dim2=2).sum(-1) for o in range(-pad, taps - pad)], 1)


def _weight_grad_gemm(x: Tensor, grad: Tensor, kh: int, kw: int, ph: int, pw: int) -> Tensor:
    """Weight gradient (C, 1, kh, kw) of a depthwise conv with zero padding (ph, pw): x and grad (N, C, H, W).

    ``dL/dw[c, i, j] = Σ g[n, c, h, w] · x[n, c, h + i - ph, w + j - pw]``. For each kernel row i, one batched
    GEMM over the (n, c) planes gives ``P[w, w'] = Σ_h g[h, w] · x[h + i - ph, w']`` and the taps j are the
    sums of its diagonals at offsets ``j - pw``; zero padding adds nothing, so it needs no padded copy. A k×1
    kernel runs the same along H.
    """
    n, c, h, w = x.shape
    x = x.contiguous().view(n * c, h, w)
    grad = grad.contiguous().view(n * c, h, w)
    if kw == 1 and kh > 1:  # correlate along H: P[h, h'] = Σ_w g[h, w] · x[h', w]
        taps = _diagonals(torch.bmm(grad, x.transpose(1, 2)), kh, ph).unsqueeze(-1)  # (NC, kh, 1)
    else:
        rows = []
        for i in range(kh):
            shift = i - ph  # rows h with 0 <= h + shift < H
            top, bottom = max(0, -shift), min(h, h - shift)
            if bottom <= top:
                rows.append(x.new_zeros(n * c, kw))
                continue
            g_rows, x_rows = grad[:, top:bottom], x[:, top + shift:bottom + shift]
            rows.append(_diagonals(torch.bmm(g_rows.transpose(1, 2), x_rows), kw, pw))  # (NC, kw)
        taps = torch.stack(rows, 1)  # (NC, kh, kw)
    return taps.view(n, c, kh, kw).sum(0).unsqueeze(1).to(x.dtype)


def _pair(name: str, value) -> tuple[int, int]:
    if is_int(value):
        value = (value, value)
    if not (isinstance(value, Sequence) and len(value) == 2 and all(is_int(v) for v in value)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return int(value[0]), int(value[1])


def check_strip_kernels(kernel_sizes, paddings) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
    """Normalise and check mmsegmentation-style ``kernel_sizes``/``paddings``: size-keeping odd kernels.

    Returns:
        kernels, paddings: the square-ish first kernel, then one (1, k)-like pair per strip branch.
    """
    if not isinstance(kernel_sizes, Sequence) or not isinstance(paddings, Sequence) or len(kernel_sizes) < 1:
        raise TypeError(f"kernel_sizes and paddings must be non-empty lists, got {kernel_sizes!r} and {paddings!r}")
    if len(kernel_sizes) != len(paddings):
        raise ValueError(f"kernel_sizes and paddings must have the same length, got {len(kernel_sizes)} and "
                         f"{len(paddings)}")
    kernels, pads = [], []
    for i, (k, p) in enumerate(zip(kernel_sizes, paddings)):
        k, p = _pair(f"kernel_sizes[{i}]", k), _pair(f"paddings[{i}]", p)
        if any(s < 1 or s % 2 == 0 for s in k):
            raise ValueError(f"kernel_sizes[{i}] must be odd and positive (the branches are summed, so every conv "
                             f"must keep the size), got {kernel_sizes[i]!r}")
        if p != ((k[0] - 1) // 2, (k[1] - 1) // 2):
            raise ValueError(f"paddings[{i}] must be {((k[0] - 1) // 2, (k[1] - 1) // 2)} for kernel {k} (size "
                             f"kept), got {paddings[i]!r}")
        kernels.append(k)
        pads.append(p)
    return tuple(kernels), tuple(pads)


# -- MSCA ---------------------------------------------------------------------------------------------------------
class MSCA(nn.Module):
    """SegNeXt's multi-scale convolutional attention (``AttentionModule``): ``conv3(Σ branches) * x``.

    Args:
        dim: input (and output) channels.
        kernel_sizes: the first depthwise kernel, then one strip kernel ``[1, k]`` per branch (each
            branch is that conv followed by its transpose ``[k, 1]``); mmsegmentation 1.x's argument.
        paddings: zero padding of each kernel in ``kernel_sizes``; must keep the size.
        backend: ``None`` (follow :func:`yoloattn.nn.set_backend`), ``'auto'``, ``'fused'`` or ``'reference'``.

    Shapes:
        x: (N, dim, H, W) -> (N, dim, H, W), any H, W >= 1.
    """

    def __init__(self, dim: int, kernel_sizes=DEFAULT_KERNEL_SIZES, paddings=DEFAULT_PADDINGS, *,
                 backend: str | None = None):
        super().__init__()
        positive_int("dim", dim)
        kernels, pads = check_strip_kernels(kernel_sizes, paddings)
        MSCA_OP.check_name(backend)
        self.dim = dim
        self.backend = backend
        self.n_branches = len(kernels) - 1
        self.conv0 = nn.Conv2d(dim, dim, kernels[0], padding=pads[0], groups=dim)
        for i, (k, p) in enumerate(zip(kernels[1:], pads[1:])):
            self.add_module(f"conv{i}_1", nn.Conv2d(dim, dim, k, padding=p, groups=dim))
            self.add_module(f"conv{i}_2", nn.Conv2d(dim, dim, k[::-1], padding=p[::-1], groups=dim))
        self.conv3 = nn.Conv2d(dim, dim, 1)

    def branches(self) -> list[tuple[nn.Conv2d, nn.Conv2d]]:
        """The strip-conv pairs ``(conv{i}_1, conv{i}_2)`` in order."""
        return [(getattr(self, f"conv{i}_1"), getattr(self, f"conv{i}_2")) for i in range(self.n_branches)]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, branches={self.n_branches}"

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, dim, H, W) -> (N, dim, H, W)."""
        check_image(x, self, self.dim)
        return MSCA_OP(self, x, backend=self.backend)


def _reference(unit: MSCA, x: Tensor) -> Tensor:
    attn = unit.conv0(x)
    total = attn
    for first, second in unit.branches():
        total = total + second(first(attn))  # ((a + a0) + a1) + a2, the official order
    return unit.conv3(total) * x


def _branch_sum(unit: MSCA, u: Tensor) -> Tensor:
    """conv0(u) + Σ strip branches, accumulated in place in the official order; layout of ``u``."""
    attn = depthwise(unit.conv0, u)
    total = attn
    for branch in strip_pairs(unit.branches(), attn):
        # an add's backward needs neither operand, so accumulating in place is autograd-safe
        total = attn + branch if total is attn else total.add_(branch)
    return total


def gate_fused(unit: MSCA, u: Tensor, out_channels_last: bool) -> Tensor:
    """``conv3(Σ branches(u)) * u``, (N, C, H, W) in the layout asked for; depthwise convs channels-last on the CPU.

    In training on the CPU everything runs channels-last and an NCHW result is made by one copy whose backward
    hands the gradient back channels-last (see :func:`nchw_output`); otherwise the 1×1 conv writes the layout
    asked for directly.
    """
    u_conv = u.contiguous(memory_format=torch.channels_last) if conv_channels_last(u) else u
    total = _branch_sum(unit, u_conv)
    if conv_channels_last(u) and not out_channels_last and _custom_backward(u, unit.conv3.weight):
        attn = pointwise(unit.conv3.weight, unit.conv3.bias, total, channels_last=True)
        return nchw_output(attn * u_conv)
    attn = pointwise(unit.conv3.weight, unit.conv3.bias, total, channels_last=out_channels_last)
    return attn * (u_conv if out_channels_last else u)  # both operands in the output's layout


def is_channels_last(x: Tensor) -> bool:
    """A channels-last tensor that is not also NCHW-contiguous (those with H = W = 1 or C = 1 are both)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def nchw_output(t: Tensor) -> Tensor:
    """``t.contiguous()`` whose backward returns the gradient channels-last, like ``t``.

    Autograd would hand the NCHW gradient of an NCHW result back unchanged, and every backward op before it
    would then mix an NCHW gradient with channels-last saved tensors: strided elementwise loops and layout
    copies inside the conv kernels. One copy here keeps the whole backward channels-last.
    """
    return _NCHWOutput.apply(t)


class _NCHWOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        return t.contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


def _fused(unit: MSCA, x: Tensor) -> Tensor:
    return gate_fused(unit, x, out_channels_last=is_channels_last(x))


MSCA_OP.register("fused")(_fused)
MSCA_OP.register("reference")(_reference)


class MSCASpatialAttention(nn.Module):
    """SegNeXt's ``SpatialAttention``: ``proj_2(MSCA(GELU(proj_1(x)))) + x``.

    Args:
        d_model: input (and output) channels.
        attention_kernel_sizes, attention_kernel_paddings: the MSCA's kernels (mmsegmentation 1.x's arguments).
        backend: as :class:`MSCA` (the wrapper's 1×1 convs follow the same switch, op ``'msca'``).

    Shapes:
        x: (N, d_model, H, W) -> (N, d_model, H, W), any H, W >= 1.
    """

    def __init__(self, d_model: int, attention_kernel_sizes=DEFAULT_KERNEL_SIZES,
                 attention_kernel_paddings=DEFAULT_PADDINGS, *, backend: str | None = None):
        super().__init__()
        positive_int("d_model", d_model)
        MSCA_OP.check_name(backend)
        self.d_model = d_model
        self.backend = backend
        self.proj_1 = nn.Conv2d(d_model, d_model, 1)
        self.activation = nn.GELU()
        self.spatial_gating_unit = MSCA(d_model, attention_kernel_sizes, attention_kernel_paddings, backend=backend)
        self.proj_2 = nn.Conv2d(d_model, d_model, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, d_model, H, W) -> (N, d_model, H, W)."""
        check_image(x, self, self.d_model)
        if MSCA_OP.select(self.backend, self.spatial_gating_unit, x).name == "reference":
            return self.proj_2(_reference(self.spatial_gating_unit, self.activation(self.proj_1(x)))) + x
        cl = conv_channels_last(x)
        u = F.gelu(pointwise(self.proj_1.weight, self.proj_1.bias, x, channels_last=cl))
        gated = gate_fused(self.spatial_gating_unit, u, out_channels_last=cl)
        if cl and not is_channels_last(x) and _custom_backward(x, self.proj_2.weight):  # training: see nchw_output
            return nchw_output(pointwise(self.proj_2.weight, self.proj_2.bias, gated, channels_last=True)) + x
        return pointwise(self.proj_2.weight, self.proj_2.bias, gated, channels_last=is_channels_last(x)) + x


# official names
AttentionModule = MSCA
MSCAAttention = MSCA
SegNeXtSpatialAttention = MSCASpatialAttention
