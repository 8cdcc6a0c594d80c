"""The Hybrid Attention Block (HAB) of HAT (Chen et al., "Activating More Pixels in Image Super-Resolution
Transformer", CVPR 2023).

A Swin-style block: LayerNorm, (shifted) window self-attention with a relative position bias, plus a
parallel channel-attention conv branch (CAB: conv 3x3, GELU, conv 3x3, RCAN channel attention) scaled by
``conv_scale``, then LayerNorm and an MLP, both with residuals.

:class:`HAB`, :class:`CAB`, :class:`WindowAttention` and :class:`HATChannelAttention` reproduce
``HAB``, ``CAB``, ``WindowAttention`` and ``ChannelAttention`` of the official repository
(``XPixelGroup/HAT``, ``hat/archs/hat_arch.py``): the same constructors, defaults and ``state_dict`` keys
(``HATChannelAttention`` is renamed because Ultralytics defines a different ``ChannelAttention``).
:class:`HAB` takes either HAT's tokens, ``forward(x (N, H·W, C), x_size, rpi_sa, attn_mask)``, or, as the
YOLO-facing layer, an NCHW map ``forward(x (N, C, H, W))`` returning NCHW.

Deliberate differences from the official code:

- any H x W: the normalised map is zero-padded at the bottom/right to a multiple of the window, the
  shifted-window mask is computed for the padded size (as Swin does), padded tokens are masked out as keys
  (``-100``, HAT's mask value) so the valid outputs do not depend on the padding, and the result is
  cropped; CAB and the MLP run on the unpadded map. At multiples of the window this is exactly the
  official block;
- ``input_resolution`` may be None (the resolution is taken from each input). When given it acts as in
  the official code: ``min(input_resolution) <= window_size`` turns the shift off and shrinks the window;
- ``num_heads`` may be None: the largest divisor of ``dim`` not above ``max(1, dim // 32)``;
- the relative position index and the attention mask live in the block (a non-persistent buffer and a
  per-size cache), so ``rpi_sa`` and ``attn_mask`` are optional; when HAT passes them they are used;
- the mask is cast to the activations' dtype (a shifted block of a fp16 model crashed in the official
  code: the fp32 mask promoted the logits);
- bad settings (``dim < squeeze_factor``, ``dim < compress_ratio``, ``dim % num_heads``, a shift outside
  ``[0, window_size)``) raise ``ValueError`` at construction (the official code built the block and failed
  at forward time, or asserted);
- the channel attention's global average pool is computed as a mean (the same numbers; the pooling
  module is kept for the key layout) so deterministic mode on CUDA can differentiate it;
- the window softmax runs in at least fp32.

Memory: the official code builds the (windows × heads × n × n) logits and the same-sized bias-plus-mask
several times over and runs out of memory on large maps; here the ``'sdpa'`` backend runs qkv,
:func:`torch.nn.functional.scaled_dot_product_attention` and the projection over chunks of windows, each with
its own part of the mask (the full ``(windows, n, n)`` mask is never built outside traced graphs). For HAT's
setting (180 channels, 6 heads, window 16, shift 8) at 512x512 in inference the peak measured 1.6 GiB
against the official block's 4.7 GiB (CPU).

Backends (``set_backend(hab=...)``): ``'sdpa'`` and ``'reference'`` (the official matmul, bias, mask and
softmax). ``'auto'`` takes ``'sdpa'`` except on the CPU when the bias table needs a gradient (training):
there SDPA runs its math fallback, which measured slower than the reference; for CPU inference SDPA's
fused kernel measured about 2x faster on the attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_image, flag, in_range, is_int, positive_int, real
from .backends import Decline, Op
from .biformer import DropPath
from .msda import _plain_graph

__all__ = ["CAB", "HAB", "HAB_OP", "HATChannelAttention", "HATMlp", "WindowAttention", "window_partition",
           "window_reverse"]

# backends: 'sdpa' (F.scaled_dot_product_attention over chunks of windows) and 'reference' (the official math)
HAB_OP = Op("hab")
_MASK_VALUE = -100.0  # HAT's value for masked pairs
_CHUNK = 1 << 24  # elements of a chunk's (windows × heads × n × n) mask, or of its qkv, per SDPA call


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """(b, h, w, c) -> (b·nW, ws, ws, c), windows batch-major then row-major; h, w multiples of ws."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)


def window_reverse(windows: Tensor, window_size: int, h, w) -> Tensor:
    """(b·nW, ws, ws, c) -> (b, h, w, c), the inverse of :func:`window_partition`."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // window_size, w // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def relative_position_index(wh: int, ww: int) -> Tensor:
    """(wh·ww, wh·ww) int64: ``(yi - yj + wh - 1)·(2ww - 1) + (xi - xj + ww - 1)`` (HAT's ``calculate_rpi_sa``)."""
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None, :] + wh - 1) * (2 * ww - 1) + (xs[:, None] - xs[None, :] + ww - 1)


class HATChannelAttention(nn.Module):
    """RCAN channel attention (HAT's ``ChannelAttention``): ``x · sigmoid(W2 relu(W1 mean(x) + b1) + b2)``.

    Args:
        num_feat: channels; ``num_feat // squeeze_factor`` must be >= 1.
        squeeze_factor: channel reduction of the bottleneck.
    """

    def __init__(self, num_feat: int, squeeze_factor: int = 16):
        super().__init__()
        positive_int("num_feat", num_feat)
        positive_int("squeeze_factor", squeeze_factor)
        if num_feat // squeeze_factor < 1:
            raise ValueError(f"num_feat={num_feat} must be >= squeeze_factor={squeeze_factor} "
                             f"(the bottleneck has num_feat // squeeze_factor channels)")
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(num_feat, num_feat // squeeze_factor, 1, padding=0),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_feat // squeeze_factor, num_feat, 1, padding=0),
            nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) -> (N, C, H, W)."""
        y = x.mean(dim=(2, 3), keepdim=True)  # = attention[0], differentiable deterministically on CUDA
        for layer in list(self.attention)[1:]:
            y = layer(y)
        return x * y


class CAB(nn.Module):
    """HAT's channel attention block: conv 3x3 (C -> C // compress_ratio), GELU, conv 3x3, channel attention.

    Args:
        num_feat: channels.
        compress_ratio: channel reduction of the first conv.
        squeeze_factor: reduction of the channel attention.
    """

    def __init__(self, num_feat: int, compress_ratio: int = 3, squeeze_factor: int = 30):
        super().__init__()
        positive_int("num_feat", num_feat)
        positive_int("compress_ratio", compress_ratio)
        if num_feat // compress_ratio < 1:
            raise ValueError(f"num_feat={num_feat} must be >= compress_ratio={compress_ratio}")
        self.cab = nn.Sequential(
            nn.Conv2d(num_feat, num_feat // compress_ratio, 3, 1, 1),
            nn.GELU(),
            nn.Conv2d(num_feat // compress_ratio, num_feat, 3, 1, 1),
            HATChannelAttention(num_feat, squeeze_factor))

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) -> (N, C, H, W)."""
        return self.cab(x)


class HATMlp(nn.Module):
    """HAT's ``Mlp``: fc1, activation, dropout, fc2, dropout (channels-last)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


@dataclass(frozen=True)
class _WindowMask:
    """A shifted-window / padding mask kept as per-token labels: pairs with different labels, and keys that are
    padding, get -100. ``labels``, ``pad``: (nW, n)."""

    labels: Tensor
    pad: Tensor

    @property
    def windows(self) -> int:
        return self.labels.shape[0]

    def dense(self, start: int | None = None, stop: int | None = None) -> Tensor:
        """(windows, n, n) fp32 additive mask for windows ``start .. stop``."""
        labels, pad = self.labels[start:stop], self.pad[start:stop]
        blocked = (labels.unsqueeze(2) != labels.unsqueeze(1)) | pad.unsqueeze(1)
        return torch.where(blocked, _MASK_VALUE, 0.0).to(torch.float32)


def _dense(mask, start: int | None = None, stop: int | None = None) -> Tensor | None:
    if mask is None:
        return None
    if isinstance(mask, _WindowMask):
        return mask.dense(start, stop)
    return mask[start:stop]


def _window_count(mask) -> int:
    return mask.windows if isinstance(mask, _WindowMask) else mask.shape[0]


class WindowAttention(nn.Module):
    """Window multi-head self-attention with a relative position bias (HAT's ``WindowAttention``).

    Args:
        dim: channels.
        window_size: (Wh, Ww), or one int for a square window.
        num_heads: attention heads.
        qkv_bias: bias in the qkv Linear.
        qk_scale: factor on the logits; ``qk_scale or head_dim ** -0.5`` as the official code.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
        backend: ``None`` (the process-wide choice), ``'sdpa'`` or ``'reference'``.
    """

    def __init__(self, dim: int, window_size, num_heads: int, qkv_bias: bool = True, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, *, backend: str | None = None):
        super().__init__()
        positive_int("dim", dim)
        positive_int("num_heads", num_heads)
        window_size = _pair("window_size", window_size)
        flag("qkv_bias", qkv_bias)
        if qk_scale is not None:
            real("qk_scale", qk_scale)
        in_range("attn_drop", attn_drop, 0.0, 1.0, high_open=True)
        in_range("proj_drop", proj_drop, 0.0, 1.0, high_open=True)
        HAB_OP.check_name(backend)
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim**-0.5
        self.backend = backend
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size[0] - 1) * (2 * window_size[1] - 1), num_heads))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.softmax = nn.Softmax(dim=-1)
        # not in the state_dict (HAT keeps its index at model level): the key layout stays official
        self.register_buffer("relative_position_index", relative_position_index(*window_size), persistent=False)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}"

    def position_bias(self, rpi: Tensor | None = None) -> Tensor:
        """(heads, n, n) relative position bias for index ``rpi`` (default: the window's own)."""
        rpi = self.relative_position_index if rpi is None else rpi
        n = self.window_size[0] * self.window_size[1]
        return self.relative_position_bias_table[rpi.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)

    def forward(self, x: Tensor, rpi: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Attention inside each window.

        Args:
            x: (N·nW, n, C) windows of n = Wh·Ww tokens, batch-major.
            rpi: (n, n) relative position index; None uses the window's own.
            mask: (nW, n, n) additive mask (HAT's 0/-100) or None.

        Returns:
            (N·nW, n, C).
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"WindowAttention expects (N·nW, n, {self.dim}) windows, got shape {tuple(x.shape)}")
        if mask is not None and (mask.dim() != 3 or x.shape[0] % mask.shape[0]):
            raise ValueError(f"mask must be (nW, n, n) with the window count dividing {x.shape[0]}, "
                             f"got shape {tuple(mask.shape)}")
        return HAB_OP(self, x, rpi, mask, backend=self.backend)


def _qkv(m: WindowAttention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    b_, n, c = x.shape
    qkv = m.qkv(x).reshape(b_, n, 3, m.num_heads, c // m.num_heads).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]  # (N·nW, heads, n, hd)


def _reference(m: WindowAttention, x: Tensor, rpi: Tensor | None, mask) -> Tensor:
    """The official math: scaled q @ kᵀ, bias, mask, softmax, dropout, @ v, projection."""
    b_, n, c = x.shape
    q, k, v = _qkv(m, x)
    attn = (q * m.scale) @ k.transpose(-2, -1)
    attn = attn + m.position_bias(rpi).unsqueeze(0)
    mask = _dense(mask)
    if mask is not None:
        nw = mask.shape[0]
        attn = attn.reshape(b_ // nw, nw, m.num_heads, n, n) + mask.to(attn.dtype).unsqueeze(1).unsqueeze(0)
        attn = attn.reshape(-1, m.num_heads, n, n)
    attn = torch.softmax(attn, dim=-1, dtype=torch.promote_types(attn.dtype, torch.float32)).to(v.dtype)
    attn = m.attn_drop(attn)
    out = (attn @ v).transpose(1, 2).reshape(b_, n, c)
    return m.proj_drop(m.proj(out))


def _sdpa(m: WindowAttention, x: Tensor, rpi: Tensor | None, mask) -> Tensor:
    """SDPA with the bias (plus the windows' mask) as the additive mask, over chunks of windows.

    Each chunk runs qkv, attention and projection, so neither the (windows × heads × n × n) mask nor the
    qkv of the whole map is ever held at once (outside traced graphs).
    """
    b_, n, c = x.shape
    bias = m.position_bias(rpi)  # (heads, n, n)
    nw = b_ if mask is None else _window_count(mask)  # without a mask every window is alike
    images = b_ // nw
    per_window = images * n * max(m.num_heads * n, 3 * c)
    step = nw if _plain_graph() else max(1, _CHUNK // per_window)
    if step >= nw:
        return _sdpa_windows(m, x, bias, _dense(mask), images)
    windows = x.reshape(images, nw, n, c)
    outs = [_sdpa_windows(m, windows[:, i:i + step].reshape(-1, n, c), bias, _dense(mask, i, i + step),
                          images).reshape(images, -1, n, c) for i in range(0, nw, step)]
    return torch.cat(outs, dim=1).reshape(b_, n, c)


def _sdpa_windows(m: WindowAttention, x: Tensor, bias: Tensor, mask: Tensor | None, images) -> Tensor:
    """x: (images·w, n, C) windows, batch-major; mask: (w, n, n) or None."""
    b_, n, c = x.shape
    nh = m.num_heads
    q, k, v = _qkv(m, x)  # (images·w, heads, n, hd)
    if mask is None:
        attn_mask = bias
    else:
        attn_mask = bias.unsqueeze(0) + mask.to(bias.dtype).unsqueeze(1)  # (w, heads, n, n)
        if _plain_graph() or images > 1:  # -> (images·w, heads, n, n), batch-major like the windows
            attn_mask = attn_mask.unsqueeze(0).expand(images, -1, -1, -1, -1).reshape(-1, nh, n, n)
    dropout = m.attn_drop.p if m.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype), dropout_p=dropout, scale=m.scale)
    return m.proj_drop(m.proj(out.transpose(1, 2).reshape(b_, n, c)))


def _sdpa_auto_skip(m: WindowAttention, x: Tensor, rpi, mask):
    if x.device.type == "cpu" and torch.is_grad_enabled() and m.relative_position_bias_table.requires_grad:
        return Decline("on the CPU, SDPA with a bias that needs a gradient runs its math fallback, slower than "
                       "the reference")
    return None


HAB_OP.register("sdpa", auto_skip=_sdpa_auto_skip)(_sdpa)
HAB_OP.register("reference")(_reference)


def _pair(name: str, value) -> tuple[int, int]:
    if is_int(value):
        value = (value, value)
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise TypeError(f"{name} must be a positive integer or a pair of them, got {value!r}")
    for v in value:
        positive_int(name, v)
    return tuple(value)


def _default_heads(dim: int) -> int:
    """The largest divisor of ``dim`` not above ``max(1, dim // 32)`` (head dim about 32)."""
    return max(h for h in range(1, max(1, dim // 32) + 1) if dim % h == 0)


class HAB(nn.Module):
    """HAT's hybrid attention block: window attention and a channel-attention conv branch.

    Args:
        dim: channels (input and output).
        input_resolution: (H, W) as in HAT, or None. When given and ``min(input_resolution) <= window_size``,
            the window shrinks to ``min(input_resolution)`` and the shift is turned off (official behaviour).
        num_heads: attention heads; None: the largest divisor of ``dim`` not above ``max(1, dim // 32)``.
        window_size: window side.
        shift_size: cyclic shift of the windows, in ``[0, window_size)``.
        compress_ratio: channel reduction in CAB's first conv.
        squeeze_factor: reduction of CAB's channel attention.
        conv_scale: weight of the CAB branch.
        mlp_ratio: MLP hidden width / dim.
        qkv_bias: bias in the qkv Linear.
        qk_scale: factor on the logits; ``qk_scale or head_dim ** -0.5``.
        drop: dropout after the attention projection and in the MLP.
        attn_drop: dropout on the attention weights.
        drop_path: stochastic depth on the attention and MLP branches.
        act_layer: MLP activation class.
        norm_layer: normalisation class (channels-last).
        backend: ``None`` (the process-wide choice), ``'sdpa'`` or ``'reference'``.
    """

    def __init__(self, dim: int, input_resolution=None, num_heads: int | None = None, window_size: int = 7,
                 shift_size: int = 0, compress_ratio: int = 3, squeeze_factor: int = 30, conv_scale: float = 0.01,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: float | None = None, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, act_layer: type[nn.Module] = nn.GELU,
                 norm_layer: type[nn.Module] = nn.LayerNorm, *, backend: str | None = None):
        super().__init__()
        positive_int("dim", dim)
        num_heads = _default_heads(dim) if num_heads is None else num_heads
        positive_int("num_heads", num_heads)
        positive_int("window_size", window_size)
        if not is_int(shift_size):
            raise TypeError(f"shift_size must be an integer, got {shift_size!r}")
        if input_resolution is not None:
            input_resolution = tuple(_pair("input_resolution", input_resolution))
        conv_scale = real("conv_scale", conv_scale)
        mlp_ratio = real("mlp_ratio", mlp_ratio)
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio!r}")
        in_range("drop_path", drop_path, 0.0, 1.0, high_open=True)
        in_range("drop", drop, 0.0, 1.0, high_open=True)
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.dim = dim
        self.input_resolution = input_resolution
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        self.mlp_ratio = mlp_ratio
        if input_resolution is not None and min(input_resolution) <= window_size:
            # official: a window as large as the input is not partitioned and not shifted
            self.shift_size = 0
            self.window_size = min(input_resolution)
        if not 0 <= self.shift_size < self.window_size:
            raise ValueError(f"shift_size must be in [0, window_size={self.window_size}), got {self.shift_size}")

        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, window_size=(self.window_size, self.window_size), num_heads=num_heads,
                                    qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop,
                                    backend=backend)
        self.conv_scale = conv_scale
        self.conv_block = CAB(num_feat=dim, compress_ratio=compress_ratio, squeeze_factor=squeeze_factor)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = HATMlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self._masks: dict = {}

    @property
    def backend(self) -> str | None:
        return self.attn.backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        self.attn.backend = HAB_OP.check_name(value)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"shift_size={self.shift_size}, mlp_ratio={self.mlp_ratio}")

    def forward(self, x: Tensor, x_size=None, rpi_sa: Tensor | None = None, attn_mask: Tensor | None = None) -> Tensor:
        """NCHW ``x`` (N, C, H, W) -> (N, C, H, W); or HAT's tokens ``x`` (N, H·W, C) with ``x_size`` = (H, W)
        -> (N, H·W, C), optionally with HAT's ``rpi_sa`` (n, n) and ``attn_mask`` (nW, n, n)."""
        if isinstance(x, Tensor) and x.dim() == 3:
            if x_size is None:
                raise ValueError("HAB on tokens (N, H·W, C) needs x_size=(H, W)")
            h, w = x_size
            b, length, c = x.shape
            if c != self.dim or (isinstance(length, int) and isinstance(h, int) and isinstance(w, int)
                                 and length != h * w):
                raise ValueError(f"HAB expects tokens (N, {h}·{w}, {self.dim}), got shape {tuple(x.shape)}")
            return self._block(x.reshape(b, h, w, c), rpi_sa, attn_mask).reshape(b, length, c)
        if x_size is not None or rpi_sa is not None or attn_mask is not None:
            raise ValueError("x_size, rpi_sa and attn_mask are for HAT's token input (N, H·W, C) only")
        check_image(x, self, self.dim)
        return self._block(x.permute(0, 2, 3, 1), None, None).permute(0, 3, 1, 2)

    def _block(self, x: Tensor, rpi: Tensor | None, attn_mask: Tensor | None) -> Tensor:
        """x: (N, H, W, C) -> (N, H, W, C)."""
        shortcut = x
        xn = self.norm1(x)
        conv_x = self.conv_block(xn.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        attn_x = self._attention(xn, rpi, attn_mask)
        x = shortcut + self.drop_path(attn_x) + conv_x * self.conv_scale
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _attention(self, x: Tensor, rpi: Tensor | None, attn_mask: Tensor | None) -> Tensor:
        """(Shifted) window attention of the normalised map x (N, H, W, C), padded to whole windows."""
        b, h, w, c = x.shape
        ws, ss = self.window_size, self.shift_size
        pad_h, pad_w = (ws - h % ws) % ws, (ws - w % ws) % ws
        padded = not (isinstance(pad_h, int) and isinstance(pad_w, int) and pad_h == 0 and pad_w == 0)
        if padded:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = h + pad_h, w + pad_w
        if ss > 0:
            x = torch.roll(x, shifts=(-ss, -ss), dims=(1, 2))
        windows = window_partition(x, ws).reshape(-1, ws * ws, c)
        del x  # the padded, rolled map: only its windows are needed now
        if ss > 0 and attn_mask is not None:  # HAT's mask (ignored without a shift, as in the official code)
            if padded or attn_mask.shape[0] != windows.shape[0] // b:
                raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not fit {h}x{w} with window "
                                 f"{ws}; pass attn_mask=None to let the block compute it for any size")
            mask = attn_mask
        elif ss > 0 or padded:
            mask = self._mask(h, w, hp, wp, windows.device)
        else:
            mask = None
        out = HAB_OP(self.attn, windows, rpi, mask, backend=self.attn.backend)
        x = window_reverse(out.reshape(-1, ws, ws, c), ws, hp, wp)
        if ss > 0:
            x = torch.roll(x, shifts=(ss, ss), dims=(1, 2))
        return x[:, :h, :w] if padded else x

    def _mask(self, h, w, hp, wp, device) -> _WindowMask:
        """Labels of the shifted regions and padding flags of every token, by window, for the padded size."""
        if _plain_graph() or not all(isinstance(s, int) for s in (h, w)):
            return self._build_mask(h, w, hp, wp, device)
        key = (h, w, str(device))
        mask = self._masks.get(key)
        if mask is None:
            if len(self._masks) >= 8:
                self._masks.clear()
            mask = self._masks[key] = self._build_mask(h, w, hp, wp, device)
        return mask

    def _build_mask(self, h, w, hp, wp, device) -> _WindowMask:
        ws, ss = self.window_size, self.shift_size

        def axis(n, valid):
            """Region label (HAT's three slices of the shifted map) and padding flag along one axis."""
            r = torch.arange(n, device=device)
            region = torch.zeros_like(r)
            if ss > 0:
                region = (r >= n - ws).long() + (r >= n - ss).long()
            source = torch.remainder(r + ss, n)  # position before the roll
            return region, source >= valid

        rows, pad_rows = axis(hp, h)
        cols, pad_cols = axis(wp, w)
        labels = (rows.reshape(-1, 1) * 3 + cols.reshape(1, -1)).reshape(1, hp, wp, 1)
        pad = (pad_rows.reshape(-1, 1) | pad_cols.reshape(1, -1)).reshape(1, hp, wp, 1)
        n = ws * ws
        return _WindowMask(window_partition(labels, ws).reshape(-1, n), window_partition(pad, ws).reshape(-1, n))
