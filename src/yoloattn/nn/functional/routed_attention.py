"""Token-to-token attention inside routed windows, the second level of BRA.

Every query window attends to the tokens of the ``topk`` key windows its router chose. The op
:func:`routed_attention` has four backends (:data:`ROUTED_ATTENTION`, see :mod:`yoloattn.nn.backends`),
tried in this order by ``'auto'``:

- ``'cpu'``: the compiled, vectorised CPU kernel (fp32, hard routing) of :mod:`.routed_attention_cpu`,
  registered as the op ``torch.ops.yoloattn.routed_attention``; it reads queries, keys and values in
  place and never builds the gathered keys or the attention matrix.
- ``'dense'``: ``F.scaled_dot_product_attention`` over the whole map with a mask that keeps the routed
  windows (hard routing): no copies, ``P / topk`` times the multiply-adds, the fastest where windows are
  tiny and route a large share of the map (BiFormer's third stage).
- ``'sdpa'``: the routed windows picked with ``index_select`` (its backward is an ``index_add`` of the
  gathered size) and ``F.scaled_dot_product_attention`` (fused kernels on CPU and CUDA, fp32/bf16/fp16,
  softmax accumulated in fp32); plain PyTorch, so it traces, exports to ONNX and runs anywhere.

``'auto'`` on a CPU in float32 takes whichever of ``'cpu'``, ``'dense'`` (where it does at most
:data:`DENSE_MAX_RATIO` times the routed work) and ``'sdpa'`` measured fastest on this machine, once per
shape and direction (inference / training), cached next to the kernel; elsewhere (CUDA, half precision,
soft routing, exports) the kernel where it can run, else ``'sdpa'``.
- ``'reference'``: the math of BiFormer's released BRA written out: the routed key/value windows copied
  with ``expand`` + ``gather`` and the full ``(windows·heads, Lq, topk·Lkv)`` attention matrix soft-maxed.

Layouts, whatever the backend: q and kv are image tiles ``(N, Py, Px, h, w, C)`` (P = Py·Px windows of
h×w tokens, e.g. ``img.view(N, Py, h, Px, w, C).transpose(2, 3)`` of an NHWC image; pooled key windows
of L tokens are ``(N, Py, Px, 1, L, C)``), and the output is the NHWC image ``(N, H, W, Cv)`` of the
queries, cropped to ``valid_hw``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._hooks import constant_for_compile
from .._checks import is_int
from ..backends import Decline, Op
from . import routed_attention_cpu as cpu
from ._autotune import Autotuner

__all__ = ["DENSE_MAX_RATIO", "ROUTED_ATTENTION", "routed_attention", "routed_attention_dense",
           "routed_attention_reference", "routed_attention_sdpa"]

ROUTED_ATTENTION = Op("routed_attention")


def _check(q: Tensor, kv: Tensor, r_idx: Tensor, r_weight: Tensor | None, num_heads: int, valid_hw) -> tuple:
    """Validate the inputs; returns ``valid_hw`` as (H, W)."""
    if q.dim() != 6 or kv.dim() != 6 or r_idx.dim() != 3:
        raise ValueError("expected q (N, Py, Px, h, w, Cqk) and kv (N, Py, Px, hk, wk, Cqk + Cv) image tiles and "
                         f"r_idx (N, Py·Px, topk), got shapes {tuple(q.shape)}, {tuple(kv.shape)} and "
                         f"{tuple(r_idx.shape)}")
    n, py, px = q.shape[:3]
    if kv.shape[:3] != q.shape[:3] or r_idx.shape[:2] != (n, py * px):
        raise ValueError(f"q, kv and r_idx must have the same N and windows, got shapes {tuple(q.shape)}, "
                         f"{tuple(kv.shape)} and {tuple(r_idx.shape)}")
    if not is_int(num_heads) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
    qk_dim, v_dim = q.shape[-1], kv.shape[-1] - q.shape[-1]
    if v_dim < 1 or qk_dim % num_heads or v_dim % num_heads:
        raise ValueError(f"kv must hold q's {qk_dim} key channels plus values, and both must be divisible by "
                         f"num_heads={num_heads}; got q {tuple(q.shape)} and kv {tuple(kv.shape)}")
    if r_idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"r_idx must be an integer tensor, got {r_idx.dtype}")
    if r_weight is not None and r_weight.shape != r_idx.shape:
        raise ValueError(f"r_weight must have the shape of r_idx {tuple(r_idx.shape)}, got {tuple(r_weight.shape)}")
    if not q.is_floating_point() or q.dtype != kv.dtype:
        raise TypeError(f"q and kv must be floating-point tensors of one dtype, got {q.dtype} and {kv.dtype}")
    rows, cols = py * q.shape[3], px * q.shape[4]
    if valid_hw is None:
        return rows, cols
    if (not isinstance(valid_hw, (tuple, list)) or len(valid_hw) != 2 or not all(is_int(v) for v in valid_hw)
            or any(isinstance(v, int) and not 1 <= v <= limit for v, limit in zip(valid_hw, (rows, cols)))):
        raise ValueError(f"valid_hw must be a pair of integers (H, W) with 1 <= H <= {rows} and 1 <= W <= {cols} "
                         f"(the tiles' token grid), got {valid_hw!r}")
    return tuple(valid_hw)


def _windows(t: Tensor) -> Tensor:
    """(N, Py, Px, h, w, C) tiles -> (N, P, h·w, C) windows (a copy unless the tiles are window-major)."""
    n, py, px, h, w, c = t.shape
    return t.reshape(n, py * px, h * w, c)


def _image(out: Tensor, q: Tensor, valid_hw: tuple) -> Tensor:
    """(N, P, Lq, Cv) window outputs -> the (N, H, W, Cv) image of q's tiles, cropped to ``valid_hw``."""
    n, py, px, h, w, _ = q.shape
    img = out.view(n, py, px, h, w, out.shape[-1]).transpose(2, 3).reshape(n, py * h, px * w, out.shape[-1])
    return img[:, :valid_hw[0], :valid_hw[1]]


def _heads(t: Tensor, num_heads: int) -> Tensor:
    # (B, L, m·c) -> (B, m, L, c)
    b, length, channels = t.shape
    return t.reshape(b, length, num_heads, channels // num_heads).transpose(1, 2)


def _merge_heads(out: Tensor, n: int, p: int) -> Tensor:
    # (N·P, m, Lq, c) -> (N, P, Lq, m·c)
    _, m, lq, c = out.shape
    return out.transpose(1, 2).reshape(n, p, lq, m * c)


def routed_attention_reference(q: Tensor, kv: Tensor, r_idx: Tensor, r_weight: Tensor | None = None, *,
                               num_heads: int, scale: float, valid_hw=None) -> tuple[Tensor, Tensor]:
    """The reference backend; also returns the attention matrix.

    Same arguments as :func:`routed_attention`.

    Returns:
        out: (N, H, W, Cv).
        attn: (N·P, num_heads, Lq, topk·Lkv), the soft-maxed attention weights.
    """
    valid_hw = _check(q, kv, r_idx, r_weight, num_heads, valid_hw)
    qk_dim = q.shape[-1]
    qw, kvw = _windows(q), _windows(kv)
    n, p, lkv, c_kv = kvw.shape
    topk = r_idx.shape[-1]
    # (n, p, p, lkv, c_kv) view, gathered along the key-window axis -> (n, p, topk, lkv, c_kv)
    kv_sel = torch.gather(
        kvw.view(n, 1, p, lkv, c_kv).expand(-1, p, -1, -1, -1),
        dim=2,
        index=r_idx.long().view(n, p, topk, 1, 1).expand(-1, -1, -1, lkv, c_kv),
    )
    if r_weight is not None:
        kv_sel = kv_sel * r_weight.to(kv_sel.dtype).view(n, p, topk, 1, 1)
    kv_sel = kv_sel.reshape(n * p, topk * lkv, c_kv)
    k = _heads(kv_sel[..., :qk_dim], num_heads)  # (n·p, m, topk·lkv, c_qk/m)
    v = _heads(kv_sel[..., qk_dim:], num_heads)  # (n·p, m, topk·lkv, c_v/m)
    qh = _heads(qw.reshape(n * p, qw.shape[2], qk_dim), num_heads)  # (n·p, m, lq, c_qk/m)
    logits = (qh * scale) @ k.transpose(-2, -1)  # (n·p, m, lq, topk·lkv)
    attn = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(v.dtype)
    return _image(_merge_heads(attn @ v, n, p), q, valid_hw), attn


def _reference(q, kv, r_idx, r_weight=None, *, num_heads, scale, valid_hw=None) -> Tensor:
    return routed_attention_reference(q, kv, r_idx, r_weight, num_heads=num_heads, scale=scale, valid_hw=valid_hw)[0]


def routed_attention_sdpa(q: Tensor, kv: Tensor, r_idx: Tensor, r_weight: Tensor | None = None, *, num_heads: int,
                          scale: float, valid_hw=None) -> Tensor:
    """The ``sdpa`` backend: ``index_select`` of the routed windows and ``scaled_dot_product_attention``.

    Same arguments and result as :func:`routed_attention`.
    """
    valid_hw = _check(q, kv, r_idx, r_weight, num_heads, valid_hw)
    qk_dim = q.shape[-1]
    qw, kvw = _windows(q), _windows(kv)
    n, p, lkv, c_kv = kvw.shape
    topk = r_idx.shape[-1]
    # global window index of every routed window: (n·p·topk,)
    offsets = torch.arange(n, device=r_idx.device, dtype=r_idx.dtype).view(n, 1, 1) * p
    flat_idx = (r_idx + offsets).reshape(-1).long()
    kv_sel = kvw.reshape(n * p, lkv, c_kv).index_select(0, flat_idx)  # (n·p·topk, lkv, c_kv)
    if r_weight is not None:
        kv_sel = kv_sel * r_weight.to(kv_sel.dtype).reshape(n * p * topk, 1, 1)
    k, v = kv_sel.view(n * p, topk * lkv, c_kv).split([qk_dim, c_kv - qk_dim], dim=-1)
    k, v = _heads(k, num_heads), _heads(v, num_heads)  # (n·p, m, topk·lkv, c/m)
    # a heads-major contiguous q: PyTorch's CPU flash kernel is slower on a token-major view
    qh = _heads(qw.reshape(n * p, qw.shape[2], qk_dim), num_heads).contiguous()  # (n·p, m, lq, c_qk/m)
    if v.dtype != qh.dtype:  # autocast can leave q and kv in different dtypes
        qh, k = qh.to(v.dtype), k.to(v.dtype)
    dqk, dv = k.shape[-1], v.shape[-1]
    # The fused kernel needs equal q/k and v head sizes; zero channels change neither the logits (padded
    # q/k) nor the kept outputs (padded v), so pad the smaller side.
    if dqk < dv:
        qh, k = F.pad(qh, (0, dv - dqk)), F.pad(k, (0, dv - dqk))
    elif dv < dqk:
        v = F.pad(v, (0, dqk - dv))
    out = F.scaled_dot_product_attention(qh, k, v, scale=scale)[..., :dv]  # (n·p, m, lq, c_v/m)
    return _image(_merge_heads(out, n, p), q, valid_hw)


def routed_attention_dense(q: Tensor, kv: Tensor, r_idx: Tensor, r_weight: Tensor | None = None, *, num_heads: int,
                           scale: float, valid_hw=None) -> Tensor:
    """The ``dense`` backend: ``scaled_dot_product_attention`` over the whole map, with an additive mask that
    keeps each query window's routed key windows.

    Where every window routes a large share of the map (small maps: BiFormer's third stage at 224 routes 16 of
    49 windows of 2×2 tokens), attending to all keys costs ``P / topk`` times the multiply-adds of the routed
    ones but copies nothing, while the ``sdpa`` backend copies every routed window ``topk`` times. The mask is
    ``log(count)``: 0 for a routed window, ``-inf`` for the others, ``log 2`` for a window routed twice (the
    routed attention then attends to its keys twice), so the result is the routed attention's exactly. Hard
    routing only (``r_weight`` must be None: soft routing scales keys per query window).

    Same arguments and result as :func:`routed_attention`.
    """
    valid_hw = _check(q, kv, r_idx, r_weight, num_heads, valid_hw)
    if r_weight is not None:
        raise ValueError("the dense backend takes hard routing only (r_weight=None): soft routing scales the keys "
                         "and values of each routed window per query window")
    n, py, px, h, w, qk_dim = q.shape
    p, lq, lkv, c_kv = py * px, h * w, kv.shape[3] * kv.shape[4], kv.shape[-1]
    count_dtype = torch.promote_types(q.dtype, torch.float32)
    counts = q.new_zeros(n, p, p, dtype=count_dtype).scatter_add_(
        2, r_idx.long(), q.new_ones(r_idx.shape, dtype=count_dtype))  # (n, query window, key window)
    bias = counts.log().view(n, 1, p, 1, p, 1).expand(n, 1, p, lq, p, lkv).reshape(n, 1, p * lq, p * lkv)
    qh = _heads(_windows(q).reshape(n, p * lq, qk_dim), num_heads).contiguous()  # (n, m, p·lq, c_qk/m)
    k, v = _windows(kv).reshape(n, p * lkv, c_kv).split([qk_dim, c_kv - qk_dim], dim=-1)
    k, v = _heads(k, num_heads), _heads(v, num_heads)  # (n, m, p·lkv, c/m)
    if v.dtype != qh.dtype:
        qh, k = qh.to(v.dtype), k.to(v.dtype)
    dqk, dv = k.shape[-1], v.shape[-1]
    if dqk < dv:  # equal head sizes for the fused kernel, as in the sdpa backend
        qh, k = F.pad(qh, (0, dv - dqk)), F.pad(k, (0, dv - dqk))
    elif dv < dqk:
        v = F.pad(v, (0, dqk - dv))
    out = F.scaled_dot_product_attention(qh, k, v, attn_mask=bias.to(qh.dtype), scale=scale)[..., :dv]
    out = out.transpose(1, 2).reshape(n, p, lq, out.shape[1] * dv)  # (n, p, lq, m·c_v/m)
    return _image(out, q, valid_hw)


# ---- 'auto': the cpu kernel, the dense or the sdpa backend, whichever measured fastest -------------------------
_TUNER = Autotuner("routed_attention", preferred="cpu")
# YOLOATTN_AUTOTUNE=0: 'auto' takes the kernel wherever it can run, without measuring
_AUTOTUNE = os.environ.get("YOLOATTN_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off")
_TUNE_WINDOWS = 64  # windows in the synthetic problem (whole images of P windows): a few ms per run
# the dense backend is measured only where it does at most this many times the routed multiply-adds
DENSE_MAX_RATIO = 4


def _tune_key(q: Tensor, kv: Tensor, r_idx: Tensor, num_heads: int, training: bool) -> tuple[int, ...] | None:
    """Integers that decide which backend is fastest, or None if some are symbolic (export, dynamic compile):
    (training, images, windows per image, h, w, Lkv, topk, heads, Cqk, Cv, threads)."""
    n, py, px, h, w, cq = q.shape
    p = py * px
    images = min(n, -(-_TUNE_WINDOWS // p)) if isinstance(n, int) and isinstance(p, int) else n
    values = (int(training), images, p, h, w, kv.shape[3] * kv.shape[4], r_idx.shape[-1], num_heads, cq,
              kv.shape[-1] - cq, torch.get_num_threads())
    return values if all(isinstance(v, int) for v in values) else None


def _dense_worth_measuring(p: int, topk: int) -> bool:
    return p <= DENSE_MAX_RATIO * topk


def _candidates(key: tuple[int, ...]):
    training, images, p, h, w, lkv, topk, heads, cq, cv, _ = key

    def build():
        g = torch.Generator().manual_seed(0)
        q = torch.randn(images, 1, p, h, w, cq, generator=g)
        kv = torch.randn(images, 1, p, 1, lkv, cq + cv, generator=g)
        r_idx = torch.stack([torch.randperm(p, generator=g)[:topk] for _ in range(images * p)]).view(images, p, -1)
        kw = dict(num_heads=heads, scale=cq ** -0.5, valid_hw=(h, p * w))

        def run(fn):
            if not training:
                with torch.no_grad():
                    return lambda: fn(q, kv, r_idx, **kw)
            qg, kvg = q.clone().requires_grad_(), kv.clone().requires_grad_()
            return lambda: fn(qg, kvg, r_idx, **kw).sum().backward()

        fns = {"cpu": run(cpu.routed_attention_cpu)} if cpu.build_info()["available"] else {}
        fns["sdpa"] = run(routed_attention_sdpa)
        if _dense_worth_measuring(p, topk):
            fns["dense"] = run(routed_attention_dense)
        return fns

    return build


def _tuned_key(q, kv, r_idx, num_heads) -> tuple[int, ...] | None:
    training = torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad)
    return _tune_key(q, kv, r_idx, num_heads, training)


@constant_for_compile
def _tuned_winner(key: tuple[int, ...]) -> str:
    info = cpu.build_info()
    build_id = info["build_id"] if info["available"] else f"{info['march']}-no-kernel"
    record = _TUNER.choose(build_id, ",".join(map(str, key)), _candidates(key))
    return record["winner"]


def _cpu_can_run(q, kv, r_idx, r_weight=None, *, num_heads, scale, valid_hw=None):
    reason = cpu.decline(q, kv, r_weight, num_heads)
    if reason is not None:
        return Decline(reason, expected=not reason.startswith("the CPU kernel (-march"))
    return None


def _cpu_slower(q, kv, r_idx, r_weight=None, *, num_heads, scale, valid_hw=None):
    if not _AUTOTUNE:
        return None
    key = _tuned_key(q, kv, r_idx, num_heads)
    if key is not None and (winner := _tuned_winner(key)) != "cpu":
        return Decline(f"the {winner} backend measured faster for this shape and direction on this machine")
    return None


def _dense_can_run(q, kv, r_idx, r_weight=None, *, num_heads, scale, valid_hw=None):
    if r_weight is not None:
        return Decline("the dense backend takes hard routing only (r_weight=None)")
    return None


def _dense_not_fastest(q, kv, r_idx, r_weight=None, *, num_heads, scale, valid_hw=None):
    # 'auto' takes it only where it was measured fastest: CPU float32, sizes known, autotuning on
    if not _AUTOTUNE or q.device.type != "cpu" or q.dtype != torch.float32:
        return Decline("the dense backend is chosen by measurement only (CPU float32 with autotuning on)")
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
        return Decline("an export records the sdpa backend, whatever was measured")
    key = _tuned_key(q, kv, r_idx, num_heads)
    if key is None or not _dense_worth_measuring(key[2], key[6]):
        return Decline("the dense backend would do too many times the routed multiply-adds here")
    if _tuned_winner(key) != "dense":
        return Decline("another backend measured faster for this shape and direction on this machine")
    return None


def _cpu(q, kv, r_idx, r_weight=None, *, num_heads, scale, valid_hw=None) -> Tensor:
    valid_hw = _check(q, kv, r_idx, r_weight, num_heads, valid_hw)
    return cpu.routed_attention_cpu(q, kv, r_idx, num_heads=num_heads, scale=scale, valid_hw=valid_hw)


# 'auto' tries them in this order (the reference last, whatever the order)
ROUTED_ATTENTION.register("cpu", can_run=_cpu_can_run, auto_skip=_cpu_slower)(_cpu)
ROUTED_ATTENTION.register("dense", can_run=_dense_can_run, auto_skip=_dense_not_fastest)(routed_attention_dense)
ROUTED_ATTENTION.register("sdpa")(routed_attention_sdpa)
ROUTED_ATTENTION.register("reference")(_reference)


def routed_attention(q: Tensor, kv: Tensor, r_idx: Tensor, r_weight: Tensor | None = None, *, num_heads: int,
                     scale: float, valid_hw: tuple[int, int] | None = None, return_attn: bool = False,
                     backend: str | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Multi-head attention of each query window over the key/value windows routed to it.

    Args:
        q: (N, Py, Px, h, w, Cqk) queries as image tiles: P = Py·Px windows of h×w tokens.
        kv: (N, Py, Px, hk, wk, Cqk + Cv) keys then values of every window, as tiles of the same window grid
            (pooled windows of L tokens as (N, Py, Px, 1, L, C)).
        r_idx: (N, P, topk) integer indices of the windows routed to each query window.
        r_weight: (N, P, topk) or None. If given, the keys and values of each routed window are multiplied by
            its weight (BiFormer's soft routing).
        num_heads: number of heads m; Cqk and Cv must be divisible by it.
        scale: factor applied to the logits (BiFormer uses ``qk_dim ** -0.5``).
        valid_hw: (H, W): only the queries in the top-left H×W of the (Py·h, Px·w) token grid are wanted (the
            unpadded image when the tiles cut a zero-padded one); default: all. Keys and values are never
            restricted.
        return_attn: also return the (N·P, m, Lq, topk·Lkv) attention weights; only the reference computes
            them, so it runs whatever the backend setting.
        backend: a backend name for this call (``None``: the process-wide choice, see :mod:`yoloattn.nn.backends`).

    Returns:
        out: (N, H, W, Cv), the heads concatenated along channels; or ``(out, attn)``.
    """
    ROUTED_ATTENTION.check_name(backend)
    kwargs = dict(num_heads=num_heads, scale=scale, valid_hw=valid_hw)
    if return_attn:
        if backend not in (None, "auto", "reference"):
            raise ValueError(f"return_attn=True needs the attention matrix, which only the 'reference' backend "
                             f"builds; got backend={backend!r}")
        return routed_attention_reference(q, kv, r_idx, r_weight, **kwargs)
    _check(q, kv, r_idx, r_weight, num_heads, valid_hw)
    return ROUTED_ATTENTION(q, kv, r_idx, r_weight, backend=backend, **kwargs)
