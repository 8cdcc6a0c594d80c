"""Argument and input checks shared by every yoloattn layer and op.

Each raises ``ValueError`` (a bad value) or ``TypeError`` (a bad type) whose message names the argument,
the value and what is allowed, so that a bad configuration fails when the layer is built and a bad
input fails before any kernel runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Real

import torch
from torch import Tensor

__all__ = ["check_image", "choice", "in_range", "odd_kernel", "positive_int", "real", "flag", "is_int", "hooked"]


def hooked(*modules: torch.nn.Module) -> bool:
    """Whether calling these modules would run forward hooks (their own or global ones): a fused op that skips
    a module's call must then call the module instead, so FLOPs counters and feature hooks see it run."""
    return bool(torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in modules))


def is_int(value) -> bool:
    """An integer that is not a bool; also a size while a graph is captured (a ``torch.SymInt`` under
    torch.compile/torch.export, a 0-d integer tensor under ``torch.jit.trace``)."""
    if isinstance(value, Tensor):
        return torch.jit.is_tracing() and value.dim() == 0 and not value.is_floating_point()
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, torch.SymInt)


def positive_int(name: str, value, minimum: int = 1) -> int:
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if not is_int(value):
        raise TypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    if isinstance(value, int) and value < minimum:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def odd_kernel(name: str, value) -> int:
    """0 (off) or an odd kernel size."""
    if not is_int(value) or value < 0 or (value > 0 and value % 2 == 0):
        raise ValueError(f"{name} must be 0 (off) or an odd kernel size, got {value!r}")
    return value


def choice(name: str, value, allowed: Iterable):
    allowed = tuple(allowed)
    if not isinstance(value, type(allowed[0])) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def in_range(name: str, value, low: float, high: float, *, high_open: bool = False) -> float:
    value = real(name, value)
    if not (low <= value < high if high_open else low <= value <= high):
        raise ValueError(f"{name} must be in [{low}, {high}{')' if high_open else ']'}, got {value!r}")
    return value


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_image(x, module: torch.nn.Module, channels: int, *, layout: str = "NCHW") -> None:
    """Check a layer's input: a 4-D floating-point tensor with ``channels`` channels, non-empty H and W, and
    the dtype of the module's weights (unless autocast casts it).

    Args:
        x: the input.
        module: the layer (its name and first floating-point parameter's dtype appear in the messages).
        channels: the channel count the layer was built for.
        layout: ``'NCHW'`` or ``'NHWC'``.
    """
    name = type(module).__name__
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} expects a tensor, got {type(x).__name__}")
    dims = {"NCHW": (1, 2, 3), "NHWC": (3, 1, 2)}[layout]
    shape = "(N, C, H, W)" if layout == "NCHW" else "(N, H, W, C)"
    if x.dim() != 4 or x.shape[dims[0]] != channels:
        expected = f"(N, {channels}, H, W)" if layout == "NCHW" else f"(N, H, W, {channels})"
        raise ValueError(f"{name} expects a {expected} tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} expects a floating-point input, got {x.dtype}")
    h, w = x.shape[dims[1]], x.shape[dims[2]]
    if isinstance(h, int) and isinstance(w, int) and (h < 1 or w < 1 or x.shape[0] < 1):
        raise ValueError(f"{name} needs N, H and W >= 1, got an input {shape} of shape {tuple(x.shape)}")
    weight = next((p for p in module.parameters() if p.is_floating_point()), None)
    if weight is None or x.dtype == weight.dtype or torch.is_autocast_enabled(x.device.type):
        return
    raise TypeError(f"{name} has {weight.dtype} weights but got a {x.dtype} input; cast one to the other "
                    f"(e.g. x.to({weight.dtype}) or module.to({x.dtype})), or run under torch.autocast")
