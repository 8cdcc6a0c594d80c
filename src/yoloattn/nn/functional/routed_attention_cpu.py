"""The ``cpu`` backend of routed attention: a compiled, vectorised C++ kernel as a PyTorch op.

``csrc/routed_attention_cpu.cpp`` computes BRA's many small attention problems (at YOLOv8n's P3: 392
windows of 144 queries × 576 routed keys, head size 8) directly: queries (or keys, in the dk/dv pass) sit
in the lanes of one vector register and the other operand is broadcast, the exponentials are vectorised
exp2, the backward recomputes the probabilities from a log-sum-exp kept by the forward (nothing of size
``Lq × topk·Lkv`` is stored), and queries, keys and values are read in place, through the routing
indices, from the projected image (the forward copies one head's routed keys and values of one window at a
time into an L1-sized buffer, which every query block of the window then sweeps). Queries outside ``valid_hw`` (BRA's zero padding) are skipped and the
output is written as the cropped image.

It is registered as the ops ``torch.ops.yoloattn.routed_attention`` (forward) and
``torch.ops.yoloattn.routed_attention_backward``, with fake (meta) implementations and autograd, so
``torch.compile`` (``fullgraph=True``, dynamic shapes too), ``torch.export`` and
``torch.library.opcheck`` treat it as one op, and FLOP counters count it.

Build: compiled once per machine with the system C++ compiler (:mod:`._build`) for ``-march=native``, or
the target in ``YOLOATTN_CPU_MARCH`` (``x86-64-v3``: AVX2 + FMA, ``x86-64``: SSE2), into
``$YOLOATTN_CACHE/kernels``; its vector width follows the target (16 floats with AVX-512, 8 with AVX2, 4
with SSE2 or NEON). :func:`use_build` switches the target inside a block (benchmarks and tests time and
check every build this machine can run).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from ..._hooks import constant_for_compile
from ._build import BuildError, load_library

__all__ = ["MAX_HEAD_DIM", "build_info", "current_march", "decline", "routed_attention_cpu", "routed_attention_qkv_cpu",
           "use_build"]

_SOURCE = Path(__file__).with_name("csrc") / "routed_attention_cpu.cpp"
# Defined here only: passed to the compiler, reported back by the library and checked when it is loaded.
_ABI = 5
MAX_HEAD_DIM = 128

_i64 = ctypes.c_int64


class _Tiles(ctypes.Structure):
    """``Tiles`` in the C++ source: windows (b, i, j), tokens (y, x), strides in floats."""

    _fields_ = [("data", ctypes.c_void_p), ("py", _i64), ("px", _i64), ("th", _i64), ("tw", _i64), ("s_n", _i64),
                ("s_py", _i64), ("s_px", _i64), ("s_y", _i64), ("s_x", _i64), ("channels", _i64)]


class _Args(ctypes.Structure):
    """``RoutedArgs`` in the C++ source, field for field."""

    _fields_ = [("abi", _i64), ("size", _i64), ("n", _i64), ("p", _i64), ("lq", _i64), ("lkv", _i64), ("topk", _i64),
                ("heads", _i64), ("dk", _i64), ("dv", _i64), ("rows_valid", _i64), ("cols_valid", _i64),
                ("zero_outside", _i64), ("scale", ctypes.c_double), ("threads", _i64), ("q", _Tiles), ("kv", _Tiles),
                ("out", _Tiles), ("dout", _Tiles), ("dq", _Tiles), ("dkv", _Tiles), ("idx", ctypes.c_void_p),
                ("lse", ctypes.c_void_p)]


_march = os.environ.get("YOLOATTN_CPU_MARCH", "").strip() or "native"


def _check_library(lib: ctypes.CDLL) -> str | None:
    """Why a loaded library is not this kernel at this ABI, or None; sets the entry points' signatures."""
    try:
        for name in ("yoloattn_abi", "yoloattn_max_head_dim", "yoloattn_lanes"):
            getattr(lib, name).restype = ctypes.c_int
        lib.yoloattn_args_size.restype = _i64
        lib.yoloattn_isa.restype = ctypes.c_char_p
        lib.yoloattn_status_message.restype = ctypes.c_char_p
        lib.yoloattn_status_message.argtypes = [ctypes.c_int]
        for name in ("yoloattn_routed_forward", "yoloattn_routed_backward"):
            getattr(lib, name).restype = ctypes.c_int
            getattr(lib, name).argtypes = [ctypes.POINTER(_Args)]
    except AttributeError as e:
        return f"it lacks the kernel's entry points ({e})"
    if lib.yoloattn_abi() != _ABI or lib.yoloattn_args_size() != ctypes.sizeof(_Args):
        return (f"it reports ABI {lib.yoloattn_abi()} with a {lib.yoloattn_args_size()}-byte argument block, expected "
                f"ABI {_ABI} with {ctypes.sizeof(_Args)} bytes")
    if lib.yoloattn_max_head_dim() != MAX_HEAD_DIM:
        return f"it was built for head sizes up to {lib.yoloattn_max_head_dim()}, expected {MAX_HEAD_DIM}"
    return None


@functools.lru_cache(maxsize=None)
def _load(march: str) -> ctypes.CDLL | str:
    try:
        return load_library(_SOURCE, march=march, defines={"YOLOATTN_ABI": _ABI, "YOLOATTN_MAX_HEAD_DIM": MAX_HEAD_DIM},
                            check=_check_library)
    except BuildError as e:
        return f"the CPU kernel (-march={march}) could not be built: {e}"


def _library() -> ctypes.CDLL:
    lib = _load(_march)
    if isinstance(lib, str):
        raise RuntimeError(lib)
    return lib


@constant_for_compile
def unavailable_reason() -> str:
    """'' if the kernel of the current build target is built and loaded, else why not (built on first call)."""
    lib = _load(_march)
    return lib if isinstance(lib, str) else ""


def build_info() -> dict:
    """The current build target and, when it is loaded, its ISA and vector width (or the reason it is not)."""
    lib = _load(_march)
    if isinstance(lib, str):
        return {"march": _march, "available": False, "reason": lib}
    return {"march": _march, "available": True, "isa": lib.yoloattn_isa().decode(), "lanes": lib.yoloattn_lanes(),
            "build_id": f"{_march}-{Path(lib._name).stem}"}


def current_march() -> str:
    """The ``-march`` target the compiled CPU kernels are built for now (:func:`use_build` switches it)."""
    return _march


@contextlib.contextmanager
def use_build(march: str) -> Iterator[None]:
    """Use the kernel compiled for ``-march={march}`` inside a ``with`` block (e.g. ``'x86-64-v3'`` for AVX2)."""
    global _march
    previous, _march = _march, march
    try:
        yield
    finally:
        _march = previous


def decline(q: Tensor, kv: Tensor, r_weight: Tensor | None, num_heads: int) -> str | None:
    """Why the kernel cannot run routed attention on these inputs (image tiles), or None."""
    if q.device.type != "cpu" or kv.device.type != "cpu":
        return f"the kernel runs on the CPU, not {q.device.type}"
    if q.dtype != torch.float32 or kv.dtype != torch.float32:
        return f"the kernel computes in float32, got {q.dtype}/{kv.dtype}"
    if r_weight is not None:
        return "the kernel has no soft routing (r_weight)"
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return "a TorchScript/ONNX trace records the decomposable SDPA backend instead of the compiled op"
    qk, v = q.shape[-1], kv.shape[-1] - q.shape[-1]
    if qk // num_heads > MAX_HEAD_DIM or v // num_heads > MAX_HEAD_DIM:
        return f"the kernel supports head sizes up to {MAX_HEAD_DIM}, got {qk // num_heads}/{v // num_heads}"
    return unavailable_reason() or None


# ---- the C++ boundary -------------------------------------------------------------------------------------
def _require(t: Tensor, name: str, dims: int, dtype: torch.dtype = torch.float32, contiguous: bool = False) -> None:
    """The layout every tensor handed to the kernel must have; a wrong one is a ValueError, never a wrong number."""
    if t.device.type != "cpu" or t.dtype != dtype or t.dim() != dims:
        raise ValueError(f"routed_attention_cpu: {name} must be a {dims}-D {dtype} CPU tensor, got {t.dim()}-D "
                         f"{t.dtype} on {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"routed_attention_cpu: {name} must be contiguous, got strides {t.stride()}")
    if not contiguous and t.numel() and t.stride(-1) != 1:
        raise ValueError(f"routed_attention_cpu: {name} must have contiguous channels, got strides {t.stride()}")
    if any(s < 0 for s in t.stride()):
        raise ValueError(f"routed_attention_cpu: {name} has negative strides {t.stride()}")


def _tiles(t: Tensor | None, name: str) -> _Tiles:
    """(N, Py, Px, h, w, C) tiles, channels contiguous."""
    if t is None:
        return _Tiles()
    _require(t, name, 6)
    return _Tiles(t.data_ptr(), *t.shape[1:5], *t.stride()[:5], t.shape[5])


def _image_tiles(img: Tensor, like: Tensor, name: str) -> _Tiles:
    """An (N, H, W, C) image cut into the window grid of ``like`` (N, Py, Px, h, w, ·), which may cover more than
    H×W: tokens past the image are never read or written."""
    _require(img, name, 4)
    _, py, px, h, w, _ = like.shape
    s_n, s_y, s_x, _ = img.stride()
    return _Tiles(img.data_ptr(), py, px, h, w, s_n, h * s_y, w * s_x, s_y, s_x, img.shape[3])


def _call(entry: str, args: _Args) -> None:
    lib = _library()
    status = getattr(lib, entry)(ctypes.byref(args))
    if status:
        message = lib.yoloattn_status_message(status).decode()
        if "window index" in message:
            raise ValueError(f"r_idx must hold window indices in [0, {args.p}) for the {args.p} windows")
        raise ValueError(f"routed_attention_cpu: the kernel rejected its arguments: {message}")


def _args(q: Tensor, kv: Tensor, r_idx: Tensor, num_heads: int, scale: float, valid_h: int, valid_w: int) -> _Args:
    _require(r_idx, "r_idx", 3, torch.int64, contiguous=True)
    n, py, px, h, w, cq = q.shape
    cv = kv.shape[-1] - cq
    if cq % num_heads or cv % num_heads or cv < 1:
        raise ValueError(f"routed_attention_cpu: q channels {cq} and v channels {cv} must be positive multiples of "
                         f"num_heads={num_heads}")
    return _Args(abi=_ABI, size=ctypes.sizeof(_Args), n=n, p=py * px, lq=h * w, lkv=kv.shape[3] * kv.shape[4],
                 topk=r_idx.shape[-1], heads=num_heads, dk=cq // num_heads, dv=cv // num_heads, rows_valid=valid_h,
                 cols_valid=valid_w, zero_outside=0, scale=scale, threads=torch.get_num_threads(),
                 q=_tiles(q, "q"), kv=_tiles(kv, "kv"), idx=r_idx.data_ptr())


def _dense(t: Tensor) -> Tensor:
    return t if t.numel() == 0 or t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("yoloattn::routed_attention", mutates_args=(), device_types="cpu")
def _forward_op(q: Tensor, kv: Tensor, r_idx: Tensor, num_heads: int, scale: float, valid_h: int, valid_w: int,
                with_lse: bool) -> tuple[Tensor, Tensor]:
    """Routed attention on image tiles: out (N, valid_h, valid_w, Cv), lse (N, P, heads, Lq) or (0,)."""
    q, kv = _dense(q), _dense(kv)
    n, py, px, h, w, cq = q.shape
    out = q.new_empty(n, valid_h, valid_w, kv.shape[-1] - cq)
    # the kernel writes the statistics of the computed queries only; the skipped ones read as 0
    full = valid_h == py * h and valid_w == px * w
    lse = (q.new_empty if full else q.new_zeros)((n, py * px, num_heads, h * w) if with_lse else (0,))
    args = _args(q, kv, r_idx, num_heads, scale, valid_h, valid_w)
    args.out = _image_tiles(out, q, "out")
    args.lse = lse.data_ptr() if with_lse else None
    _call("yoloattn_routed_forward", args)
    return out, lse


@_forward_op.register_fake
def _forward_fake(q, kv, r_idx, num_heads, scale, valid_h, valid_w, with_lse):
    n, py, px, h, w, cq = q.shape
    lse_shape = (n, py * px, num_heads, h * w) if with_lse else (0,)
    return q.new_empty(n, valid_h, valid_w, kv.shape[-1] - cq), q.new_empty(lse_shape)


@torch.library.custom_op("yoloattn::routed_attention_backward", mutates_args=(), device_types="cpu")
def _backward_op(dout: Tensor, q: Tensor, kv: Tensor, r_idx: Tensor, out: Tensor, lse: Tensor, num_heads: int,
                 scale: float, need_dq: bool, need_dkv: bool) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`_forward_op` as images of q's and kv's tile grids: dq (N, Py·h, Px·w, Cqk), dkv
    (N, Py·hk, Px·wk, Cqk + Cv); (0,) where not needed."""
    q, kv = _dense(q), _dense(kv)
    n, py, px, h, w, cq = q.shape
    _, _, _, hk, wk, ckv = kv.shape
    dq = q.new_empty((n, py * h, px * w, cq) if need_dq else (0,))
    dkv = kv.new_empty((n, py * hk, px * wk, ckv) if need_dkv else (0,))
    _kernel_backward(dout, q, kv, r_idx, out, lse, num_heads, scale, dq if need_dq else None,
                     dkv if need_dkv else None)
    return dq, dkv


def _kernel_backward(dout: Tensor, q: Tensor, kv: Tensor, r_idx: Tensor, out: Tensor, lse: Tensor, num_heads: int,
                     scale: float, dq: Tensor | None, dkv: Tensor | None) -> None:
    """Runs the kernel's backward, writing dq and dkv (images of q's and kv's tile grids, channels contiguous,
    possibly channel slices of one tensor) where they are not None."""
    dout = _dense(dout)
    _require(lse, "lse", 4, contiguous=True)
    n, py, px, h, w, _ = q.shape
    if lse.shape != (n, py * px, num_heads, h * w) or dout.shape != out.shape:
        raise ValueError(f"routed_attention_backward: lse {tuple(lse.shape)} / dout {tuple(dout.shape)} do not match "
                         f"the forward's q {tuple(q.shape)} and out {tuple(out.shape)}")
    args = _args(q, kv, r_idx, num_heads, scale, out.shape[1], out.shape[2])
    args.out, args.dout = _image_tiles(out, q, "out"), _image_tiles(dout, q, "dout")
    args.lse = lse.data_ptr()
    if dq is not None:
        args.dq = _image_tiles(dq, q, "dq")
    if dkv is not None:
        args.dkv = _image_tiles(dkv, kv, "dkv")
    _call("yoloattn_routed_backward", args)


@_backward_op.register_fake
def _backward_fake(dout, q, kv, r_idx, out, lse, num_heads, scale, need_dq, need_dkv):
    n, py, px, h, w, cq = q.shape
    _, _, _, hk, wk, ckv = kv.shape
    return (q.new_empty((n, py * h, px * w, cq) if need_dq else (0,)),
            kv.new_empty((n, py * hk, px * wk, ckv) if need_dkv else (0,)))


def _as_tiles(img: Tensor, like: Tensor) -> Tensor:
    """(N, Py·h, Px·w, C) image -> (N, Py, Px, h, w, C) tiles of ``like``'s grid (a view)."""
    n, py, px, h, w, c = like.shape
    return img.view(n, py, h, px, w, c).transpose(2, 3)


def _setup_context(ctx, inputs, output) -> None:
    q, kv, r_idx, num_heads, scale, _, _, with_lse = inputs
    out, lse = output
    ctx.save_for_backward(q, kv, r_idx, out, lse)
    ctx.num_heads, ctx.scale, ctx.with_lse = num_heads, scale, with_lse


def _backward(ctx, dout: Tensor, _dlse: Tensor):
    q, kv, r_idx, out, lse = ctx.saved_tensors
    if not ctx.with_lse:
        raise RuntimeError("yoloattn::routed_attention was called with with_lse=False, which keeps nothing for a "
                           "backward; call it with with_lse=True when gradients are needed")
    need_dq, need_dkv = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dq, dkv = torch.ops.yoloattn.routed_attention_backward(dout, q, kv, r_idx, out, lse, ctx.num_heads, ctx.scale,
                                                           need_dq, need_dkv)
    return (_as_tiles(dq, q) if need_dq else None, _as_tiles(dkv, kv) if need_dkv else None,
            None, None, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ---- BRA's training form: the attention of one projected image, LePE's values out and their gradient in ----
def _qkv_tiles(qkv: Tensor, qk_dim: int, n_win: int) -> tuple[Tensor, Tensor]:
    """(N, H, W, 2·qk + Cv) image -> q (N, n, n, H/n, W/n, qk) and kv (..., qk + Cv) tiles, views of it."""
    n, height, width, c = qkv.shape
    q, kv = qkv.split([qk_dim, c - qk_dim], dim=-1)
    return (q.view(n, n_win, height // n_win, n_win, width // n_win, qk_dim).transpose(2, 3),
            kv.view(n, n_win, height // n_win, n_win, width // n_win, c - qk_dim).transpose(2, 3))


def _check_qkv(qkv: Tensor, qk_dim: int, n_win: int) -> None:
    _require(qkv, "qkv", 4)
    n, height, width, c = qkv.shape
    if height % n_win or width % n_win or not 0 < 2 * qk_dim < c:
        raise ValueError(f"routed_attention_qkv: qkv {tuple(qkv.shape)} must be (N, H, W, 2·qk_dim + Cv) with H and "
                         f"W multiples of n_win={n_win} and qk_dim={qk_dim}, Cv > 0")


@torch.library.custom_op("yoloattn::routed_attention_qkv", mutates_args=(), device_types="cpu")
def _qkv_forward_op(qkv: Tensor, r_idx: Tensor, num_heads: int, qk_dim: int, n_win: int, scale: float, valid_h: int,
                    valid_w: int) -> tuple[Tensor, Tensor, Tensor]:
    """Routed attention of a projected image: out (N, valid_h, valid_w, Cv), lse, and v (N, H, W, Cv), a dense
    copy of qkv's values (channels [2·qk_dim, ...)) for another layer to use (BRA's LePE)."""
    qkv = _dense(qkv)
    _check_qkv(qkv, qk_dim, n_win)
    q, kv = _qkv_tiles(qkv, qk_dim, n_win)
    out, lse = _forward_op(q, kv, r_idx, num_heads, scale, valid_h, valid_w, True)
    return out, lse, qkv[..., 2 * qk_dim:].contiguous()


@_qkv_forward_op.register_fake
def _qkv_forward_fake(qkv, r_idx, num_heads, qk_dim, n_win, scale, valid_h, valid_w):
    n, height, width, c = qkv.shape
    lq = (height // n_win) * (width // n_win)
    return (qkv.new_empty(n, valid_h, valid_w, c - 2 * qk_dim), qkv.new_empty(n, n_win * n_win, num_heads, lq),
            qkv.new_empty(n, height, width, c - 2 * qk_dim))


@torch.library.custom_op("yoloattn::routed_attention_qkv_backward", mutates_args=(), device_types="cpu")
def _qkv_backward_op(dout: Tensor, dv: Tensor, qkv: Tensor, r_idx: Tensor, out: Tensor, lse: Tensor, num_heads: int,
                     qk_dim: int, n_win: int, scale: float) -> Tensor:
    """The gradient of qkv for :func:`_qkv_forward_op`, in one (N, H, W, 2·qk_dim + Cv) tensor: the kernel writes
    dq and dkv straight into its channels, and dv (the gradient of the values' copy, or (0,)) is added to the
    values' channels, so nothing is concatenated or summed by autograd."""
    qkv = _dense(qkv)
    _check_qkv(qkv, qk_dim, n_win)
    q, kv = _qkv_tiles(qkv, qk_dim, n_win)
    if dv.numel() and dv.shape != (*qkv.shape[:3], qkv.shape[3] - 2 * qk_dim):
        raise ValueError(f"routed_attention_qkv_backward: dv {tuple(dv.shape)} does not match qkv {tuple(qkv.shape)}")
    dqkv = qkv.new_empty(qkv.shape)
    _kernel_backward(dout, q, kv, r_idx, out, lse, num_heads, scale, dqkv[..., :qk_dim], dqkv[..., qk_dim:])
    if dv.numel():
        dqkv[..., 2 * qk_dim:] += dv
    return dqkv


@_qkv_backward_op.register_fake
def _qkv_backward_fake(dout, dv, qkv, r_idx, out, lse, num_heads, qk_dim, n_win, scale):
    return qkv.new_empty(qkv.shape)


def _qkv_setup_context(ctx, inputs, output) -> None:
    qkv, r_idx, num_heads, qk_dim, n_win, scale, _, _ = inputs
    out, lse, _ = output
    ctx.save_for_backward(qkv, r_idx, out, lse)
    ctx.num_heads, ctx.qk_dim, ctx.n_win, ctx.scale = num_heads, qk_dim, n_win, scale


def _qkv_backward(ctx, dout: Tensor, _dlse: Tensor, dv: Tensor | None):
    qkv, r_idx, out, lse = ctx.saved_tensors
    if dout is None:
        dout = out.new_zeros(out.shape)
    dv = dout.new_empty(0) if dv is None else dv
    dqkv = torch.ops.yoloattn.routed_attention_qkv_backward(dout, dv, qkv, r_idx, out, lse, ctx.num_heads, ctx.qk_dim,
                                                            ctx.n_win, ctx.scale)
    return dqkv, None, None, None, None, None, None, None


_qkv_forward_op.register_autograd(_qkv_backward, setup_context=_qkv_setup_context)


def _register_flops() -> None:
    """FlopCounterMode counts the op like SDPA on the routed windows (2 products of Lq × topk·Lkv per head)."""
    from torch.utils.flop_counter import register_flop_formula

    def products(q_shape, kv_shape, topk: int) -> int:
        n, py, px, h, w, cq = q_shape
        lkv = kv_shape[3] * kv_shape[4]
        return n * py * px * h * w * topk * lkv * kv_shape[5]  # Cq + Cv: both products

    @register_flop_formula(torch.ops.yoloattn.routed_attention)
    def _forward_flops(q_shape, kv_shape, r_idx_shape, *args, **kwargs) -> int:
        return 2 * products(q_shape, kv_shape, r_idx_shape[-1])

    @register_flop_formula(torch.ops.yoloattn.routed_attention_backward)
    def _backward_flops(dout_shape, q_shape, kv_shape, r_idx_shape, *args, **kwargs) -> int:
        return 4 * products(q_shape, kv_shape, r_idx_shape[-1])  # dq, dk, dv and dP, as SDPA's backward

    def qkv_products(qkv_shape, r_idx_shape, qk_dim: int, n_win: int) -> int:
        n, height, width, c = qkv_shape
        lq = (height // n_win) * (width // n_win)  # queries per window = keys per window
        return n * n_win * n_win * lq * r_idx_shape[-1] * lq * (c - qk_dim)

    @register_flop_formula(torch.ops.yoloattn.routed_attention_qkv)
    def _qkv_forward_flops(qkv_shape, r_idx_shape, num_heads, qk_dim, n_win, *args, **kwargs) -> int:
        return 2 * qkv_products(qkv_shape, r_idx_shape, qk_dim, n_win)

    @register_flop_formula(torch.ops.yoloattn.routed_attention_qkv_backward)
    def _qkv_backward_flops(dout_shape, dv_shape, qkv_shape, r_idx_shape, out_shape, lse_shape, num_heads, qk_dim,
                            n_win, *args, **kwargs) -> int:
        return 4 * qkv_products(qkv_shape, r_idx_shape, qk_dim, n_win)


_register_flops()


def mac_count(q: Tensor, kv: Tensor, r_idx: Tensor) -> int:
    """Multiply-adds of one forward call (thop's unit), as SDPA on the routed windows."""
    n, py, px, h, w, _ = q.shape
    return n * py * px * h * w * r_idx.shape[-1] * kv.shape[3] * kv.shape[4] * kv.shape[5]


def routed_attention_qkv_cpu(qkv: Tensor, r_idx: Tensor, *, num_heads: int, qk_dim: int, n_win: int, scale: float,
                             valid_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Routed attention of BRA's projected image with the compiled kernel, for training; check :func:`decline`
    (on its tiles) first.

    One op takes the projection whole and returns, besides the attention, the values as a dense image for the
    LePE convolution; its backward returns the projection's whole gradient, with the LePE's gradient of the
    values added in. Autograd then has no split to concatenate and no two gradients of the values to sum
    (measured: about 9% of BRA's training step at (4, 64, 80, 80), AVX-512 on an AMD Zen 5).

    Args:
        qkv: (N, H, W, 2·qk_dim + Cv): queries, keys, values; H and W multiples of ``n_win``.
        r_idx: (N, n_win², topk) integer indices of the routed windows.
        num_heads, scale, valid_hw: as :func:`routed_attention_cpu`.
        qk_dim: query (and key) channels.
        n_win: windows per side.

    Returns:
        out (N, H_valid, W_valid, Cv) and v (N, H, W, Cv), a copy of qkv's values.
    """
    out, _, v = torch.ops.yoloattn.routed_attention_qkv(qkv, r_idx.to(torch.int64).contiguous(), num_heads, qk_dim,
                                                        n_win, float(scale), valid_hw[0], valid_hw[1])
    return out, v


def routed_attention_cpu(q: Tensor, kv: Tensor, r_idx: Tensor, *, num_heads: int, scale: float,
                         valid_hw: tuple[int, int]) -> Tensor:
    """Routed attention with the compiled kernel (fp32, hard routing); check :func:`decline` first.

    Args:
        q: (N, Py, Px, h, w, Cqk) query tiles, read in place (channels contiguous, else copied).
        kv: (N, Py, Px, hk, wk, Cqk + Cv) key/value tiles.
        r_idx: (N, Py·Px, topk) integer indices of the routed windows.
        num_heads, scale: as :func:`yoloattn.nn.functional.routed_attention`.
        valid_hw: (H, W): only the queries in the top-left H×W of the (Py·h, Px·w) grid are computed.

    Returns:
        (N, H, W, Cv).
    """
    r_idx = r_idx.to(torch.int64).contiguous()
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad)
    out, _ = torch.ops.yoloattn.routed_attention(q, kv, r_idx, num_heads, float(scale), valid_hw[0], valid_hw[1],
                                                 needs_grad)
    return out
