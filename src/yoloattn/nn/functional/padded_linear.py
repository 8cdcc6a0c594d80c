"""A linear map of a zero-padded channels-last image, ``F.linear(F.pad(x, ...), weight, bias)``, with the bias
inside the matrix product.

BRA pads its input to whole windows and projects every token to queries, keys and values. PyTorch's linear
computes the product and adds the bias in a pass of its own over the (N, H', W', Cout) output, three times the
input's width: at YOLOv8n's P3 in a training step at batch 4, 640 (4, 84, 84, 192 floats), that pass took as
long as the product, and the bias gradient another reduction over the output gradient.

Backends (:data:`PADDED_LINEAR`):

- ``'gemm_bias'``: the pad writes the image and a channel of ones beside it (one pass; the ones run over the
  padding too, where a token's projection is the bias) and one matrix product with ``[weight | bias]`` gives
  the projection; in the backward, the product that gives the weight gradient gives the bias gradient as its
  last column, and the input gradient is a view of the padded one. CPU, float32 or float64, eager mode (an
  export, a trace or a compiled graph records the reference), a bias, no autocast.
  Measured (the projection of BRA's input at (4, 64, 80, 80), an NHWC view of NCHW, 2 threads, Xeon, PyTorch
  at AVX2): forward + backward 20.9 -> 18.1 ms, inference 4.1 -> 3.8 ms; at batch 1 no difference.
- ``'reference'``: ``F.linear(F.pad(x, ...), weight, bias)``.

The outputs agree to rounding (the bias is the last term of each dot product instead of the first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import Decline, Op

__all__ = ["PADDED_LINEAR", "padded_linear"]

PADDED_LINEAR = Op("padded_linear")


class _PadWithOnes(torch.autograd.Function):
    """(N, H, W, C) -> (N, H + pad_b, W + pad_r, C + 1): zeros below and right of x, ones in the last channel."""

    @staticmethod
    def forward(ctx, x: Tensor, pad_b: int, pad_r: int) -> Tensor:
        n, h, w, c = x.shape
        out = x.new_empty(n, h + pad_b, w + pad_r, c + 1)
        out[:, :h, :w, :c] = x
        out[:, h:, :, :c] = 0
        out[:, :h, w:, :c] = 0
        out[..., c] = 1
        ctx.hwc = h, w, c
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, w, c = ctx.hwc
        return grad[:, :h, :w, :c], None, None


def _gemm_bias(x: Tensor, weight: Tensor, bias: Tensor, pad_b: int, pad_r: int) -> Tensor:
    padded = _PadWithOnes.apply(x, pad_b, pad_r)  # (N, H', W', Cin + 1)
    weight_and_bias = torch.cat([weight, bias[:, None]], dim=1)  # (Cout, Cin + 1)
    n, h, w, c = padded.shape
    return (padded.view(n * h * w, c) @ weight_and_bias.t()).view(n, h, w, weight.shape[0])


def _gemm_bias_can_run(x: Tensor, weight: Tensor, bias: Tensor | None, pad_b: int, pad_r: int):
    if bias is None:
        return Decline("the layer has no bias")
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return Decline(f"CPU float32/float64 only, got a {x.device.type} {x.dtype} input")
    if weight.dtype != x.dtype or bias.dtype != x.dtype:
        return Decline(f"the weight and bias ({weight.dtype}, {bias.dtype}) are not in the input's {x.dtype}")
    if torch.is_autocast_enabled("cpu"):
        return Decline("autocast is on: F.linear takes its lower-precision path")
    if (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_compiling() or torch.compiler.is_exporting()):
        return Decline("an export, trace or compiled graph records the reference")
    return None


PADDED_LINEAR.register("gemm_bias", can_run=_gemm_bias_can_run)(_gemm_bias)


@PADDED_LINEAR.register("reference")
def _reference(x: Tensor, weight: Tensor, bias: Tensor | None, pad_b: int, pad_r: int) -> Tensor:
    return F.linear(F.pad(x, (0, 0, 0, pad_r, 0, pad_b)), weight, bias)


def padded_linear(x: Tensor, weight: Tensor, bias: Tensor | None, pad_b: int, pad_r: int, *,
                  backend: str | None = None) -> Tensor:
    """``F.linear`` of ``x`` zero-padded by ``pad_b`` rows below and ``pad_r`` columns right.

    Args:
        x: (N, H, W, Cin), any strides.
        weight: (Cout, Cin).
        bias: (Cout,) or None.
        pad_b, pad_r: non-negative numbers of zero rows and columns.
        backend: a backend name for this call (``None``: the process-wide choice, see :mod:`yoloattn.nn.backends`).

    Returns:
        (N, H + pad_b, W + pad_r, Cout), channels contiguous.
    """
    PADDED_LINEAR.check_name(backend)
    if x.dim() != 4 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"expected x (N, H, W, Cin) and weight (Cout, Cin), got shapes {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if isinstance(pad_b, int) and isinstance(pad_r, int) and (pad_b < 0 or pad_r < 0):
        raise ValueError(f"pad_b and pad_r must be non-negative, got {pad_b} and {pad_r}")
    return PADDED_LINEAR(x, weight, bias, pad_b, pad_r, backend=backend)
