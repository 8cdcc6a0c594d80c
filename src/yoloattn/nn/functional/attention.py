"""Plain multi-head softmax attention, the attention of BiFormer's ``topk=-1``/``-2`` blocks.

Backends (:data:`ATTENTION`): ``'sdpa'`` (``F.scaled_dot_product_attention``: fused, never builds the
attention matrix) and ``'reference'`` (the logits, softmax and product written out, as BiFormer's code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import Op

__all__ = ["ATTENTION", "multi_head_attention"]

ATTENTION = Op("attention")


def _sdpa(q: Tensor, k: Tensor, v: Tensor, *, scale: float, dropout_p: float = 0.0) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)


def _reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float, dropout_p: float = 0.0) -> Tensor:
    logits = (q * scale) @ k.transpose(-2, -1)
    attn = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(v.dtype)
    return F.dropout(attn, dropout_p) @ v


ATTENTION.register("sdpa")(_sdpa)
ATTENTION.register("reference")(_reference)


def multi_head_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, dropout_p: float = 0.0,
                         backend: str | None = None) -> Tensor:
    """Softmax attention per head.

    Args:
        q, k, v: (B, m, L, c) queries, keys and values.
        scale: factor on the logits.
        dropout_p: dropout on the attention weights.
        backend: a backend name for this call (``None``: the process-wide choice).

    Returns:
        (B, m, L, c).
    """
    return ATTENTION(q, k, v, scale=scale, dropout_p=dropout_p, backend=backend)
