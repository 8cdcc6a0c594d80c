"""The BiFormer block (Zhu et al., CVPR 2023) and the plain attention layers it can use.

:class:`BiFormerBlock` is BiFormer's ``Block``: a depthwise-conv position embedding, then
attention and an MLP, each with a residual, pre- or post-norm, optional layer scale and drop
path. Its ``topk`` picks the attention: ``> 0`` Bi-Level Routing Attention, ``-1`` plain
multi-head attention, ``-2`` attention with LePE, ``0`` a depthwise-conv pseudo-attention.
NCHW in and out; the state_dict keys are BiFormer's, so its weights load with ``strict=True``.

Differences from BiFormer's code, deliberate:

- ``num_heads`` reaches the ``topk=-1``/``-2`` attentions (BiFormer always used 8 heads
  there; pass ``num_heads=8`` to reproduce its stage-4 weights exactly);
- the position-embedding conv pads by ``kernel // 2`` (BiFormer padded by 1, which only
  worked for kernel 3), and even kernels raise ``ValueError``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ._checks import check_image, hooked, odd_kernel, positive_int
from .backends import REFERENCE
from .bra import BiLevelRoutingAttention
from .functional.attention import multi_head_attention
from .functional.depthwise_conv import depthwise_conv_module
from .functional.mlp import LAYER_NORM_MLP

__all__ = ["Attention", "AttentionLePE", "BiFormerBlock", "DWConv", "DropPath"]


class DropPath(nn.Module):
    """Stochastic depth: drop a whole sample's residual branch with probability ``drop_prob``."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_prob!r}")
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class DWConv(nn.Module):
    """3×3 depthwise conv on a channels-last map: (N, H, W, C) -> (N, H, W, C)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class Attention(nn.Module):
    """Global multi-head self-attention on a channels-last map, (N, H, W, C) -> (N, H, W, C).

    Args:
        dim: channels.
        num_heads: heads; ``dim`` must be divisible by it.
        qkv_bias: bias in the qkv projection.
        qk_scale: logit scale; defaults to ``(dim / num_heads) ** -0.5``.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        positive_int("dim", dim)
        positive_int("num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _attend(self, x: Tensor) -> Tensor:
        """x: (N, L, C) -> attention output before the projection, (N, L, C)."""
        n, length, c = x.shape
        # (N, L, 3, m, c/m) -> 3 × (N, m, L, c/m)
        q, k, v = self.qkv(x).reshape(n, length, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = multi_head_attention(q, k, v, scale=self.scale, dropout_p=self.attn_drop if self.training else 0.0)
        return out.transpose(1, 2).reshape(n, length, c)

    def forward(self, x: Tensor) -> Tensor:
        n, h, w, c = x.shape
        out = self.proj(self._attend(x.reshape(n, h * w, c)))
        return self.proj_drop(out).reshape(n, h, w, c)


class AttentionLePE(Attention):
    """:class:`Attention` plus a depthwise-conv local position encoding (LePE) of the input.

    Args:
        side_dwconv: LePE kernel size (odd), 0 to turn it off. Other arguments as :class:`Attention`.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, side_dwconv: int = 5):
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)
        odd_kernel("side_dwconv", side_dwconv)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim) if side_dwconv else None

    def forward(self, x: Tensor) -> Tensor:
        n, h, w, c = x.shape
        out = self._attend(x.reshape(n, h * w, c)).reshape(n, h, w, c)
        if self.lepe is not None:
            out = out + depthwise_conv_module(self.lepe, x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(out))


class _Permute(nn.Module):
    """Parameter-free permute, a placeholder that keeps BiFormer's Sequential indices."""

    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


class BiFormerBlock(nn.Module):
    """BiFormer block, NCHW in and out.

    Args:
        dim: channels (input and output).
        drop_path: stochastic-depth rate of both residual branches.
        layer_scale_init_value: initial layer-scale value; ``<= 0`` turns layer scale off.
        num_heads, n_win, qk_dim, qk_scale, kv_per_win, kv_downsample_ratio, kv_downsample_kernel,
            kv_downsample_mode, param_attention, param_routing, diff_routing, soft_routing, side_dwconv,
            auto_pad: as :class:`BiLevelRoutingAttention` (``side_dwconv`` also for ``topk=-2``).
        topk: ``> 0`` BRA with that top-k; ``-1`` attention; ``-2`` attention with LePE; ``0`` conv.
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        mlp_dwconv: 3×3 depthwise conv inside the MLP.
        before_attn_dwconv: kernel of the depthwise position-embedding conv (odd), 0 for none.
        pre_norm: LayerNorm before each branch (True) or after each residual sum (False).
    """

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = -1,
                 num_heads: int = 8, n_win: int = 7, qk_dim: int | None = None, qk_scale: float | None = None,
                 kv_per_win: int = 4, kv_downsample_ratio: int = 4, kv_downsample_kernel: int | None = None,
                 kv_downsample_mode: str = "ada_avgpool", topk: int = 4, param_attention: str = "qkvo",
                 param_routing: bool = False, diff_routing: bool = False, soft_routing: bool = False,
                 mlp_ratio: float = 4, mlp_dwconv: bool = False, side_dwconv: int = 5, before_attn_dwconv: int = 3,
                 pre_norm: bool = True, auto_pad: bool = False):
        super().__init__()
        positive_int("dim", dim)
        odd_kernel("before_attn_dwconv", before_attn_dwconv)
        if not isinstance(topk, int) or isinstance(topk, bool) or topk < -2:
            raise ValueError(f"topk must be > 0 (BRA), -1 (attention), -2 (attention with LePE) or 0 (conv), got {topk!r}")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio!r}")
        qk_dim = qk_dim or dim
        self.pos_embed = (nn.Conv2d(dim, dim, before_attn_dwconv, padding=before_attn_dwconv // 2, groups=dim)
                          if before_attn_dwconv > 0 else None)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)  # BiFormer: important to avoid attention collapse
        if topk > 0:
            self.attn = BiLevelRoutingAttention(
                dim, n_win=n_win, num_heads=num_heads, qk_dim=qk_dim, qk_scale=qk_scale, kv_per_win=kv_per_win,
                kv_downsample_ratio=kv_downsample_ratio, kv_downsample_kernel=kv_downsample_kernel,
                kv_downsample_mode=kv_downsample_mode, topk=topk, param_attention=param_attention,
                param_routing=param_routing, diff_routing=diff_routing, soft_routing=soft_routing,
                side_dwconv=side_dwconv, auto_pad=auto_pad)
        elif topk == -1:
            self.attn = Attention(dim, num_heads=num_heads)
        elif topk == -2:
            self.attn = AttentionLePE(dim, num_heads=num_heads, side_dwconv=side_dwconv)
        else:
            self.attn = nn.Sequential(
                _Permute(0, 3, 1, 2),
                nn.Conv2d(dim, dim, 1),  # pseudo qkv projection
                nn.Conv2d(dim, dim, 5, padding=2, groups=dim),  # pseudo attention
                nn.Conv2d(dim, dim, 1),  # pseudo output projection
                _Permute(0, 2, 3, 1),
            )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), DWConv(hidden) if mlp_dwconv else nn.Identity(), nn.GELU(),
                                 nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.use_layer_scale = layer_scale_init_value > 0
        if self.use_layer_scale:
            self.gamma1 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
            self.gamma2 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        self.pre_norm = pre_norm
        # gradient checkpointing of the MLP branch alone (no parameters: state_dict unchanged)
        self.checkpoint_mlp = False

    def _attention(self, x: Tensor) -> Tensor:
        """Channels-last attention branch, (N, H, W, C) -> (N, H, W, C)."""
        if isinstance(self.attn, BiLevelRoutingAttention):
            return self.attn.forward_nhwc(x)
        return self.attn(x)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) -> (N, C, H, W)."""
        check_image(x, self, self.norm1.normalized_shape[0])
        if self.pos_embed is not None:
            x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)  # (N, H, W, C)
        if self.pre_norm:
            x = x + self.drop_path(self._scaled(self._attention(self.norm1(x)), 1))
            x = x + self._mlp_branch(x)
        else:  # post-norm, https://kexue.fm/archives/9009
            x = self.norm1(x + self.drop_path(self._scaled(self._attention(x), 1)))
            x = self.norm2(x + self._mlp_branch(x))
        return x.permute(0, 3, 1, 2)

    def _mlp_branch(self, x: Tensor) -> Tensor:
        """The MLP residual branch of a channels-last map; recomputed in the backward with ``checkpoint_mlp``."""
        lean = self._lean_mlp(x)
        if lean is not None:
            return self.drop_path(self._scaled(lean, 2))
        if self.checkpoint_mlp and torch.is_grad_enabled() and not torch.jit.is_scripting():
            # keeps only x: the branch's activations are recomputed from it in the backward (the drop-path
            # mask too: checkpoint restores the RNG state)
            return checkpoint(self._mlp_branch_plain, x, use_reentrant=False)
        return self._mlp_branch_plain(x)

    def _lean_mlp(self, x: Tensor) -> Tensor | None:
        """norm2 and the MLP as one op on its lean backend (half of autograd's saved activations, and with
        ``checkpoint_mlp`` only x, recomputing fc1 but not fc2), or None where the modules run instead: in
        inference, export, autocast, with the reference backend, a non-standard MLP, or hooks on its modules
        (FLOPs counters and feature hooks see their calls)."""
        fc1, middle, act, fc2 = self.mlp
        if not (self.pre_norm and isinstance(middle, nn.Identity) and isinstance(act, nn.GELU)) or hooked(
                self.norm2, self.mlp, fc1, act, fc2):
            return None
        norm = self.norm2
        args = (x, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias, act.approximate,
                self.checkpoint_mlp)
        backend = LAYER_NORM_MLP.select(None, *args)
        return None if backend.name == REFERENCE else backend.run(*args)

    def _mlp_branch_plain(self, x: Tensor) -> Tensor:
        return self.drop_path(self._scaled(self.mlp(self.norm2(x) if self.pre_norm else x), 2))

    def _scaled(self, branch: Tensor, which: int) -> Tensor:
        # without layer scale no multiply at all: BiFormer's ``1.0 * branch`` costs a copy and its backward
        if not self.use_layer_scale:
            return branch
        return (self.gamma1 if which == 1 else self.gamma2) * branch
