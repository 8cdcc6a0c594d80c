"""Token-to-token attention inside routed windows, the second level of BRA.

Every query window attends to the tokens of the ``topk`` key windows its router chose.
Three implementations compute the same thing:

- :func:`routed_attention_reference`, the math of BiFormer's legacy BRA written out:
  the routed key/value windows are copied with ``expand`` + ``gather`` and the full
  ``(windows·heads, Lq, topk·Lkv)`` attention matrix is built and soft-maxed.
- :func:`routed_attention_fast`: the routed windows are picked with ``index_select``
  (its backward is an ``index_add`` of the gathered size, not a ``P``-times zero buffer) and
  the attention runs in ``F.scaled_dot_product_attention``, whose fused kernels (fp32/bf16/fp16,
  CPU and CUDA) never materialise the attention matrix and accumulate the softmax in fp32; q/k/v
  head sizes are padded to match so the fused kernel applies when ``qk_dim != dim``. (float64
  inputs, as in gradcheck, run PyTorch's math kernel.)
- :func:`~yoloattn.nn.functional.cpu_kernel.routed_attention_cpu`: a compiled, vectorised CPU
  kernel (fp32, hard routing) that reads keys and values in place through the routing indices;
  at YOLOv8n's P3 it is 2.8× (forward) and 1.75× (forward+backward) as fast as the SDPA path.

:func:`routed_attention` chooses with :mod:`yoloattn.nn.backend`: the reference path, or the
fast path, which is the CPU kernel where it applies and the SDPA path elsewhere (CUDA, bf16/fp16,
soft routing, tracing and export); why the kernel declined is logged once per reason.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import log_decline, resolve_backend
from . import cpu_kernel

__all__ = ["routed_attention", "routed_attention_fast", "routed_attention_reference"]


def _check(q: Tensor, kv: Tensor, r_idx: Tensor, r_weight: Tensor | None, num_heads: int, qk_dim: int) -> None:
    if q.dim() not in (4, 6) or kv.dim() not in (4, 6) or r_idx.dim() != 3:
        raise ValueError(
            "expected q (N, P, Lq, Cqk) or (N, Py, Px, h, w, Cqk), kv (N, P, Lkv, Cqk + Cv) or "
            f"(N, Py, Px, hk, wk, Cqk + Cv) and r_idx (N, P, topk), got shapes {tuple(q.shape)}, "
            f"{tuple(kv.shape)} and {tuple(r_idx.shape)}"
        )
    windows = [t.shape[0] * t.shape[1] if t.dim() == 4 else t.shape[0] * t.shape[1] * t.shape[2] for t in (q, kv)]
    if windows[0] != windows[1] or windows[0] != r_idx.shape[0] * r_idx.shape[1] or q.shape[0] != r_idx.shape[0]:
        raise ValueError(f"q, kv and r_idx must have the same N and P windows, got shapes {tuple(q.shape)}, "
                         f"{tuple(kv.shape)} and {tuple(r_idx.shape)}")
    if q.shape[-1] != qk_dim or kv.shape[-1] <= qk_dim:
        raise ValueError(f"q must have qk_dim={qk_dim} channels and kv more than that, got {q.shape[-1]} and {kv.shape[-1]}")
    if qk_dim % num_heads or (kv.shape[-1] - qk_dim) % num_heads:
        raise ValueError(f"qk_dim={qk_dim} and v channels={kv.shape[-1] - qk_dim} must be divisible by num_heads={num_heads}")
    if r_idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"r_idx must be an integer tensor, got {r_idx.dtype}")
    if r_weight is not None and r_weight.shape != r_idx.shape:
        raise ValueError(f"r_weight must have the shape of r_idx {tuple(r_idx.shape)}, got {tuple(r_weight.shape)}")


def _check_valid_hw(q: Tensor, valid_hw) -> None:
    if valid_hw is None:
        return
    if q.dim() != 6:
        raise ValueError(f"valid_hw needs q as (N, Py, Px, h, w, C) image tiles, got shape {tuple(q.shape)}")
    if (not isinstance(valid_hw, (tuple, list)) or len(valid_hw) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in valid_hw)):
        raise ValueError(f"valid_hw must be a pair of positive integers (H, W), got {valid_hw!r}")


def _crop(out: Tensor, valid_hw: tuple[int, int] | None) -> Tensor:
    """(N, Py, Px, h, w, C) tiles -> the (N, H, W, C) top-left ``valid_hw`` of their image (a view), or as is."""
    if valid_hw is None:
        return out
    n, py, px, h, w, c = out.shape
    return out.transpose(2, 3).reshape(n, py * h, px * w, c)[:, :valid_hw[0], :valid_hw[1]]


def _as_windows(t: Tensor) -> Tensor:
    """(N, Py, Px, h, w, C) image tiles -> (N, P, L, C) windows (a copy unless already window-major)."""
    if t.dim() == 6:
        n, py, px, h, w, c = t.shape
        return t.reshape(n, py * px, h * w, c)
    return t


def _heads(t: Tensor, num_heads: int) -> Tensor:
    # (B, L, m·c) -> (B, m, L, c)
    b, length, channels = t.shape
    return t.reshape(b, length, num_heads, channels // num_heads).transpose(1, 2)


def _merge_heads(out: Tensor, n: int, p: int) -> Tensor:
    # (N·P, m, Lq, c) -> (N, P, Lq, m·c)
    _, m, lq, c = out.shape
    return out.transpose(1, 2).reshape(n, p, lq, m * c)


def routed_attention_reference(
    q: Tensor,
    kv: Tensor,
    r_idx: Tensor,
    r_weight: Tensor | None = None,
    *,
    num_heads: int,
    qk_dim: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Reference routed attention; also returns the attention matrix.

    Same arguments as :func:`routed_attention`.

    Returns:
        out: (N, P, Lq, Cv).
        attn: (N·P, num_heads, Lq, topk·Lkv), the soft-maxed attention weights.
    """
    n, p, lkv, c_kv = kv.shape
    topk = r_idx.shape[-1]
    # (n, p, p, lkv, c_kv) view, gathered along the key-window axis -> (n, p, topk, lkv, c_kv)
    kv_sel = torch.gather(
        kv.view(n, 1, p, lkv, c_kv).expand(-1, p, -1, -1, -1),
        dim=2,
        index=r_idx.long().view(n, p, topk, 1, 1).expand(-1, -1, -1, lkv, c_kv),
    )
    if r_weight is not None:
        kv_sel = kv_sel * r_weight.to(kv_sel.dtype).view(n, p, topk, 1, 1)
    kv_sel = kv_sel.reshape(n * p, topk * lkv, c_kv)
    k = _heads(kv_sel[..., :qk_dim], num_heads)  # (n·p, m, topk·lkv, c_qk/m)
    v = _heads(kv_sel[..., qk_dim:], num_heads)  # (n·p, m, topk·lkv, c_v/m)
    qh = _heads(q.reshape(n * p, q.shape[2], qk_dim), num_heads)  # (n·p, m, lq, c_qk/m)
    logits = (qh * scale) @ k.transpose(-2, -1)  # (n·p, m, lq, topk·lkv)
    attn = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(v.dtype)
    return _merge_heads(attn @ v, n, p), attn


def routed_attention_fast(
    q: Tensor,
    kv: Tensor,
    r_idx: Tensor,
    r_weight: Tensor | None = None,
    *,
    num_heads: int,
    qk_dim: int,
    scale: float,
) -> Tensor:
    """Fast routed attention with ``index_select`` and ``scaled_dot_product_attention``.

    Same arguments and result as :func:`routed_attention`.
    """
    n, p, lkv, c_kv = kv.shape
    topk = r_idx.shape[-1]
    # global window index of every routed window: (n·p·topk,)
    offsets = torch.arange(n, device=r_idx.device, dtype=r_idx.dtype).view(n, 1, 1) * p
    flat_idx = (r_idx + offsets).reshape(-1).long()
    kv_sel = kv.reshape(n * p, lkv, c_kv).index_select(0, flat_idx)  # (n·p·topk, lkv, c_kv)
    if r_weight is not None:
        kv_sel = kv_sel * r_weight.to(kv_sel.dtype).reshape(n * p * topk, 1, 1)
    k, v = kv_sel.view(n * p, topk * lkv, c_kv).split([qk_dim, c_kv - qk_dim], dim=-1)
    k, v = _heads(k, num_heads), _heads(v, num_heads)  # (n·p, m, topk·lkv, c/m)
    # a heads-major contiguous q: the CPU flash kernel is slower on a token-major q view (23 vs 18 ms at
    # YOLOv8n's P3 in isolation); k/v copies cost more than they gain
    qh = _heads(q.reshape(n * p, q.shape[2], qk_dim), num_heads).contiguous()  # (n·p, m, lq, c_qk/m)
    if v.dtype != qh.dtype:  # autocast can leave q and kv in different dtypes
        qh, k = qh.to(v.dtype), k.to(v.dtype)
    dqk, dv = k.shape[-1], v.shape[-1]
    # The fused CPU kernel needs equal q/k and v head sizes; zero channels change neither
    # the logits (padded q/k) nor the kept outputs (padded v), so pad the smaller side.
    if dqk < dv:
        qh, k = F.pad(qh, (0, dv - dqk)), F.pad(k, (0, dv - dqk))
    elif dv < dqk:
        v = F.pad(v, (0, dqk - dv))
    out = F.scaled_dot_product_attention(qh, k, v, scale=scale)[..., :dv]  # (n·p, m, lq, c_v/m)
    return _merge_heads(out, n, p)


def routed_attention(
    q: Tensor,
    kv: Tensor,
    r_idx: Tensor,
    r_weight: Tensor | None = None,
    *,
    num_heads: int,
    qk_dim: int,
    scale: float,
    return_attn: bool = False,
    valid_hw: tuple[int, int] | None = None,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Multi-head attention of each query window over the key/value windows routed to it.

    Args:
        q: (N, P, Lq, Cqk) queries of the P windows, Lq tokens each; or (N, Py, Px, h, w, Cqk) with
            P = Py·Px and Lq = h·w, e.g. ``img.view(N, Py, h, Px, w, C).transpose(2, 3)`` of an NHWC image,
            whose tiles the CPU kernel then reads in place (other paths copy them into windows).
        kv: (N, P, Lkv, Cqk + Cv) keys then values of every window (possibly pooled), or image tiles
            (N, Py, Px, hk, wk, Cqk + Cv) like q.
        r_idx: (N, P, topk) integer indices of the windows routed to each query window.
        r_weight: (N, P, topk) or None. If given, the keys and values of each routed
            window are multiplied by its weight (BiFormer's soft routing).
        num_heads: number of heads m; Cqk and Cv must be divisible by it.
        qk_dim: Cqk, the number of query/key channels (keys are ``kv[..., :qk_dim]``).
        scale: factor applied to the logits (BiFormer uses ``qk_dim ** -0.5``).
        return_attn: also return the (N·P, m, Lq, topk·Lkv) attention weights; this needs the
            full matrix, so it always runs the reference math.
        valid_hw: (H, W) for image tiles q: only the queries in the top-left H×W of their (Py·h, Px·w)
            token grid are wanted, e.g. the unpadded image when the tiles cut a zero-padded one; the
            output is then the (N, H, W, Cv) image of those queries (the CPU kernel skips the others,
            the other paths compute and crop them). Keys and values are never restricted.
        backend: override the process-wide backend for this call.

    Returns:
        out: heads concatenated along channels, in q's form: (N, P, Lq, Cv), or (N, Py, Px, h, w, Cv)
            tiles (of a new (N, Py·h, Px·w, Cv) image on the CPU kernel path), or the (N, H, W, Cv)
            image with ``valid_hw``; or ``(out, attn)``.
    """
    _check(q, kv, r_idx, r_weight, num_heads, qk_dim)
    _check_valid_hw(q, valid_hw)
    reason = "the attention matrix was requested" if return_attn else None
    if resolve_backend("routed_attention", reason, backend) == "fast":
        kernel_reason = cpu_kernel.decline_reason(q, kv, r_weight, num_heads, qk_dim)
        if kernel_reason is None:
            return cpu_kernel.routed_attention_cpu(q, kv, r_idx, num_heads=num_heads, qk_dim=qk_dim, scale=scale,
                                                   valid_hw=valid_hw)
        log_decline("routed_attention", kernel_reason, "the SDPA fast path")
        out = routed_attention_fast(_as_windows(q), _as_windows(kv), r_idx, r_weight, num_heads=num_heads,
                                    qk_dim=qk_dim, scale=scale)
        return _crop(out.view(*q.shape[:-1], out.shape[-1]), valid_hw)
    out, attn = routed_attention_reference(_as_windows(q), _as_windows(kv), r_idx, r_weight, num_heads=num_heads,
                                           qk_dim=qk_dim, scale=scale)
    out = _crop(out.view(*q.shape[:-1], out.shape[-1]), valid_hw)
    return (out, attn) if return_attn else out
