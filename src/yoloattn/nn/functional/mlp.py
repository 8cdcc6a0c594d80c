"""A transformer MLP branch, ``fc2(gelu(fc1(layer_norm(x))))``, with a backward that keeps less.

BiFormer's blocks spend most of their training memory here: autograd keeps the LayerNorm's input and output,
the 3×-wide ``fc1`` output and the 3×-wide GELU output, 8 channel-widths per token at ``mlp_ratio=3``.

Backends (:data:`LAYER_NORM_MLP`):

- ``'lean'``: one autograd function that keeps the input and the ``fc1`` output (4 widths) and recomputes the
  LayerNorm output and the GELU in the backward, elementwise work only; with ``recompute=True`` it keeps the
  input alone and also recomputes ``fc1`` (one matmul, where checkpointing re-runs both and records a graph).
- ``'reference'``: the plain composition under autograd; ``recompute=True`` wraps it in
  :func:`torch.utils.checkpoint.checkpoint`.

Both compute the forward with the same ATen calls, so outputs are bitwise equal; gradients agree to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..backends import Decline, Op

__all__ = ["LAYER_NORM_MLP", "layer_norm_mlp"]

LAYER_NORM_MLP = Op("layer_norm_mlp")


def _plain(x, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate):
    # the width from the weight, not from x: an export trace then keeps it a constant
    x = F.layer_norm(x, (fc1_weight.shape[1],), norm_weight, norm_bias, eps)
    return F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias), approximate=approximate), fc2_weight, fc2_bias)


class _LeanMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, approximate,
                recompute):
        normed, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps)
        hidden = F.linear(normed, fc1_weight, fc1_bias)  # (..., hidden)
        out = F.linear(F.gelu(hidden, approximate=approximate), fc2_weight, fc2_bias)
        ctx.save_for_backward(x, mean, rstd, None if recompute else hidden, norm_weight, norm_bias, fc1_weight,
                              fc1_bias, fc2_weight)
        ctx.eps, ctx.approximate = eps, approximate
        ctx.has_biases = fc1_bias is not None, fc2_bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, mean, rstd, hidden, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight = ctx.saved_tensors
        c = x.shape[-1]
        # recomputed by the same ATen call as in the forward, so the same values
        normed = torch.native_layer_norm(x, (c,), norm_weight, norm_bias, ctx.eps)[0]
        if hidden is None:
            hidden = F.linear(normed, fc1_weight, fc1_bias)
        activated = F.gelu(hidden, approximate=ctx.approximate)
        rows = grad_out.reshape(-1, grad_out.shape[-1])  # (M, C_out)
        grad_fc2_weight = rows.t().mm(activated.reshape(-1, activated.shape[-1]))
        grad_fc2_bias = rows.sum(0) if ctx.has_biases[1] else None
        grad_activated = grad_out.matmul(fc2_weight)  # (..., hidden)
        del activated
        grad_hidden = torch.ops.aten.gelu_backward(grad_activated, hidden, approximate=ctx.approximate)
        del grad_activated, hidden
        hidden_rows = grad_hidden.reshape(-1, grad_hidden.shape[-1])
        grad_fc1_weight = hidden_rows.t().mm(normed.reshape(-1, c))
        grad_fc1_bias = hidden_rows.sum(0) if ctx.has_biases[0] else None
        grad_normed = grad_hidden.matmul(fc1_weight)  # (..., C)
        del grad_hidden, normed
        grad_x, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_layer_norm_backward(
            grad_normed, x, (c,), mean, rstd, norm_weight, norm_bias,
            [ctx.needs_input_grad[0], norm_weight is not None and ctx.needs_input_grad[1],
             norm_bias is not None and ctx.needs_input_grad[2]])
        return (grad_x, grad_norm_weight, grad_norm_bias, grad_fc1_weight, grad_fc1_bias, grad_fc2_weight,
                grad_fc2_bias, None, None, None)


def _lean_can_run(x, *args, **kwargs):
    if not torch.is_grad_enabled():
        return Decline("no autograd: nothing to keep for a backward")
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
        return Decline("tracing or export: the plain ops are what the graph records")
    if x.dtype not in (torch.float32, torch.float64):
        return Decline(f"dtype {x.dtype}: lean keeps float32/float64 only")
    if torch.is_autocast_enabled(x.device.type):
        return Decline("autocast: the plain ops take autocast's casts")
    return None


@LAYER_NORM_MLP.register("lean", can_run=_lean_can_run)
def _lean(x, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, recompute):
    return _LeanMLP.apply(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, approximate,
                          recompute)


@LAYER_NORM_MLP.register("reference")
def _reference(x, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, recompute):
    args = (x, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate)
    if recompute and torch.is_grad_enabled():
        return checkpoint(_plain, *args, use_reentrant=False)
    return _plain(*args)


def layer_norm_mlp(x: Tensor, norm_weight: Tensor | None, norm_bias: Tensor | None, eps: float,
                   fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor, fc2_bias: Tensor | None, *,
                   approximate: str = "none", recompute: bool = False, backend: str | None = None) -> Tensor:
    """``fc2(gelu(fc1(layer_norm(x))))`` over the last dimension.

    Args:
        x: (..., C) channels-last tokens.
        norm_weight, norm_bias: (C,) LayerNorm affine parameters, or None.
        eps: LayerNorm epsilon.
        fc1_weight, fc1_bias: (hidden, C) and (hidden,) or None.
        fc2_weight, fc2_bias: (C_out, hidden) and (C_out,) or None.
        approximate: GELU's ``'none'`` (erf) or ``'tanh'``.
        recompute: keep only ``x`` for the backward and recompute the rest there (gradient checkpointing).
        backend: a backend name for this call (``None``: the process-wide choice).

    Returns:
        (..., C_out).
    """
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return LAYER_NORM_MLP(x, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate,
                          bool(recompute), backend=backend)
