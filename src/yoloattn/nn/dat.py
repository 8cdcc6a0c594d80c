"""Deformable Attention (DAT, Xia et al., CVPR 2022; DAT++), as BiFormer-style exact layers.

Keys and values are not taken on a fixed grid: a small offset network looks at the queries and
moves a coarse reference grid (one point per ``stride`` pixels); the input is sampled there with
bilinear interpolation, projected to keys/values, and every query attends to all sampled points
with a relative position bias.

:class:`DAttentionBaseline` is DAT's layer with its constructor, ``state_dict`` keys and
``(y, pos, reference)`` outputs. :class:`DAttention` is the YOLO-facing layer: input channels
first, NCHW in and out, no ``q_size``, defaults derived from the width.

Fixes over the DAT code, deliberate:

- H or W = 1 and key grids of size 1 give finite results: a single query row/column and a single
  key sit at the centre (0 in normalised coordinates), and the offset range of a size-1 key axis is
  that of a 2-point axis (the DAT code divided by zero there);
- ``fixed_pe`` at another input size raises ``ValueError`` naming ``q_size`` and the input size;
- a module cast to fp16/bf16 works (the offset range no longer promotes the grid to fp32);
- the grids are built out of place from ``arange`` in fp32 and cast at the end, so ONNX export with
  dynamic H/W traces correctly;
- ``use_pe=True, dwc_pe=True, no_off=True`` no longer crashes (the table does not exist there, so no
  LePE is added, as for every other position mode under ``no_off``).

The fast path (default) builds the grids directly in ``grid_sample``'s (x, y) order, so neither the
sampling points nor the (queries × keys × 2) displacement tensor is re-indexed, adds the position
bias inside the ``q·k`` product (``baddbmm``) and writes the output channels-first with no
transpose. The reference path is DAT's math in DAT's order.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_image, flag, in_range, positive_int, real
from .backends import Op

__all__ = ["DEFORMABLE_ATTENTION", "DAttention", "DAttentionBaseline", "LayerNormProxy"]

# backends: 'fused' (grids in grid_sample's order, the bias inside the q·k product) and 'reference' (DAT's math)
DEFORMABLE_ATTENTION = Op("deformable_attention")


class LayerNormProxy(nn.Module):
    """LayerNorm over the channels of an NCHW map."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _axis(n, dtype: torch.dtype, device, centred: bool) -> Tensor:
    """Normalised coordinates of ``n`` points along one axis, DAT's convention, fp32 math.

    ``centred`` (key grid): ``((i + 0.5) / (n - 1)) * 2 - 1``; otherwise (query grid): ``(i / (n - 1)) * 2 - 1``.
    A size-1 axis gives 0 (DAT divided by zero).
    """
    i = torch.arange(n, dtype=torch.float32, device=device)
    # n - 1 as a tensor so a traced graph keeps it symbolic; clamp turns the size-1 case into a division by 1
    span = torch.as_tensor(n - 1, dtype=torch.float32, device=device).clamp(min=1.0)
    if centred:
        coords = ((i + 0.5) / span) * 2.0 - 1.0  # n = 1: 0.5 * 2 - 1 = 0
    else:
        coords = (i / span) * 2.0 - 1.0 + (span - (n - 1))  # n = 1: -1 + 1 = 0
    return coords.to(dtype)


def _grid(h, w, dtype, device, centred: bool, xy: bool) -> Tensor:
    """(h, w, 2) grid of normalised coordinates, in (x, y) order if ``xy`` else (y, x)."""
    ys, xs = _axis(h, dtype, device, centred), _axis(w, dtype, device, centred)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy) if xy else (gy, gx), dim=-1)


class DAttentionBaseline(nn.Module):
    """DAT's deformable multi-head attention, NCHW in and out.

    Args:
        q_size: (H, W) the layer is built for; sizes the ``fixed_pe`` and default position tables.
        kv_size: unused (DAT derives the key grid from ``stride``); kept for DAT's signature.
        n_heads: attention heads.
        n_head_channels: channels per head; the layer has ``n_heads * n_head_channels`` channels.
        n_groups: offset groups; each group of channels gets its own sampling points.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
        stride: reference-grid spacing in pixels (the offset conv's stride).
        offset_range_factor: ``>= 0`` bounds offsets to that many key-grid steps (tanh); ``< 0``
            leaves them free and clamps the sampling points to the image.
        use_pe: add a relative position bias (or LePE).
        dwc_pe: the bias is a depthwise 3x3 conv on the queries added to the output (LePE).
        no_off: no offsets: keys/values are the input average-pooled by ``stride``.
        fixed_pe: a learned (heads, Hq·Wq, Hk·Wk) bias table; only valid at ``q_size``.
        ksize: kernel of the offset conv.
        log_cpb: bias from an MLP on log-spaced displacements (Swin-V2 style).

    Returns (forward):
        y (N, C, H, W), pos (N, n_groups, Hk, Wk, 2) and reference (N, n_groups, Hk, Wk, 2), the
        sampling points and the reference grid in (y, x) order, normalised to [-1, 1].
    """

    def __init__(self, q_size, kv_size, n_heads, n_head_channels, n_groups, attn_drop, proj_drop, stride,
                 offset_range_factor, use_pe, dwc_pe, no_off, fixed_pe, ksize, log_cpb, *, backend=None):
        super().__init__()
        for name, value in (("n_heads", n_heads), ("n_head_channels", n_head_channels), ("n_groups", n_groups),
                            ("stride", stride), ("ksize", ksize)):
            positive_int(name, value)
        for name, value in (("use_pe", use_pe), ("dwc_pe", dwc_pe), ("no_off", no_off), ("fixed_pe", fixed_pe),
                            ("log_cpb", log_cpb)):
            flag(name, value)
        offset_range_factor = real("offset_range_factor", offset_range_factor)
        in_range("attn_drop", attn_drop, 0.0, 1.0, high_open=True)
        in_range("proj_drop", proj_drop, 0.0, 1.0, high_open=True)
        DEFORMABLE_ATTENTION.check_name(backend)
        if not (isinstance(q_size, (tuple, list)) and len(q_size) == 2 and all(isinstance(s, int) and s > 0 for s in q_size)):
            raise ValueError(f"q_size must be a pair of positive integers (H, W), got {q_size!r}")
        if n_heads % n_groups:
            raise ValueError(f"n_heads={n_heads} must be divisible by n_groups={n_groups}")
        if fixed_pe and (q_size[0] // stride < 1 or q_size[1] // stride < 1):
            raise ValueError(f"fixed_pe needs q_size >= stride on both sides, got q_size={tuple(q_size)}, stride={stride}")
        self.dwc_pe = dwc_pe
        self.n_head_channels = n_head_channels
        self.scale = n_head_channels**-0.5
        self.n_heads = n_heads
        self.q_h, self.q_w = q_size
        self.kv_h, self.kv_w = self.q_h // stride, self.q_w // stride
        self.nc = n_head_channels * n_heads
        self.n_groups = n_groups
        self.n_group_channels = self.nc // n_groups
        self.n_group_heads = n_heads // n_groups
        self.use_pe = use_pe
        self.fixed_pe = fixed_pe
        self.no_off = no_off
        self.offset_range_factor = offset_range_factor
        self.ksize = ksize
        self.log_cpb = log_cpb
        self.stride = stride
        self.backend = backend
        pad = ksize // 2 if ksize != stride else 0

        self.conv_offset = nn.Sequential(
            nn.Conv2d(self.n_group_channels, self.n_group_channels, ksize, stride, pad, groups=self.n_group_channels),
            LayerNormProxy(self.n_group_channels),
            nn.GELU(),
            nn.Conv2d(self.n_group_channels, 2, 1, 1, 0, bias=False),
        )
        if no_off:
            for p in self.conv_offset.parameters():
                p.requires_grad_(False)
        self.proj_q = nn.Conv2d(self.nc, self.nc, 1)
        self.proj_k = nn.Conv2d(self.nc, self.nc, 1)
        self.proj_v = nn.Conv2d(self.nc, self.nc, 1)
        self.proj_out = nn.Conv2d(self.nc, self.nc, 1)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attn_drop = nn.Dropout(attn_drop)

        self.rpe_table = None
        if use_pe and not no_off:
            if dwc_pe:
                self.rpe_table = nn.Conv2d(self.nc, self.nc, 3, 1, 1, groups=self.nc)
            elif fixed_pe:
                self.rpe_table = nn.Parameter(torch.zeros(n_heads, self.q_h * self.q_w, self.kv_h * self.kv_w))
                nn.init.trunc_normal_(self.rpe_table, std=0.01)
            elif log_cpb:
                self.rpe_table = nn.Sequential(nn.Linear(2, 32, bias=True), nn.ReLU(inplace=True),
                                               nn.Linear(32, self.n_group_heads, bias=False))
            else:
                self.rpe_table = nn.Parameter(torch.zeros(n_heads, self.q_h * 2 - 1, self.q_w * 2 - 1))
                nn.init.trunc_normal_(self.rpe_table, std=0.01)

    @property
    def pe_mode(self) -> str:
        """``'none'``, ``'dwc'``, ``'fixed'``, ``'log_cpb'`` or ``'table'``."""
        if self.rpe_table is None:
            return "none"
        return "dwc" if self.dwc_pe else "fixed" if self.fixed_pe else "log_cpb" if self.log_cpb else "table"

    def extra_repr(self) -> str:
        return (f"channels={self.nc}, n_heads={self.n_heads}, n_groups={self.n_groups}, stride={self.stride}, "
                f"ksize={self.ksize}, offset_range_factor={self.offset_range_factor}, pe={self.pe_mode!r}, "
                f"no_off={self.no_off}")

    def _offsets(self, q: Tensor) -> Tensor:
        """Raw offsets (B·g, 2, Hk, Wk), channel 0 along y and 1 along x, range-limited when asked."""
        b = q.shape[0]
        q_off = q.reshape(b * self.n_groups, self.n_group_channels, q.shape[2], q.shape[3])
        offset = self.conv_offset(q_off)
        if self.no_off:
            return torch.zeros_like(offset)
        if self.offset_range_factor >= 0:
            hk, wk = offset.shape[2], offset.shape[3]
            # a step of the key grid per unit of tanh, in the offsets' dtype (a half module stays half)
            span = torch.stack([torch.as_tensor(hk - 1.0), torch.as_tensor(wk - 1.0)]).clamp(min=1.0)
            step = (1.0 / span).to(device=offset.device, dtype=offset.dtype).reshape(1, 2, 1, 1)
            offset = offset.tanh() * step * self.offset_range_factor
        return offset

    def _sample_input(self, x: Tensor, grid_xy: Tensor, hk, wk) -> Tensor:
        """The input at the sampling points, (N, C, 1, Hk·Wk); ``grid_xy``: (N·g, Hk, Wk, 2) in (x, y) order.

        Without offsets, the ``stride``-average-pooled input instead, as DAT does.
        """
        b, c, h, w = x.shape
        if self.no_off:
            sampled = F.avg_pool2d(x, kernel_size=self.stride, stride=self.stride)
            if sampled.shape[2:] != (hk, wk):
                raise ValueError(f"no_off needs the offset grid {(hk, wk)} to match the {self.stride}-pooled input "
                                 f"{tuple(sampled.shape[2:])}; use ksize == stride")
        else:
            sampled = F.grid_sample(x.reshape(b * self.n_groups, self.n_group_channels, h, w), grid=grid_xy,
                                    mode="bilinear", align_corners=True)
        return sampled.reshape(b, c, 1, hk * wk)

    def forward(self, x: Tensor):
        """x: (N, C, H, W) -> (y, pos, reference), see the class docstring."""
        check_image(x, self, self.nc)
        b, c, h, w = x.shape
        if self.fixed_pe and self.rpe_table is not None and (h, w) != (self.q_h, self.q_w):
            raise ValueError(f"fixed_pe tables are built for q_size={(self.q_h, self.q_w)}; got an input of size "
                             f"{(h, w)}. Use the default position table (resolution-free) or resize the input.")
        return DEFORMABLE_ATTENTION(self, x, backend=self.backend)

    # -- reference: DAT's math in DAT's (y, x) order ----------------------------------------------------------
    def _forward_reference(self, x: Tensor, q: Tensor, offset: Tensor):
        b, c, h, w = x.shape
        dtype, device = x.dtype, x.device
        hk, wk = offset.shape[2], offset.shape[3]
        n_sample = hk * wk
        offset = offset.permute(0, 2, 3, 1)  # (B·g, Hk, Wk, 2) in (y, x)
        reference = _grid(hk, wk, dtype, device, centred=True, xy=False).expand(b * self.n_groups, -1, -1, -1)
        pos = offset + reference
        if self.offset_range_factor < 0:
            pos = pos.clamp(-1.0, 1.0)
        pos = pos.to(dtype)
        x_sampled = self._sample_input(x, pos[..., (1, 0)], hk, wk)  # grid_sample wants (x, y)
        qh = q.reshape(b * self.n_heads, self.n_head_channels, h * w)
        k = self.proj_k(x_sampled).reshape(b * self.n_heads, self.n_head_channels, n_sample)
        v = self.proj_v(x_sampled).reshape(b * self.n_heads, self.n_head_channels, n_sample)
        attn = torch.einsum("b c m, b c n -> b m n", qh, k) * self.scale

        residual_lepe = None
        mode = self.pe_mode
        if mode == "dwc":
            residual_lepe = self.rpe_table(q).reshape(b * self.n_heads, self.n_head_channels, h * w)
        elif mode == "fixed":
            attn = attn + self.rpe_table[None].expand(b, -1, -1, -1).reshape(b * self.n_heads, h * w, n_sample)
        elif mode in ("log_cpb", "table"):
            q_grid = _grid(h, w, dtype, device, centred=False, xy=False).expand(b * self.n_groups, -1, -1, -1)
            displacement = (q_grid.reshape(b * self.n_groups, h * w, 1, 2)
                            - pos.reshape(b * self.n_groups, 1, n_sample, 2))
            if mode == "log_cpb":
                displacement = displacement * 4.0
                displacement = torch.sign(displacement) * torch.log2(displacement.abs() + 1.0) / math.log2(8.0)
                bias = self.rpe_table(displacement)  # (B·g, HW, n, heads/g)
                attn = attn + bias.permute(0, 3, 1, 2).reshape(b * self.n_heads, h * w, n_sample)
            else:
                table = self.rpe_table[None].expand(b, -1, -1, -1).reshape(
                    b * self.n_groups, self.n_group_heads, self.q_h * 2 - 1, self.q_w * 2 - 1)
                bias = F.grid_sample(table.to(dtype), grid=(displacement * 0.5)[..., (1, 0)], mode="bilinear",
                                     align_corners=True)
                attn = attn + bias.reshape(b * self.n_heads, h * w, n_sample)

        attn = torch.softmax(attn, dim=2, dtype=torch.promote_types(attn.dtype, torch.float32)).to(v.dtype)
        attn = self.attn_drop(attn)
        out = torch.einsum("b m n, b c n -> b c m", attn, v)
        if residual_lepe is not None:
            out = out + residual_lepe
        y = self.proj_drop(self.proj_out(out.reshape(b, c, h, w)))
        return (y, pos.reshape(b, self.n_groups, hk, wk, 2),
                reference.reshape(b, self.n_groups, hk, wk, 2))

    def _table_bias_fast(self, pos_xy: Tensor, h, w, b: int) -> Tensor:
        """DAT's table bias read at (q - pos) / 2, as (B·heads, HW, n); pos_xy: (B·g, Hk, Wk, 2), x first.

        The displacements are built planar, (…, 2, HW, n), which vectorises along the keys (about 9x
        faster than broadcasting over an innermost axis of 2), and handed to ``grid_sample`` as a strided
        (…, HW, n, 2) view, which it reads without a copy.
        """
        bg, n_sample = pos_xy.shape[0], pos_xy.shape[1] * pos_xy.shape[2]
        dtype, device = pos_xy.dtype, pos_xy.device
        split = _bias_split(bg, h * w)
        size = self.q_h * 2 - 1, self.q_w * 2 - 1
        q_half = _grid(h, w, dtype, device, centred=False, xy=True).reshape(h * w, 2).t() * 0.5  # (2, HW)
        # small operands made contiguous, so the big subtraction runs as a plain vectorised broadcast
        q_half = q_half.reshape(1, 2, split, (h * w) // split, 1).transpose(1, 2).contiguous()  # (1, K, 2, HW/K, 1)
        p_half = (pos_xy * 0.5).reshape(bg, 1, n_sample, 2).permute(0, 1, 3, 2).unsqueeze(3).contiguous()  # (B·g, 1, 2, 1, n)
        displacement = (q_half - p_half).reshape(bg * split, 2, (h * w) // split, n_sample).permute(0, 2, 3, 1)
        table = self.rpe_table.to(dtype).reshape(1, self.n_groups, self.n_group_heads, *size).expand(b, -1, -1, -1, -1)
        table = table.reshape(bg, 1, self.n_group_heads, *size).expand(-1, split, -1, -1, -1)
        bias = F.grid_sample(table.reshape(bg * split, self.n_group_heads, *size), grid=displacement, mode="bilinear",
                             align_corners=True)  # (B·g·K, heads/g, HW/K, n)
        if split > 1:
            bias = bias.reshape(bg, split, self.n_group_heads, (h * w) // split, n_sample).transpose(1, 2)
        return bias.reshape(b * self.n_heads, h * w, n_sample)

    # -- fast: grids in grid_sample's (x, y) order, SDPA with the bias as additive mask -------------------------
    def _forward_fast(self, x: Tensor, q: Tensor, offset: Tensor):
        b, c, h, w = x.shape
        dtype, device = x.dtype, x.device
        bg = b * self.n_groups
        hk, wk = offset.shape[2], offset.shape[3]
        n_sample = hk * wk
        reference_xy = _grid(hk, wk, dtype, device, centred=True, xy=True)  # (Hk, Wk, 2)
        pos_xy = offset.flip(1).permute(0, 2, 3, 1) + reference_xy  # (B·g, Hk, Wk, 2), x first
        if self.offset_range_factor < 0:
            pos_xy = pos_xy.clamp(-1.0, 1.0)
        pos_xy = pos_xy.to(dtype)
        x_sampled = self._sample_input(x, pos_xy, hk, wk)
        m, d = self.n_heads, self.n_head_channels
        qh = q.reshape(b * m, d, h * w).transpose(1, 2)  # (B·m, HW, d)
        k = _pointwise(self.proj_k, x_sampled).reshape(b * m, d, n_sample)  # (B·m, d, n)
        v = _pointwise(self.proj_v, x_sampled).reshape(b * m, d, n_sample)

        bias, residual_lepe = None, None
        mode = self.pe_mode
        if mode == "dwc":
            residual_lepe = self.rpe_table(q)
        elif mode == "fixed":
            bias = self.rpe_table.to(dtype)[None].expand(b, -1, -1, -1).reshape(b * m, h * w, n_sample)
        elif mode == "log_cpb":
            q_grid = _grid(h, w, dtype, device, centred=False, xy=False).reshape(1, h * w, 1, 2)
            displacement = (q_grid - pos_xy.flip(-1).reshape(bg, 1, n_sample, 2)) * 4.0  # the MLP takes (y, x)
            displacement = torch.sign(displacement) * torch.log2(displacement.abs() + 1.0) / math.log2(8.0)
            bias = self.rpe_table(displacement).permute(0, 3, 1, 2).reshape(b * m, h * w, n_sample)
        elif mode == "table":
            bias = self._table_bias_fast(pos_xy, h, w, b)
        if bias is None:
            logits = torch.bmm(qh, k) * self.scale
        else:  # the bias enters the product's accumulator: one pass over the (B·m, HW, n) logits
            logits = torch.baddbmm(bias.to(qh.dtype), qh, k, alpha=self.scale)
        attn = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(v.dtype)
        attn = self.attn_drop(attn)
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, h, w)  # (B·m, d, HW): channels first already
        if residual_lepe is not None:
            out = out + residual_lepe
        y = self.proj_drop(_pointwise(self.proj_out, out))
        pos = pos_xy.flip(-1)
        return (y, pos.reshape(b, self.n_groups, hk, wk, 2),
                reference_xy.flip(-1).expand(bg, -1, -1, -1).reshape(b, self.n_groups, hk, wk, 2))


def _fused(layer: DAttentionBaseline, x: Tensor):
    q = _pointwise(layer.proj_q, x)
    return layer._forward_fast(x, q, layer._offsets(q))


def _reference(layer: DAttentionBaseline, x: Tensor):
    q = layer.proj_q(x)
    return layer._forward_reference(x, q, layer._offsets(q))


DEFORMABLE_ATTENTION.register("fused")(_fused)
DEFORMABLE_ATTENTION.register("reference")(_reference)


def _bias_split(bg: int, hw) -> int:
    """Query chunks for the bias ``grid_sample``: its CPU kernel runs one thread per sample, so with fewer
    samples (batch x groups) than threads the queries are split into that many samples."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or not isinstance(hw, int):
        return 1
    threads = torch.get_num_threads()
    return threads if bg < threads and hw % threads == 0 else 1


def _pointwise(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A 1x1 conv as one batched GEMM: (N, Cin, H, W) -> (N, Cout, H, W).

    On the CPU this is several times faster than the convolution kernel for these shapes
    (e.g. 0.4 vs 2.9 ms for 64 channels at 80x80 on 2 threads) and gives the same result.
    """
    n, c, h, w = x.shape
    weight = conv.weight.reshape(conv.out_channels, c).to(x.dtype)
    bias = conv.bias.to(x.dtype).reshape(1, -1, 1)
    out = torch.baddbmm(bias, weight.expand(n, -1, -1), x.reshape(n, c, h * w))
    return out.reshape(n, conv.out_channels, h, w)


def _default_groups(n_heads: int) -> int:
    """About one offset group per 4 heads (DAT-T: 3 heads/1 group .. 24/6), dividing ``n_heads``."""
    return max(g for g in range(1, max(1, n_heads // 4) + 1) if n_heads % g == 0)


class DAttention(DAttentionBaseline):
    """Deformable attention as a YOLO layer: ``c1`` first, NCHW in and out, returns a tensor.

    Defaults derived from the feature map's width, so ``[-1, 1, DAttention, []]`` works at every scale:

    - ``n_heads``: ``c1 // 32`` (head dim 32, at least one head); ``c1`` must divide evenly;
    - ``n_groups``: about one offset group per 4 heads (a divisor of ``n_heads``);
    - ``stride=8``: at P3 of a 640 image (80x80) that is a 10x10 grid, about (H/8)² keys, and the
      key count shrinks with the map at P4/P5; ``ksize = stride + 1`` as in DAT;
    - ``offset_range_factor=-1``: free offsets, sampling points clamped to the image; the offset
      network's last conv starts at zero, so training starts from the regular grid;
    - ``pe='table'``: DAT's default relative-position table, read by bilinear interpolation in
      normalised coordinates, so it works at any input size; ``pe_size`` sets its resolution
      (``2·pe_size − 1`` entries per side). Also ``'dwc'``, ``'log_cpb'``, ``'none'``.

    Args:
        c1: input (and output) channels.
        n_heads, n_groups, stride, ksize, offset_range_factor: as :class:`DAttentionBaseline`; None derives them.
        pe: position bias, ``'table'``, ``'dwc'``, ``'log_cpb'`` or ``'none'``.
        pe_size: resolution of the ``'table'`` bias.
        attn_drop, proj_drop: dropout rates.
        residual: return ``x + attention(x)`` (default), as every DAT block does. The attention alone
            mixes each query with about a hundred coarse samples and has no local path, so as a
            drop-in YOLO layer without the residual it erases the detail small objects need (in a
            6-epoch ablation on the built-in data it stayed at mAP 0 where YOLOv8n learned).
    """

    PE_MODES = ("table", "dwc", "log_cpb", "none")

    def __init__(self, c1: int, n_heads: int | None = None, n_groups: int | None = None, stride: int = 8,
                 ksize: int | None = None, offset_range_factor: float = -1, pe: str = "table", pe_size: int = 20,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, residual: bool = True, *, backend: str | None = None):
        positive_int("c1", c1)
        n_heads = positive_int("n_heads", max(1, c1 // 32) if n_heads is None else n_heads)
        if c1 % n_heads:
            raise ValueError(f"c1={c1} channels must be divisible by n_heads={n_heads}")
        if pe not in self.PE_MODES:
            raise ValueError(f"pe must be one of {self.PE_MODES}, got {pe!r}")
        positive_int("pe_size", pe_size)
        positive_int("stride", stride)
        flag("residual", residual)
        super().__init__(q_size=(pe_size, pe_size), kv_size=None, n_heads=n_heads, n_head_channels=c1 // n_heads,
                         n_groups=_default_groups(n_heads) if n_groups is None else n_groups, attn_drop=attn_drop,
                         proj_drop=proj_drop, stride=stride, offset_range_factor=offset_range_factor,
                         use_pe=pe != "none", dwc_pe=pe == "dwc", no_off=False, fixed_pe=False,
                         ksize=stride + 1 if ksize is None else ksize, log_cpb=pe == "log_cpb", backend=backend)
        self.residual = residual
        # Start from the regular grid: with DAT's default init the shared offset conv moves every point the
        # same way, often to an image edge, before any training (see `yoloattn visualize` on an untrained model).
        nn.init.zeros_(self.conv_offset[3].weight)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) -> (N, C, H, W): ``x + attention(x)``, or the attention alone without ``residual``."""
        y = super().forward(x)[0]
        return x + y if self.residual else y

    def forward_with_points(self, x: Tensor):
        """x: (N, C, H, W) -> (y, pos, reference) as :class:`DAttentionBaseline` (for visualisation)."""
        return super().forward(x)
