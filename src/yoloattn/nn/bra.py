"""Bi-Level Routing Attention (BRA) from BiFormer (Zhu et al., CVPR 2023).

The feature map is cut into ``n_win × n_win`` windows. A router compares the mean query
and the mean key of every window and keeps, for each query window, the ``topk`` most
related key windows; then every query token attends to all tokens of those windows
(:func:`yoloattn.nn.functional.routed_attention`). A depthwise conv on the values (LePE)
adds local position information.

This module reproduces the layer of BiFormer's released checkpoints (``ops/bra_legacy.py`` of the
official repository, the layer YOLO users paste), with NCHW input and output, the same constructor and
the same state_dict keys. Differences from that code, all deliberate:

- impossible settings raise ``ValueError`` when the layer is built, not at forward time;
- the routing logits and their top-k are computed in fp32 even under autocast, so bf16/fp16
  runs route like fp32 runs;
- with ``ret_attn_mask=True`` the first output is NCHW like the usual output (BiFormer's
  returned it NHWC);
- the default backends never build the attention matrix (see :mod:`yoloattn.nn.functional.routed_attention`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_image, choice, flag, hooked, odd_kernel, positive_int, real
from .functional.depthwise_conv import depthwise_conv_module
from .functional.padded_linear import padded_linear
from .functional.routed_attention import ROUTED_ATTENTION, routed_attention
from .functional.routed_attention_cpu import routed_attention_qkv_cpu

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
        self.scale = qk_dim**-0.5 if qk_scale is None else float(qk_scale)
        self.diff_routing = diff_routing
        self.emb = nn.Linear(qk_dim, qk_dim) if param_routing else nn.Identity()

    def logits(self, query: Tensor, key: Tensor) -> Tensor:
        """Region-to-region affinities: (N, P, Cqk) window queries and keys -> (N, P, P) fp32 logits."""
        if not self.diff_routing:
            query, key = query.detach(), key.detach()
        # Route in (at least) fp32: bf16 logits tie or reorder and change which windows are kept.
        dtype = torch.promote_types(query.dtype, torch.float32)
        with torch.autocast(device_type=query.device.type, enabled=False):
            query, key = query.to(dtype), key.to(dtype)
            if isinstance(self.emb, nn.Linear):
                weight, bias = self.emb.weight.to(dtype), self.emb.bias.to(dtype)
                query, key = F.linear(query, weight, bias), F.linear(key, weight, bias)
            return (query * self.scale) @ key.transpose(-2, -1)  # (N, P, P)

    def forward(self, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
        """Route windows.

        Args:
            query: (N, P, Cqk) mean query of each window.
            key: (N, P, Cqk) mean key of each window.

        Returns:
            r_weight: (N, P, topk) softmax of the kept logits, fp32.
            r_idx: (N, P, topk) int64 indices of the kept key windows.
        """
        logits = self.logits(query, key)
        with torch.autocast(device_type=query.device.type, enabled=False):
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


def _tiles(x: Tensor, n_win: int) -> Tensor:
    """(N, H, W, C) -> (N, n_win, n_win, h, w, C) view of its windows, h = H / n_win, w = W / n_win."""
    n, height, width, c = x.shape
    # einops: "n (j h) (i w) c -> n j i h w c", without a copy
    return x.view(n, n_win, height // n_win, n_win, width // n_win, c).transpose(2, 3)


def _tile_means(x: Tensor) -> Tensor:
    """(N, Py, Px, h, w, C) tiles -> (N, Py·Px, C) means (one reduction at a time: several times faster)."""
    n, py, px, h, w, c = x.shape
    return (x.sum(4).sum(3) / (h * w)).reshape(n, py * px, c)


def _pool_matrix(n, out: int, like: Tensor) -> Tensor:
    """(out, n) averaging matrix with adaptive pooling's bins: row i covers [floor(i·n/out), ceil((i+1)·n/out))."""
    i = torch.arange(out, device=like.device)
    start, end = (i * n) // out, ((i + 1) * n + out - 1) // out
    pos = torch.arange(n, device=like.device)
    member = ((pos[None] >= start[:, None]) & (pos[None] < end[:, None])).to(like.dtype)
    return member / member.sum(1, keepdim=True)


def adaptive_avg_pool2d_traceable(x: Tensor, out: int) -> Tensor:
    """``F.adaptive_avg_pool2d(x, out)`` as two matrix products, exportable with dynamic H, W.

    x: (B, C, H, W) -> (B, C, out, out).
    """
    h, w = x.shape[-2:]
    return torch.einsum("ih,bchw,jw->bcij", _pool_matrix(h, out, x), x, _pool_matrix(w, out, x))


_CPU_CAPABILITY = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...


def _to_nchw(x: Tensor) -> Tensor:
    """(N, H, W, C) -> (N, C, H, W): a channels-last view, or a contiguous copy when training on a CPU whose
    PyTorch kernels are not AVX-512.

    The view's layout travels into the next Conv, BatchNorm and Concat. Measured on an AMD Zen 4 (YOLOv8n-BRA
    training step at batch 4, 640, ratio to YOLOv8n): with PyTorch and oneDNN held to AVX2, their backward in
    that layout cost more than the copy (1.32 with the view, 1.26 with the copy); with AVX-512 the view was
    faster (1.18 against 1.22), and in inference it was faster on both. On a Zen 5, the same A/B: 1.259 view
    against 1.246 copy with AVX2, 1.238 against 1.262 with AVX-512.
    """
    nchw = x.permute(0, 3, 1, 2)
    copy = x.requires_grad and x.device.type == "cpu" and _CPU_CAPABILITY != "AVX512"
    return nchw.contiguous() if copy else nchw


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
        backend: a backend of :data:`~yoloattn.nn.functional.ROUTED_ATTENTION` for this layer
            (``'cpu'``, ``'sdpa'``, ``'reference'``, ``'auto'``); ``None`` follows :mod:`yoloattn.nn.backends`.
    """

    def __init__(self, dim: int, n_win: int = 7, num_heads: int = 8, qk_dim: int | None = None,
                 qk_scale: float | None = None, kv_per_win: int = 4, kv_downsample_ratio: int = 4,
                 kv_downsample_kernel: int | None = None, kv_downsample_mode: str = "identity", topk: int = 4,
                 param_attention: str = "qkvo", param_routing: bool = False, diff_routing: bool = False,
                 soft_routing: bool = False, side_dwconv: int = 3, auto_pad: bool = True, *,
                 backend: str | None = None):
        super().__init__()
        for name, value in (("dim", dim), ("n_win", n_win), ("num_heads", num_heads)):
            positive_int(name, value)
        qk_dim = positive_int("qk_dim", dim if qk_dim is None else qk_dim)
        if qk_scale is not None and real("qk_scale", qk_scale) <= 0:
            raise ValueError(f"qk_scale must be a positive number or None (qk_dim ** -0.5), got {qk_scale!r}")
        for name, value in (("param_routing", param_routing), ("diff_routing", diff_routing),
                            ("soft_routing", soft_routing), ("auto_pad", auto_pad)):
            flag(name, value)
        ROUTED_ATTENTION.check_name(backend)
        if dim % num_heads or qk_dim % num_heads:
            raise ValueError(f"dim={dim} and qk_dim={qk_dim} must both be divisible by num_heads={num_heads}")
        if not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= n_win * n_win:
            raise ValueError(f"topk must be an integer in [1, n_win²={n_win * n_win}] for n_win={n_win}, got {topk!r}")
        if param_routing and not diff_routing:
            raise ValueError("param_routing=True needs diff_routing=True: a learnable router must receive gradients")
        if diff_routing and not soft_routing:
            raise ValueError("diff_routing=True needs soft_routing=True: hard differentiable routing is not "
                             "defined in BiFormer (it raised NotImplementedError at forward time)")
        choice("param_attention", param_attention, PARAM_ATTENTION_MODES)
        if kv_downsample_mode not in KV_DOWNSAMPLE_MODES:
            extra = " ('fracpool' and 'conv' were never implemented in BiFormer)" if kv_downsample_mode in (
                "fracpool", "conv") else ""
            raise ValueError(f"kv_downsample_mode must be one of {KV_DOWNSAMPLE_MODES}, got {kv_downsample_mode!r}{extra}")
        if kv_downsample_mode.startswith("ada_"):
            positive_int("kv_per_win", kv_per_win)
        if kv_downsample_mode in ("avgpool", "maxpool"):
            positive_int("kv_downsample_ratio", kv_downsample_ratio)
        odd_kernel("side_dwconv", side_dwconv)

        self.dim = dim
        self.n_win = n_win
        self.num_heads = num_heads
        self.qk_dim = qk_dim
        self.scale = qk_dim**-0.5 if qk_scale is None else float(qk_scale)
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
        """(N, n_win, n_win, h, w, C) tiles of keys/values -> the same, or the pooled (N, n_win, n_win, h', w', C)."""
        if isinstance(self.kv_down, nn.Identity):
            return kv
        n, py, px, h, w, c = kv.shape
        if self.kv_downsample_mode in ("avgpool", "maxpool") and (h < self.kv_downsample_ratio or w < self.kv_downsample_ratio):
            raise ValueError(f"kv_downsample_ratio={self.kv_downsample_ratio} is larger than the {h}x{w} windows of "
                             f"this input; use a larger input, a smaller n_win={self.n_win} or a smaller ratio")
        tiles = kv.reshape(n * py * px, h, w, c).permute(0, 3, 1, 2)  # (N·P, C, h, w)
        if self.kv_downsample_mode == "ada_avgpool" and (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            # the ONNX exporter cannot size an adaptive pool over a dynamic window; the same bins as a matrix can
            pooled = adaptive_avg_pool2d_traceable(tiles, self.kv_per_win)
        else:
            pooled = self.kv_down(tiles)  # (N·P, C, h', w')
        return pooled.permute(0, 2, 3, 1).reshape(n, py, px, *pooled.shape[2:], c)

    def _projection_op_applies(self, qkv: Tensor, route_weight: Tensor | None, ret_attn_mask: bool) -> bool:
        """Whether the attention may run as one op of the whole projection (:func:`routed_attention_qkv_cpu`):
        when it is differentiated (its backward is what it saves), on plain keys and values with hard routing, and
        in eager mode (a compiler fuses autograd's copies itself)."""
        return (qkv.requires_grad and torch.is_grad_enabled() and qkv.device.type == "cpu" and route_weight is None
                and not ret_attn_mask and isinstance(self.kv_down, nn.Identity)
                and not torch.compiler.is_compiling())

    def _project_padded(self, x: Tensor, pad_b: int, pad_r: int) -> Tensor:
        """(N, H, W, C) -> the (N, H + pad_b, W + pad_r, 2·Cqk + C) projection of the zero-padded image, by
        :func:`padded_linear` (the bias inside the matrix product); a linear with hooks (a FLOPs counter's, a
        feature extractor's) is called as the module, so that they see it run."""
        linear = self.qkv.qkv
        if hooked(linear):
            return linear(F.pad(x, (0, 0, 0, pad_r, 0, pad_b)))
        return padded_linear(x, linear.weight, linear.bias, pad_b, pad_r)

    def routing(self, x: Tensor) -> Tensor:
        """The router's region-to-region logits for an NCHW input: (N, n_win², n_win²), fp32; row p holds query
        window p's affinity to every key window (windows numbered row-major over the padded map). The layer
        routes each query window to the ``topk`` largest of its row."""
        check_image(x, self, self.dim)
        x = x.permute(0, 2, 3, 1)
        h_in, w_in = x.shape[1], x.shape[2]
        x = F.pad(x, (0, 0, 0, (-w_in) % self.n_win, 0, (-h_in) % self.n_win))
        q_img, kv_img = self.qkv(x)
        k_img = kv_img[..., :self.qk_dim]
        return self.router.logits(_tile_means(_tiles(q_img, self.n_win)), _tile_means(_tiles(k_img, self.n_win)))

    def forward_nhwc(self, x: Tensor, ret_attn_mask: bool = False):
        """BRA on a channels-last map.

        Args:
            x: (N, H, W, C) with C = ``dim``.
            ret_attn_mask: also return the routing weights, routing indices and attention matrix.

        Returns:
            (N, H, W, C), or ``(out, r_weight, r_idx, attn)`` with r_weight/r_idx (N, n_win², topk) and
            attn (N·n_win², num_heads, h·w, topk·Lkv).
        """
        check_image(x, self, self.dim, layout="NHWC")
        n, h_in, w_in, _ = x.shape
        n_win = self.n_win
        if not self.auto_pad and (h_in % n_win or w_in % n_win):
            raise ValueError(f"auto_pad=False needs H and W divisible by n_win={n_win}, got input of shape "
                             f"(N, H, W, C)={tuple(x.shape)}; set auto_pad=True or resize the input")
        # zero-pad to whole windows (a no-op pad when divisible keeps one graph for every input size)
        # (-size) % n_win: non-negative by construction, also for torch.export's symbolic sizes
        pad_b, pad_r = (-h_in) % n_win, (-w_in) % n_win
        qkv = self._project_padded(x, pad_b, pad_r)  # (N, H', W', 2·Cqk + C): the image projected once
        # split, not slicing: the backward of a slice writes a zero tensor of the full size
        q_img, kv_img = qkv.split([self.qk_dim, self.qk_dim + self.dim], dim=-1)  # (N, H', W', Cqk), (.., Cqk + C)
        k_img, v_img = kv_img.split([self.qk_dim, self.dim], dim=-1)
        q_win, k_win = _tiles(q_img, n_win), _tiles(k_img, n_win)  # (N, n_win, n_win, h, w, C)
        r_weight, r_idx = self.router(_tile_means(q_win), _tile_means(k_win))  # window means (N, P, Cqk)
        kv_win, route_weight = self._pool_kv(_tiles(kv_img, n_win)), r_weight if self.soft_routing else None
        kwargs = dict(num_heads=self.num_heads, scale=self.scale, valid_hw=(h_in, w_in))
        out = attn = None
        if self._projection_op_applies(qkv, route_weight, ret_attn_mask) and ROUTED_ATTENTION.select(
                self.backend, q_win, kv_win, r_idx, None, **kwargs).name == "cpu":
            # training on the CPU kernel: one op from the projection, which also hands the LePE its values
            out, v_img = routed_attention_qkv_cpu(qkv, r_idx, qk_dim=self.qk_dim, n_win=n_win, **kwargs)
        else:
            # Image tiles are strided views (no copies): the CPU kernel reads them in place; the other backends
            # copy them into window blocks. Only the queries of the unpadded image: out is its (N, H, W, C) image.
            result = routed_attention(q_win, kv_win, r_idx, route_weight, return_attn=ret_attn_mask,
                                      backend=self.backend, **kwargs)
            out, attn = result if ret_attn_mask else (result, None)
        if self.lepe is not None:
            # LePE on the values, in the padded image layout like BiFormer; a channels-last copy (or the op's
            # dense values), so the conv runs and returns channels-last (NHWC) and adding it below is a dense add
            v_nchw = v_img.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
            lepe = depthwise_conv_module(self.lepe, v_nchw)  # its backward on the fast kernel in training
            # cropped by a negative pad, not a slice: a slice's contiguity would depend on whether the input
            # was padded, which torch.export would then fix for every input size
            lepe = F.pad(lepe.permute(0, 2, 3, 1), (0, 0, 0, -pad_r, 0, -pad_b))  # (N, H, W, C)
            # in place where nothing needs the attention output for a backward and the op returned a fresh tensor
            in_place = not torch.is_grad_enabled() and out.is_contiguous() and not torch.jit.is_tracing()
            out = out.add_(lepe) if in_place else out + lepe
        out = self.wo(out)  # (N, H, W, C)
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
        check_image(x, self, self.dim)
        result = self.forward_nhwc(x.permute(0, 2, 3, 1), ret_attn_mask)
        if ret_attn_mask:
            out, r_weight, r_idx, attn = result
            return out.permute(0, 3, 1, 2), r_weight, r_idx, attn
        return _to_nchw(result)
