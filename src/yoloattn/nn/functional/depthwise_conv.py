"""Stride-1 depthwise convolution with 'same' padding (BRA's and BiFormer's LePE, MSCA's and CPCA's 5×5 and
strip convolutions), whose backward does not take PyTorch's slow path.

PyTorch's CPU backward of a depthwise 5×5 convolution (oneDNN, channels-last) takes about 10× its forward,
nearly all of it in the weight gradient: at BiFormer-T's first stage (16, 64, 56, 56) 30 ms against 2.7 ms.
For kernels narrower than 5 (3×3, k×1) PyTorch's backward is as fast, and ``'auto'`` keeps it.

Backends (:data:`DEPTHWISE_CONV`):

- ``'cpu'``: the forward is PyTorch's convolution; the backward computes the input gradient as the forward
  convolution of the output gradient with the flipped weights (exact for stride 1 and 'same' padding) and the
  weight and bias gradients with a compiled, vectorised reduction (``csrc/depthwise_conv_cpu.cpp``, built like
  the routed-attention kernel, for the same ``-march`` target; results independent of the thread count).
- ``'reference'``: ``F.conv2d`` under autograd.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._checks import hooked
from ..backends import REFERENCE, Decline, Op
from . import routed_attention_cpu
from ._build import BuildError, load_library

__all__ = ["DEPTHWISE_CONV", "depthwise_conv2d", "depthwise_conv_module", "kernel_info"]

DEPTHWISE_CONV = Op("depthwise_conv")

_SOURCE = Path(__file__).with_name("csrc") / "depthwise_conv_cpu.cpp"
_ABI = 1  # passed to the compiler, reported back by the library and checked when it is loaded
_i64 = ctypes.c_int64


class _Map(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("s_n", _i64), ("s_h", _i64), ("s_w", _i64)]


class _Args(ctypes.Structure):
    """``DepthwiseArgs`` in the C++ source, field for field."""

    _fields_ = [("abi", _i64), ("size", _i64), ("n", _i64), ("h", _i64), ("w", _i64), ("c", _i64), ("kh", _i64),
                ("kw", _i64), ("ph", _i64), ("pw", _i64), ("threads", _i64), ("x", _Map), ("grad", _Map),
                ("grad_weight", ctypes.c_void_p), ("grad_bias", ctypes.c_void_p)]


def _check_library(lib: ctypes.CDLL) -> str | None:
    try:
        lib.yoloattn_dw_abi.restype = ctypes.c_int
        lib.yoloattn_dw_args_size.restype = _i64
        lib.yoloattn_dw_isa.restype = ctypes.c_char_p
        lib.yoloattn_dw_status_message.restype = ctypes.c_char_p
        lib.yoloattn_dw_status_message.argtypes = [ctypes.c_int]
        lib.yoloattn_dw_weight_grad.restype = ctypes.c_int
        lib.yoloattn_dw_weight_grad.argtypes = [ctypes.POINTER(_Args)]
    except AttributeError as e:
        return f"it lacks the kernel's entry points ({e})"
    if lib.yoloattn_dw_abi() != _ABI or lib.yoloattn_dw_args_size() != ctypes.sizeof(_Args):
        return (f"it reports ABI {lib.yoloattn_dw_abi()} with a {lib.yoloattn_dw_args_size()}-byte argument block, "
                f"expected ABI {_ABI} with {ctypes.sizeof(_Args)} bytes")
    return None


@functools.lru_cache(maxsize=None)
def _load(march: str) -> ctypes.CDLL | str:
    try:
        return load_library(_SOURCE, march=march, defines={"YOLOATTN_DW_ABI": _ABI}, check=_check_library)
    except BuildError as e:
        return f"the depthwise-convolution kernel (-march={march}) could not be built: {e}"


def kernel_info() -> dict:
    """The build target of the weight-gradient kernel and, when it is loaded, its ISA (or why it is not)."""
    march = routed_attention_cpu.current_march()
    lib = _load(march)
    if isinstance(lib, str):
        return {"march": march, "available": False, "reason": lib}
    return {"march": march, "available": True, "isa": lib.yoloattn_dw_isa().decode()}


def _channels_last_map(t: Tensor, name: str) -> _Map:
    # the kernel reads each pixel's channels as one contiguous run: check it, never assume it
    if t.dtype != torch.float32 or t.dim() != 4 or t.stride(1) != 1:
        raise ValueError(f"depthwise_conv: {name} must be a float32 (N, C, H, W) tensor with channel stride 1, "
                         f"got {t.dtype} of shape {tuple(t.shape)} and strides {t.stride()}")
    return _Map(t.data_ptr(), t.stride(0), t.stride(2), t.stride(3))


def _weight_grad(x: Tensor, grad: Tensor, kernel: tuple[int, int], with_bias: bool) -> tuple[Tensor, Tensor | None]:
    """(C, 1, kh, kw) weight gradient and (C,) bias gradient (or None) from channels-last x and grad."""
    lib = _load(routed_attention_cpu.current_march())
    if isinstance(lib, str):
        raise RuntimeError(lib)
    n, c, h, w = x.shape
    if grad.shape != x.shape:
        raise ValueError(f"depthwise_conv: the output gradient's shape {tuple(grad.shape)} is not the input's "
                         f"{tuple(x.shape)} (stride 1, 'same' padding)")
    kh, kw = kernel
    grad_weight = torch.empty(kh, kw, c)
    grad_bias = torch.empty(c) if with_bias else None
    args = _Args(_ABI, ctypes.sizeof(_Args), n, h, w, c, kh, kw, kh // 2, kw // 2, torch.get_num_threads(),
                 _channels_last_map(x, "x"), _channels_last_map(grad, "the output gradient"),
                 grad_weight.data_ptr(), None if grad_bias is None else grad_bias.data_ptr())
    status = lib.yoloattn_dw_weight_grad(ctypes.byref(args))
    if status != 0:
        raise RuntimeError(f"depthwise_conv: the kernel refused the call: {lib.yoloattn_dw_status_message(status)}")
    return grad_weight.permute(2, 0, 1).unsqueeze(1).contiguous(), grad_bias


class _DepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        padding = (weight.shape[2] // 2, weight.shape[3] // 2)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, 1, padding, 1, x.shape[1])

    @staticmethod
    @once_differentiable  # the weight gradient comes from compiled code: a double backward must raise, not lie
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        kernel = (weight.shape[2], weight.shape[3])
        channels_last = torch.channels_last
        grad_out = grad_out.contiguous(memory_format=channels_last)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # stride 1, 'same' padding, odd kernel: the transposed convolution is the flipped-kernel convolution
            grad_x = F.conv2d(grad_out, weight.flip(2, 3), None, 1, (kernel[0] // 2, kernel[1] // 2), 1, x.shape[1])
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            grad_weight, grad_bias = _weight_grad(x.contiguous(memory_format=channels_last), grad_out, kernel,
                                                  ctx.has_bias and ctx.needs_input_grad[2])
        return grad_x, grad_weight, grad_bias


def _cpu_can_run(x: Tensor, weight: Tensor, bias: Tensor | None):
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export() or \
            torch.compiler.is_compiling():
        return Decline("tracing, compiling or export: the plain convolution is what the graph records")
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return Decline(f"{x.device.type} {x.dtype} input: the kernel is for float32 on the CPU")
    if torch.is_autocast_enabled("cpu"):
        return Decline("autocast: the plain convolution takes autocast's casts")
    if not torch.is_grad_enabled():
        return None  # the forward is PyTorch's: no kernel needed (and none built where auto would not use it)
    lib = _load(routed_attention_cpu.current_march())
    if isinstance(lib, str):
        return Decline(lib, expected=False)
    return None


def _cpu_auto_skip(x: Tensor, weight: Tensor, bias: Tensor | None):
    if not torch.is_grad_enabled():
        return "no autograd: the backward is what this backend changes, the module runs"
    # measured, f+b at (1, 64, 80, 80) and (8, 64, 40, 40), channels-last: PyTorch's backward is as fast or faster
    # for kernels narrower than 5 (3x3 6.7 against 9.5 ms at (16, 64, 56, 56); 7x1 0.55 against 1.17 ms); for
    # 5x5 and 1xk strips this backend is 2-7x faster (5x5 1.97 against 4.58 ms, 1x21 1.09 against 6.34 ms)
    if weight.shape[3] < 5:
        return f"kernels narrower than 5 ({weight.shape[2]}x{weight.shape[3]}): PyTorch's own backward is as fast"
    return None


# skip_first: a 3x3 LePE in training never builds the kernel only to pass over it
DEPTHWISE_CONV.register("cpu", can_run=_cpu_can_run, auto_skip=_cpu_auto_skip, skip_first=True)(_DepthwiseConv.apply)


@DEPTHWISE_CONV.register("reference")
def _reference(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.conv2d(x, weight, bias, 1, (weight.shape[2] // 2, weight.shape[3] // 2), 1, x.shape[1])


def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """Depthwise convolution, stride 1, padding ``kernel // 2`` (output the size of the input).

    Args:
        x: (N, C, H, W), any memory format (channels-last is what the fast backward reads without a copy).
        weight: (C, 1, kh, kw) with odd kh, kw.
        bias: (C,) or None.
        backend: a backend name for this call (``None``: the process-wide choice).

    Returns:
        (N, C, H, W).
    """
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[0] != x.shape[1] or weight.shape[1] != 1:
        raise ValueError(f"depthwise_conv2d needs x (N, C, H, W) and weight (C, 1, kh, kw), got x of shape "
                         f"{tuple(x.shape)} and weight of shape {tuple(weight.shape)}")
    if weight.shape[2] % 2 == 0 or weight.shape[3] % 2 == 0:
        raise ValueError(f"depthwise_conv2d needs an odd kernel ('same' padding), got {tuple(weight.shape[2:])}")
    return DEPTHWISE_CONV(x, weight, bias, backend=backend)


def _is_same_depthwise(conv: nn.Conv2d) -> bool:
    k = conv.kernel_size
    return (conv.groups == conv.in_channels == conv.out_channels and conv.stride == (1, 1) and
            conv.dilation == (1, 1) and conv.padding == (k[0] // 2, k[1] // 2) and k[0] % 2 == 1 and
            k[1] % 2 == 1 and conv.padding_mode == "zeros")


def depthwise_conv_module(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)`` for a stride-1 'same' depthwise ``nn.Conv2d``, on :data:`DEPTHWISE_CONV`'s fast backend where
    it runs; the module itself (so its hooks, e.g. FLOPs counters, see the call) in inference, export, with the
    reference backend, other convolutions, or when the module has hooks."""
    if hooked(conv) or not _is_same_depthwise(conv):
        return conv(x)
    backend = DEPTHWISE_CONV.select(None, x, conv.weight, conv.bias)
    return conv(x) if backend.name == REFERENCE else backend.run(x, conv.weight, conv.bias)
