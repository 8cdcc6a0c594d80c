"""Bi-Level Routing Attention (BRA) from BiFormer (Zhu et al., CVPR 2023).

The feature map is cut into ``n_win × n_win`` windows. A router compares the mean query
and the mean key of every window and keeps, for each query window, the ``topk`` most
related key windows; then every query token attends to all tokens of those windows
(:func:`yoloattn.nn.functional.routed_attention`). A depthwise conv on the values (LePE)
adds local position information.

This module reproduces the layer of BiFormer's released checkpoints (``bra_legacy``) and
the YOLO blog posts, with NCHW input and output, the same constructor and the same
state_dict keys. Differences from that code, all deliberate:

- impossible settings raise ``ValueError`` when the layer is built, not at forward time;
- the routing logits and their top-k are computed in fp32 even under autocast, so bf16/fp16
  runs route like fp32 runs;
- with ``ret_attn_mask=True`` the first output is NCHW like the usual output (the seed
  returned it NHWC);
- the default fast path never builds the attention matrix (see :mod:`yoloattn.nn.backend`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .functional.routed_attention import routed_attention

__all__ = ["BiLevelRoutingAttention", "TopkRouting", "QKVLinear"]

KV_DOWNSAMPLE_MODES = ("identity", "ada_avgpool", "ada_maxpool", "avgpool", "maxpool")
PARAM_ATTENTION_MODES = ("qkvo", "qkv")


class TopkRouting(nn.Module):
    """Window-level router: top-k key windows for every query window.

    Args:
        qk_dim: channels of the window queries and keys.
        topk: number of key windows kept per query window.
        qk_scale: factor on the routing logits; defaults to ``qk_dim ** -0.5``.
        param_routing: add a learnable linear map (``emb``) before comparing windows.
        diff_routing: let gradients flow into the window queries and keys.
    """

    def __init__(self, qk_dim: int, topk: int = 4, qk_scale: float | None = None, param_routing: bool = False,
                 diff_routing: bool = False):
        super().__init__()
        self.topk = topk
        self.qk_dim = qk_dim
        self.scale = qk_scale or qk_dim**-0.5
        self.diff_routing = diff_routing
        self.emb = nn.Linear(qk_dim, qk_dim) if param_routing else nn.Identity()

    def forward(self, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
        """Route windows.

        Args:
            query: (N, P, Cqk) mean query of each window.
            key: (N, P, Cqk) mean key of each window.

        Returns:
            r_weight: (N, P, topk) softmax of the kept logits, fp32.
            r_idx: (N, P, topk) int64 indices of the kept key windows.
        """
        if not self.diff_routing:
            query, key = query.detach(), key.detach()
        # Route in (at least) fp32: bf16 logits tie or reorder and change which windows are kept.
        dtype = torch.promote_types(query.dtype, torch.float32)
        with torch.autocast(device_type=query.device.type, enabled=False):
            query, key = query.to(dtype), key.to(dtype)
            if isinstance(self.emb, nn.Linear):
                weight, bias = self.emb.weight.to(dtype), self.emb.bias.to(dtype)
                query_hat, key_hat = F.linear(query, weight, bias), F.linear(key, weight, bias)
            else:
                query_hat, key_hat = query, key
            logits = (query_hat * self.scale) @ key_hat.transpose(-2, -1)  # (N, P, P)
            topk_logits, r_idx = torch.topk(logits, k=self.topk, dim=-1)  # (N, P, topk)
            r_weight = torch.softmax(topk_logits, dim=-1)
        return r_weight, r_idx


class QKVLinear(nn.Module):
    """One linear map to queries (``qk_dim``) and keys plus values (``qk_dim + dim``)."""

    def __init__(self, dim: int, qk_dim: int, bias: bool = True):
        super().__init__()
        self.dim = dim
        self.qk_dim = qk_dim
        self.qkv = nn.Linear(dim, qk_dim + qk_dim + dim, bias=bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (..., dim) -> q (..., qk_dim), kv (..., qk_dim + dim)."""
        q, kv = self.qkv(x).split([self.qk_dim, self.qk_dim + self.dim], dim=-1)
        return q, kv


def _odd_kernel(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (value > 0 and value % 2 == 0):
        raise ValueError(f"{name} must be 0 (off) or an odd kernel size, got {value!r}")


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _tiles(x: Tensor, n_win: int) -> Tensor:
    """(N, H, W, C) -> (N, n_win, n_win, h, w, C) view of its windows, h = H / n_win, w = W / n_win."""
    n, height, width, c = x.shape
    # einops: "n (j h) (i w) c -> n j i h w c", without a copy
    return x.view(n, n_win, height // n_win, n_win, width // n_win, c).transpose(2, 3)


def _tile_means(x: Tensor) -> Tensor:
    """(N, Py, Px, h, w, C) tiles -> (N, Py·Px, C) means (one reduction at a time: several times faster)."""
    n, py, px, h, w, c = x.shape
    return (x.sum(4).sum(3) / (h * w)).reshape(n, py * px, c)


def _untile(x: Tensor) -> Tensor:
    """(N, n_win, n_win, h, w, C) -> (N, H, W, C), the inverse of :func:`_tiles` (a view for image tiles)."""
    n, py, px, h, w, c = x.shape
    return x.transpose(2, 3).reshape(n, py * h, px * w, c)


class BiLevelRoutingAttention(nn.Module):
    """Bi-Level Routing Attention, NCHW in and out.

    Args:
        dim: input and output channels.
        n_win: windows per side; the map is cut into ``n_win²`` windows.
        num_heads: attention heads; ``dim`` and ``qk_dim`` must be divisible by it.
        qk_dim: query/key channels; defaults to ``dim``.
        qk_scale: logit scale; defaults to ``qk_dim ** -0.5`` (the full qk_dim, as BiFormer).
        kv_per_win: keys/values per window side for the ``ada_*pool`` modes.
        kv_downsample_ratio: pooling kernel and stride for the ``avgpool``/``maxpool`` modes.
        kv_downsample_kernel: unused by every supported mode; kept for BiFormer's signature.
        kv_downsample_mode: ``'identity'``, ``'ada_avgpool'``, ``'ada_maxpool'``, ``'avgpool'``
            or ``'maxpool'``: how keys/values of a window are pooled before attention.
        topk: key windows routed to each query window, ``1 <= topk <= n_win²``.
        param_attention: ``'qkvo'`` (output projection ``wo``) or ``'qkv'`` (none).
        param_routing: learnable linear map in the router; needs ``diff_routing``.
        diff_routing: gradients flow through the routing; needs ``soft_routing``.
        soft_routing: multiply routed keys/values by their routing weight.
        side_dwconv: kernel of the depthwise LePE conv on the values; 0 turns it off.
        auto_pad: zero-pad H and W up to multiples of ``n_win`` (and crop the output);
            without it, H and W must be multiples of ``n_win``.
        backend: per-layer override of :mod:`yoloattn.nn.backend` (``None`` follows it).
    """

    def __init__(self, dim: int, n_win: int = 7, num_heads: int = 8, qk_dim: int | None = None,
                 qk_scale: float | None = None, kv_per_win: int = 4, kv_downsample_ratio: int = 4,
                 kv_downsample_kernel: int | None = None, kv_downsample_mode: str = "identity", topk: int = 4,
                 param_attention: str = "qkvo", param_routing: bool = False, diff_routing: bool = False,
                 soft_routing: bool = False, side_dwconv: int = 3, auto_pad: bool = True, *,
                 backend: str | None = None):
        super().__init__()
        for name, value in (("dim", dim), ("n_win", n_win), ("num_heads", num_heads)):
            _positive_int(name, value)
        qk_dim = qk_dim or dim
        _positive_int("qk_dim", qk_dim)
        if dim % num_heads or qk_dim % num_heads:
            raise ValueError(f"dim={dim} and qk_dim={qk_dim} must both be divisible by num_heads={num_heads}")
        if not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= n_win * n_win:
            raise ValueError(f"topk must be an integer in [1, n_win²={n_win * n_win}] for n_win={n_win}, got {topk!r}")
        if param_routing and not diff_routing:
            raise ValueError("param_routing=True needs diff_routing=True: a learnable router must receive gradients")
        if diff_routing and not soft_routing:
            raise ValueError("diff_routing=True needs soft_routing=True: hard differentiable routing is not "
                             "defined in BiFormer (it raised NotImplementedError at forward time)")
        if param_attention not in PARAM_ATTENTION_MODES:
            raise ValueError(f"param_attention must be one of {PARAM_ATTENTION_MODES}, got {param_attention!r}")
        if kv_downsample_mode not in KV_DOWNSAMPLE_MODES:
            extra = " ('fracpool' and 'conv' were never implemented in BiFormer)" if kv_downsample_mode in (
                "fracpool", "conv") else ""
            raise ValueError(f"kv_downsample_mode must be one of {KV_DOWNSAMPLE_MODES}, got {kv_downsample_mode!r}{extra}")
        if kv_downsample_mode.startswith("ada_"):
            _positive_int("kv_per_win", kv_per_win)
        if kv_downsample_mode in ("avgpool", "maxpool"):
            _positive_int("kv_downsample_ratio", kv_downsample_ratio)
        _odd_kernel("side_dwconv", side_dwconv)

        self.dim = dim
        self.n_win = n_win
        self.num_heads = num_heads
        self.qk_dim = qk_dim
        self.scale = qk_scale or qk_dim**-0.5
        self.topk = topk
        self.param_routing = param_routing
        self.diff_routing = diff_routing
        self.soft_routing = soft_routing
        self.param_attention = param_attention
        self.kv_downsample_mode = kv_downsample_mode
        self.kv_per_win = kv_per_win
        self.kv_downsample_ratio = kv_downsample_ratio
        self.kv_downsample_kernel = kv_downsample_kernel
        self.side_dwconv = side_dwconv
        self.auto_pad = auto_pad
        self.backend = backend

        # LePE: depthwise conv on the values, added to the attention output.
        self.lepe = (nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
                     if side_dwconv > 0 else None)
        self.router = TopkRouting(qk_dim, topk=topk, qk_scale=self.scale, param_routing=param_routing,
                                  diff_routing=diff_routing)
        self.qkv = QKVLinear(dim, qk_dim)
        self.wo = nn.Linear(dim, dim) if param_attention == "qkvo" else nn.Identity()
        if kv_downsample_mode == "ada_avgpool":
            self.kv_down = nn.AdaptiveAvgPool2d(kv_per_win)
        elif kv_downsample_mode == "ada_maxpool":
            self.kv_down = nn.AdaptiveMaxPool2d(kv_per_win)
        elif kv_downsample_mode == "avgpool" and kv_downsample_ratio > 1:
            self.kv_down = nn.AvgPool2d(kv_downsample_ratio)
        elif kv_downsample_mode == "maxpool" and kv_downsample_ratio > 1:
            self.kv_down = nn.MaxPool2d(kv_downsample_ratio)
        else:
            self.kv_down = nn.Identity()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, n_win={self.n_win}, num_heads={self.num_heads}, qk_dim={self.qk_dim}, "
                f"topk={self.topk}, kv_downsample_mode={self.kv_downsample_mode!r}, side_dwconv={self.side_dwconv}, "
                f"auto_pad={self.auto_pad}")

    def _pool_kv(self, kv: Tensor) -> Tensor:
        """(N, n_win, n_win, h, w, C) tiles of keys/values -> the same tiles, or (N, P, Lkv, C) pooled windows."""
        if isinstance(self.kv_down, nn.Identity):
            return kv
        n, py, px, h, w, c = kv.shape
        p = py * px
        if self.kv_downsample_mode in ("avgpool", "maxpool") and (h < self.kv_downsample_ratio or w < self.kv_downsample_ratio):
            raise ValueError(f"kv_downsample_ratio={self.kv_downsample_ratio} is larger than the {h}x{w} windows of "
                             f"this input; use a larger input, a smaller n_win={self.n_win} or a smaller ratio")
        pooled = self.kv_down(kv.reshape(n * p, h, w, c).permute(0, 3, 1, 2))  # (N·P, C, h', w')
        return pooled.flatten(2).transpose(1, 2).reshape(n, p, -1, c)

    def forward_nhwc(self, x: Tensor, ret_attn_mask: bool = False):
        """BRA on a channels-last map.

        Args:
            x: (N, H, W, C) with C = ``dim``.
            ret_attn_mask: also return the routing weights, routing indices and attention matrix.

        Returns:
            (N, H, W, C), or ``(out, r_weight, r_idx, attn)`` with r_weight/r_idx (N, n_win², topk) and
            attn (N·n_win², num_heads, h·w, topk·Lkv).
        """
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"expected a (N, H, W, {self.dim}) tensor, got shape {tuple(x.shape)}")
        n, h_in, w_in, _ = x.shape
        n_win = self.n_win
        if self.auto_pad:
            pad_r = (n_win - w_in % n_win) % n_win
            pad_b = (n_win - h_in % n_win) % n_win
            # a traced graph must keep the pad and the crop, whatever the example size
            if pad_r or pad_b or _tracing():
                x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        elif h_in % n_win or w_in % n_win:
            raise ValueError(f"auto_pad=False needs H and W divisible by n_win={n_win}, got input of shape "
                             f"(N, H, W, C)={tuple(x.shape)}; set auto_pad=True or resize the input")
        # Project the image once and cut the projections into windows as strided views (no copies): the CPU
        # kernel reads the tiles in place; the other paths copy them into window blocks.
        q_img, kv_img = self.qkv(x)  # (N, H, W, Cqk), (N, H, W, Cqk + C)
        # split, not slicing: the backward of a slice writes a zero tensor of the full size
        k_img, v_img = kv_img.split([self.qk_dim, self.dim], dim=-1)
        # LePE on the values, in the padded image layout like BiFormer; a channels-last copy, so the conv runs
        # and returns channels-last (NHWC) and adding it below is a dense add
        lepe = None
        if self.lepe is not None:
            lepe = self.lepe(v_img.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last))
            lepe = lepe.permute(0, 2, 3, 1)[:, :h_in, :w_in]  # (N, H_in, W_in, C)
        q_win, k_win = _tiles(q_img, n_win), _tiles(k_img, n_win)  # (N, n_win, n_win, h, w, C)
        r_weight, r_idx = self.router(_tile_means(q_win), _tile_means(k_win))  # window means (N, P, Cqk)

        # Only the queries of the unpadded image are wanted: the CPU kernel skips the padded ones and writes the
        # cropped image. A traced graph keeps them and crops below, as its sizes must follow the input.
        padded = q_img.shape[1] != h_in or q_img.shape[2] != w_in
        crop_here = _tracing() or not padded
        result = routed_attention(
            q_win, self._pool_kv(_tiles(kv_img, n_win)), r_idx, r_weight if self.soft_routing else None,
            num_heads=self.num_heads, qk_dim=self.qk_dim, scale=self.scale, return_attn=ret_attn_mask,
            valid_hw=None if crop_here else (h_in, w_in), backend=self.backend)
        out, attn = result if ret_attn_mask else (result, None)
        if crop_here:
            out = _untile(out)[:, :h_in, :w_in]  # (N, H_in, W_in, C)
        if lepe is not None:
            # in place where nothing needs the attention output for a backward (and no graph is recorded)
            out = out.add_(lepe) if not (torch.is_grad_enabled() or _tracing()) else out + lepe
        out = self.wo(out)  # (N, H_in, W_in, C)
        if ret_attn_mask:
            return out, r_weight, r_idx, attn
        return out

    def forward(self, x: Tensor, ret_attn_mask: bool = False):
        """BRA on an NCHW map.

        Args:
            x: (N, C, H, W) with C = ``dim``; any H, W >= 1 when ``auto_pad`` is on.
            ret_attn_mask: also return ``(r_weight, r_idx, attn)``, see :meth:`forward_nhwc`.

        Returns:
            (N, C, H, W), or ``(out, r_weight, r_idx, attn)`` with ``out`` NCHW.
        """
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"expected a (N, {self.dim}, H, W) tensor, got shape {tuple(x.shape)}")
        result = self.forward_nhwc(x.permute(0, 2, 3, 1), ret_attn_mask)
        if ret_attn_mask:
            out, r_weight, r_idx, attn = result
            return out.permute(0, 3, 1, 2), r_weight, r_idx, attn
        return result.permute(0, 3, 1, 2)
