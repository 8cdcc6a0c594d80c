"""BiFormer, the whole network (Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention",
CVPR 2023; official repository rayleizhu/BiFormer).

A four-stage hierarchical vision transformer: a two-conv stem (stride 4), then four stages of
:class:`~yoloattn.nn.BiFormerBlock` separated by strided-conv downsampling (strides 4, 8, 16, 32). The
released models route with Bi-Level Routing Attention in stages 0-2 (top-k 1, 4, 16) and use global
attention with LePE in stage 3. NCHW in; logits, the feature map or the stage outputs out.

:class:`BiFormer` reproduces the official ``models/biformer.py::BiFormer`` (the classifier of the released
ImageNet checkpoints) with its constructor arguments, defaults and ``state_dict`` keys, so a checkpoint
written by the official code (weights under ``'model'``) loads with ``strict=True`` into
:func:`biformer_tiny`, :func:`biformer_small` and :func:`biformer_base`. With ``out_indices`` it is the
official dense-prediction backbone ``BiFormer_mm`` (object detection / segmentation): no ``norm`` and
``head``, one LayerNorm per stage under ``extra_norms.{i}``, the normed stage outputs returned.

Official behaviour kept on purpose, because the released weights were trained with it:

- the ``topk=-1``/``-2`` stages always use 8 attention heads, whatever ``head_dim`` and ``qk_dims`` say
  (the official ``Block`` never passed ``num_heads`` there); it is the explicit ``mhsa_num_heads=8``
  option here (``None`` gives those stages ``qk_dims[i] // head_dim`` heads);
- BRA scales its logits by ``qk_dim ** -0.5`` over the whole query width (not per head);
- ``qk_scale`` reaches the BRA stages only;
- the global pooling runs after the final BatchNorm ``norm``; there is no final LayerNorm;
- ``_init_weights``: truncated normal (std 0.02) for every Linear weight, zero biases, LayerNorms 1 / 0,
  convs and BatchNorms left at PyTorch's defaults. The modules are built in the official order, so with
  the same seed a classifier starts from bitwise the same weights as the official one.

Deliberate differences (the official code crashes or misbehaves there):

- the default constructor works (``qk_dims=None`` entries mean ``embed_dim[i]``; officially a TypeError);
  the list defaults are tuples with the same values (no shared mutable defaults);
- ``before_attn_dwconv`` may be any odd kernel (officially only 3: its padding was hard-coded 1);
- ``reset_classifier(n)`` works for ``n > 0`` (officially it passed the width list to ``nn.Linear``);
- ``representation_size`` works: ``pre_logits`` (``fc`` + ``Tanh``) maps the pooled features and the head
  reads ``representation_size`` features (officially a TypeError);
- ``drop_rate`` is dropout before the head, as in timm (officially accepted and ignored);
- ``num_features`` is the final width, an int (officially the ``embed_dim`` list, which timm cannot use);
- gradient checkpointing (``use_checkpoint_stages``, :meth:`BiFormer.set_grad_checkpointing`) uses
  ``torch.utils.checkpoint`` (``use_reentrant=False``) on the listed stages only, with no key change. The
  official fairscale wrapper also checkpointed the stem and the downsample layers; they are cheap, and
  recomputing their BatchNorms in training mode would update the running statistics twice;
- the dense backbone's ``train()`` returns the module (``BiFormer_mm.train()`` returned None), takes
  ``out_indices`` (the official one always returned all four stages) and skips the stages after the last
  one asked for;
- bad configurations raise ``ValueError``/``TypeError`` naming the argument when the network is built,
  and an input whose stage maps are not divisible by ``n_win`` (``auto_pad=False``) raises ``ValueError``
  naming the input size before any work, instead of an assertion inside a block.

The blocks run yoloattn's fast BRA path (:func:`yoloattn.nn.functional.routed_attention`, which never
builds the gathered key/value tensor or the attention matrix) and SDPA for the global attention;
``yoloattn.use_backend('reference')`` switches every block to the official math.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..nn._checks import check_image, choice, flag, in_range, is_int, positive_int, real
from ..nn.biformer import BiFormerBlock

__all__ = [
    "BIFORMER_ARCHS",
    "BiFormer",
    "biformer_base",
    "biformer_dense",
    "biformer_small",
    "biformer_tiny",
    "checkpoint_state_dict",
    "feature_take_indices",
    "load_checkpoint",
]

NUM_STAGES = 4

# The fixed arguments of the official factories (models/biformer.py); everything else keeps BiFormer's defaults.
_COMMON = dict(mlp_ratios=(3, 3, 3, 3), n_win=7, kv_downsample_mode="identity", kv_per_wins=(-1, -1, -1, -1),
               topks=(1, 4, 16, -2), side_dwconv=5, before_attn_dwconv=3, layer_scale_init_value=-1, head_dim=32,
               param_routing=False, diff_routing=False, soft_routing=False, pre_norm=True, pe=None)
BIFORMER_ARCHS: dict[str, dict[str, Any]] = {
    "biformer_tiny": dict(_COMMON, depth=(2, 2, 8, 2), embed_dim=(64, 128, 256, 512), qk_dims=(64, 128, 256, 512)),
    "biformer_small": dict(_COMMON, depth=(4, 4, 18, 4), embed_dim=(64, 128, 256, 512), qk_dims=(64, 128, 256, 512)),
    "biformer_base": dict(_COMMON, depth=(4, 4, 18, 4), embed_dim=(96, 192, 384, 768), qk_dims=(96, 192, 384, 768)),
}
# The COCO detection configs (configs/coco/*.py) change only these (drop_path_rate there: small 0.2, base 0.3).
DENSE_SETTINGS = dict(n_win=16, auto_pad=True, norm_eval=True)


class _LayerNormNCHW(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (timm's ``LayerNorm2d``, eps 1e-6, as ``BiFormer_mm``)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) -> (N, C, H, W)."""
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


@torch.no_grad()
def _trunc_normal_(tensor: Tensor, std: float = 0.02, a: float = -2.0, b: float = 2.0) -> Tensor:
    """N(0, std²) cut to [a, b] by the inverse-CDF method (timm's ``trunc_normal_``, which the official code uses:
    the same random stream, so a seeded build equals the official one; torch's own now resamples instead)."""
    if tensor.is_meta:
        return tensor

    def cdf(v: float) -> float:
        return (1.0 + math.erf(v / math.sqrt(2.0))) / 2.0

    low, high = cdf(a / std), cdf(b / std)
    tensor.uniform_(2 * low - 1, 2 * high - 1).erfinv_().mul_(std * math.sqrt(2.0))
    return tensor.clamp_(min=a, max=b)


def _per_stage(name: str, value, check=None) -> list:
    """A per-stage argument as a list of 4 entries, each passed through ``check(f'{name}[i]', entry)``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != NUM_STAGES:
        raise ValueError(f"{name} must be a list of {NUM_STAGES} entries (one per stage), got {value!r}")
    return [check(f"{name}[{i}]", v) if check else v for i, v in enumerate(value)]


def _int_at_least(minimum: int):
    def check(name: str, value):
        if not is_int(value) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        return int(value)

    return check


def _positive_number(name: str, value) -> float:
    if real(name, value) <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return value


def _topk(name: str, value) -> int:
    if not is_int(value) or value < -2:
        raise ValueError(f"{name} must be > 0 (BRA with that top-k), -1 (attention), -2 (attention with LePE) "
                         f"or 0 (conv), got {value!r}")
    return int(value)


def _stage_index(name: str, value) -> int:
    if not is_int(value) or not -NUM_STAGES <= value < NUM_STAGES:
        raise ValueError(f"{name} must be a stage index in [-{NUM_STAGES}, {NUM_STAGES - 1}], got {value!r}")
    return int(value) % NUM_STAGES


def feature_take_indices(num_stages: int, indices: int | Sequence[int] | None = None) -> tuple[list[int], int]:
    """Absolute stage indices to return, as timm's ``feature_take_indices``.

    Args:
        num_stages: stages available.
        indices: None (all), an int n (the last n) or a list of indices (negative ones count from the end).

    Returns:
        (indices, the largest of them).
    """
    if indices is None:
        indices = num_stages
    if is_int(indices):
        if not 0 < indices <= num_stages:
            raise ValueError(f"indices: the last n stages needs 1 <= n <= {num_stages}, got {indices!r}")
        take = list(range(num_stages - indices, num_stages))
    else:
        take = []
        for i in indices:
            if not is_int(i) or not -num_stages <= i < num_stages:
                raise ValueError(f"indices must hold stage indices in [-{num_stages}, {num_stages - 1}], got {indices!r}")
            take.append(int(i) % num_stages)
    return take, max(take)


class BiFormer(nn.Module):
    """BiFormer classifier, or with ``out_indices`` the ``BiFormer_mm`` dense-prediction backbone.

    The per-stage lists (``depth``, ``embed_dim``, ``qk_dims``, ``topks``, ``kv_per_wins``,
    ``kv_downsample_kernels``, ``kv_downsample_ratios``, ``mlp_ratios``) have one entry per stage (4).

    Args:
        depth: blocks per stage.
        in_chans: input channels.
        num_classes: classes of the linear head; 0 for no head (``forward`` returns the pooled features).
        embed_dim: channels of each stage.
        head_dim: channels per head of the BRA stages: stage i has ``qk_dims[i] // head_dim`` heads.
        qk_scale: BRA logit scale; None: ``qk_dim ** -0.5``.
        representation_size: if set, a ``Linear`` + ``Tanh`` (``pre_logits``) to this width before the head.
        drop_path_rate: stochastic depth, rising linearly from 0 at the first block to this at the last.
        drop_rate: dropout before the head.
        use_checkpoint_stages: stage indices run with gradient checkpointing in training.
        n_win: windows per side of every BRA (7 for 224 classification, 16 in the detection configs).
        kv_downsample_mode: BRA key/value pooling: ``'identity'``, ``'ada_avgpool'``, ``'ada_maxpool'``,
            ``'avgpool'`` or ``'maxpool'``.
        kv_per_wins: pooled keys per window side of each stage (``ada_*`` modes).
        topks: attention of each stage: ``> 0`` BRA with that top-k, ``-1`` global attention, ``-2``
            global attention with LePE, ``0`` a depthwise-conv pseudo-attention.
        side_dwconv: LePE kernel (odd), 0 for none.
        layer_scale_init_value: ``> 0`` adds layer scale (``gamma1``/``gamma2``) with this initial value.
        qk_dims: query/key width of each stage's BRA; None entries mean ``embed_dim[i]``.
        param_routing, diff_routing, soft_routing: BRA routing options (see
            :class:`~yoloattn.nn.BiLevelRoutingAttention`).
        pre_norm: pre-norm (True) or post-norm residuals.
        pe: None, or ``'none'`` (an ``Identity`` appended to the stem / downsample layers in ``pe_stages``).
        pe_stages: see ``pe``.
        before_attn_dwconv: kernel of each block's depthwise-conv position embedding (odd), 0 for none.
        auto_pad: zero-pad each BRA input to multiples of ``n_win`` (any input size); without it the
            stage maps of the BRA stages must be divisible by ``n_win`` (224 with ``n_win=7``).
        kv_downsample_kernels: accepted for the official signature; unused by every mode.
        kv_downsample_ratios: pooling ratio of each stage (``'avgpool'``/``'maxpool'`` modes).
        mlp_ratios: MLP hidden width of each stage, relative to ``embed_dim[i]``.
        param_attention: ``'qkvo'`` (BRA output projection) or ``'qkv'``.
        mlp_dwconv: a 3×3 depthwise conv inside every MLP.
        out_indices: None: the classifier. A list of stage indices: the dense backbone (``BiFormer_mm``):
            ``forward`` returns the LayerNorm-ed outputs of those stages, ``[(N, embed_dim[i], H/2^(i+2),
            W/2^(i+2)) for i in out_indices]``; ``norm``/``head`` are replaced by ``extra_norms``.
        mhsa_num_heads: heads of the ``topk=-1``/``-2`` stages; 8 as the official code (whatever
            ``head_dim``); None: ``qk_dims[i] // head_dim``.
        global_pool: ``'avg'`` (mean over H, W) or ``''`` (no pooling: ``forward_head`` returns the map; needs
            ``num_classes=0``).
        norm_eval: keep the stem/downsample BatchNorms in eval mode while training (``BiFormer_mm``'s
            default for detection).
    """

    def __init__(self, depth: Sequence[int] = (3, 4, 8, 3), in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: Sequence[int] = (64, 128, 320, 512), head_dim: int = 64, qk_scale: float | None = None,
                 representation_size: int | None = None, drop_path_rate: float = 0.0, drop_rate: float = 0.0,
                 use_checkpoint_stages: Sequence[int] = (), n_win: int = 7, kv_downsample_mode: str = "ada_avgpool",
                 kv_per_wins: Sequence[int] = (2, 2, -1, -1), topks: Sequence[int] = (8, 8, -1, -1),
                 side_dwconv: int = 5, layer_scale_init_value: float = -1,
                 qk_dims: Sequence[int | None] = (None, None, None, None), param_routing: bool = False,
                 diff_routing: bool = False, soft_routing: bool = False, pre_norm: bool = True, pe: str | None = None,
                 pe_stages: Sequence[int] = (0,), before_attn_dwconv: int = 3, auto_pad: bool = False,
                 kv_downsample_kernels: Sequence[int] = (4, 2, 1, 1), kv_downsample_ratios: Sequence[int] = (4, 2, 1, 1),
                 mlp_ratios: Sequence[float] = (4, 4, 4, 4), param_attention: str = "qkvo", mlp_dwconv: bool = False,
                 *, out_indices: Sequence[int] | None = None, mhsa_num_heads: int | None = 8,
                 global_pool: str = "avg", norm_eval: bool = False):
        super().__init__()
        depth = _per_stage("depth", depth, _int_at_least(0))
        embed_dim = _per_stage("embed_dim", embed_dim, _int_at_least(1))
        if embed_dim[0] < 2:
            raise ValueError(f"embed_dim[0] must be >= 2 (the stem's first conv has embed_dim[0] // 2 channels), "
                             f"got {embed_dim[0]!r}")
        topks = _per_stage("topks", topks, _topk)
        qk_dims = _per_stage("qk_dims", qk_dims, lambda n, v: v if v is None else _int_at_least(1)(n, v))
        qk_dims = [embed_dim[i] if q is None else q for i, q in enumerate(qk_dims)]
        mlp_ratios = _per_stage("mlp_ratios", mlp_ratios, _positive_number)
        kv_per_wins = _per_stage("kv_per_wins", kv_per_wins)
        kv_downsample_ratios = _per_stage("kv_downsample_ratios", kv_downsample_ratios)
        kv_downsample_kernels = _per_stage("kv_downsample_kernels", kv_downsample_kernels)
        positive_int("in_chans", in_chans)
        positive_int("num_classes", num_classes, minimum=0)
        positive_int("head_dim", head_dim)
        if representation_size is not None and representation_size != 0:
            positive_int("representation_size", representation_size)
        in_range("drop_path_rate", drop_path_rate, 0.0, 1.0, high_open=True)
        in_range("drop_rate", drop_rate, 0.0, 1.0, high_open=True)
        if isinstance(use_checkpoint_stages, (str, bytes)) or not isinstance(use_checkpoint_stages, Sequence):
            raise ValueError(f"use_checkpoint_stages must be a list of stage indices, got {use_checkpoint_stages!r}")
        checkpoint_stages = {_stage_index(f"use_checkpoint_stages[{j}]", i) for j, i in enumerate(use_checkpoint_stages)}
        if pe is not None and pe != "none":
            raise ValueError(f"pe must be None or 'none' (the only position embedding BiFormer implements), got {pe!r}")
        pe_stages = {_stage_index(f"pe_stages[{j}]", i) for j, i in enumerate(pe_stages)}
        for name, value in (("pre_norm", pre_norm), ("auto_pad", auto_pad), ("mlp_dwconv", mlp_dwconv),
                            ("norm_eval", norm_eval)):
            flag(name, value)
        choice("global_pool", global_pool, ("avg", ""))
        if global_pool == "" and num_classes > 0:
            raise ValueError(f"global_pool='' (no pooling) needs num_classes=0 (no head), got num_classes={num_classes}")
        if mhsa_num_heads is not None:
            positive_int("mhsa_num_heads", mhsa_num_heads)
        if out_indices is not None:
            out_indices = feature_take_indices(NUM_STAGES, list(out_indices) if not is_int(out_indices) else out_indices)[0]
            if len(set(out_indices)) != len(out_indices) or out_indices != sorted(out_indices):
                raise ValueError(f"out_indices must be increasing stage indices without repeats, got {out_indices!r}")
        heads = []
        for i in range(NUM_STAGES):
            if topks[i] == 0:
                heads.append(8)  # the conv pseudo-attention has no heads
            elif topks[i] > 0 or mhsa_num_heads is None:
                if qk_dims[i] // head_dim < 1:
                    raise ValueError(f"qk_dims[{i}]={qk_dims[i]} gives no head with head_dim={head_dim} "
                                     f"(stage {i} has qk_dims[{i}] // head_dim heads); use a smaller head_dim")
                heads.append(qk_dims[i] // head_dim)
            else:
                heads.append(mhsa_num_heads)  # official: Attention/AttentionLePE built with their default 8

        self.num_classes = num_classes
        self.embed_dim = list(embed_dim)  # the official attribute (a list)
        self.num_features = self.head_hidden_size = representation_size or embed_dim[-1]
        self.in_chans = in_chans
        self.n_win = n_win
        self.auto_pad = auto_pad
        self.topks = list(topks)
        self.global_pool = global_pool
        self.norm_eval = norm_eval
        self.out_indices = out_indices
        self.grad_checkpointing = [i in checkpoint_stages for i in range(NUM_STAGES)]
        self.feature_info = [dict(num_chs=embed_dim[i], reduction=4 * 2 ** i, module=f"stages.{i}")
                             for i in range(NUM_STAGES)]

        # stem (stride 4) and three stride-2 downsample layers; every conv halves H, W as ceil(H / 2)
        self.downsample_layers = nn.ModuleList()
        for i in range(NUM_STAGES):
            if i == 0:
                layer = nn.Sequential(
                    nn.Conv2d(in_chans, embed_dim[0] // 2, 3, 2, 1), nn.BatchNorm2d(embed_dim[0] // 2), nn.GELU(),
                    nn.Conv2d(embed_dim[0] // 2, embed_dim[0], 3, 2, 1), nn.BatchNorm2d(embed_dim[0]))
            else:
                layer = nn.Sequential(nn.Conv2d(embed_dim[i - 1], embed_dim[i], 3, 2, 1), nn.BatchNorm2d(embed_dim[i]))
            if pe is not None and i in pe_stages:
                layer.append(nn.Identity())  # the official get_pe_layer('none')
            self.downsample_layers.append(layer)

        # the official schedule: a float32 linspace read back as Python floats
        dp_rates = [v.item() for v in torch.linspace(0, drop_path_rate, sum(depth), device="cpu")]
        self.stages = nn.ModuleList()
        cur = 0
        for i in range(NUM_STAGES):
            self.stages.append(nn.Sequential(*[
                BiFormerBlock(
                    dim=embed_dim[i], drop_path=dp_rates[cur + j], layer_scale_init_value=layer_scale_init_value,
                    topk=topks[i], num_heads=heads[i], n_win=n_win, qk_dim=qk_dims[i], qk_scale=qk_scale,
                    kv_per_win=kv_per_wins[i], kv_downsample_ratio=kv_downsample_ratios[i],
                    kv_downsample_kernel=kv_downsample_kernels[i], kv_downsample_mode=kv_downsample_mode,
                    param_attention=param_attention, param_routing=param_routing, diff_routing=diff_routing,
                    soft_routing=soft_routing, mlp_ratio=mlp_ratios[i], mlp_dwconv=mlp_dwconv,
                    side_dwconv=side_dwconv, before_attn_dwconv=before_attn_dwconv, pre_norm=pre_norm,
                    auto_pad=auto_pad)
                for j in range(depth[i])]))
            cur += depth[i]

        if out_indices is None:
            self.norm = nn.BatchNorm2d(embed_dim[-1])
            self.pre_logits = (nn.Sequential(OrderedDict(fc=nn.Linear(embed_dim[-1], representation_size),
                                                         act=nn.Tanh()))
                               if representation_size else nn.Identity())
            self.head_drop = nn.Dropout(drop_rate)
            self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
            self.extra_norms = None
        else:
            # BiFormer_mm: no norm/head, one LayerNorm per stage (all four, so its checkpoints load)
            self.norm = self.head = None
            self.pre_logits = nn.Identity()
            self.head_drop = nn.Identity()
            self.extra_norms = nn.ModuleList(_LayerNormNCHW(c) for c in embed_dim)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """The official init: truncated normal (std 0.02, cut at ±2) Linear weights, zero biases, LayerNorm 1/0."""
        if isinstance(m, nn.Linear):
            _trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ---- timm-style helpers -------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The official set (names no BiFormer parameter has, so nothing is excluded)."""
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True, stages: Sequence[int] | None = None,
                               granularity: str = "stage") -> None:
        """Gradient checkpointing (``torch.utils.checkpoint``, ``use_reentrant=False``) for all or some stages.

        Args:
            enable: turn it on (True) or off (False).
            stages: the stages (0-3) it applies to; None: all.
            granularity: ``'stage'`` recomputes whole stages (the least memory: only stage inputs are kept);
                ``'mlp'`` recomputes only each block's MLP branch (its LayerNorm, the 3x-wide fc1 and GELU
                activations; on the ``layer_norm_mlp`` op's ``lean`` backend fc1 but not fc2), which keeps
                about 60% of a block's activations for a few percent more time.
        """
        flag("enable", enable)
        choice("granularity", granularity, ("stage", "mlp"))
        chosen = range(NUM_STAGES) if stages is None else {_stage_index("stages", i) for i in stages}
        for i in chosen:
            if granularity == "stage":
                self.grad_checkpointing[i] = enable
            else:
                for block in self.stages[i]:
                    block.checkpoint_mlp = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head by a new (freshly initialised) ``Linear(num_features, num_classes)``, or Identity for 0."""
        positive_int("num_classes", num_classes, minimum=0)
        if self.out_indices is not None:
            raise ValueError("reset_classifier: this BiFormer is a dense backbone (out_indices set); it has no head")
        global_pool = self.global_pool if global_pool is None else choice("global_pool", global_pool, ("avg", ""))
        if global_pool == "" and num_classes > 0:
            raise ValueError(f"global_pool='' (no pooling) needs num_classes=0 (no head), got num_classes={num_classes}")
        self.global_pool = global_pool
        self.num_classes = num_classes
        weight = next(self.parameters())
        self.head = (nn.Linear(self.num_features, num_classes, device=weight.device, dtype=weight.dtype)
                     if num_classes > 0 else nn.Identity())
        self.head.apply(self._init_weights)

    def train(self, mode: bool = True) -> BiFormer:
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()  # frozen running statistics (BiFormer_mm's norm_eval)
        return self

    # ---- forward -------------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        check_image(x, self, self.in_chans)
        h, w = x.shape[-2:]
        if self.auto_pad or not (isinstance(h, int) and isinstance(w, int)):
            return
        for i in range(len(self.stages)):
            h, w = -(-h // (4 if i == 0 else 2)), -(-w // (4 if i == 0 else 2))  # ceil, as the stride-2 convs
            if self.topks[i] > 0 and len(self.stages[i]) and (h % self.n_win or w % self.n_win):
                raise ValueError(
                    f"BiFormer with auto_pad=False needs every BRA stage map divisible by n_win={self.n_win}, but the "
                    f"input of size {tuple(x.shape[-2:])} gives a {h}x{w} map in stage {i}; use auto_pad=True or an "
                    f"input size whose stage maps are multiples of n_win (e.g. {32 * self.n_win} for n_win={self.n_win})")

    def _run_stage(self, i: int, x: Tensor) -> Tensor:
        x = self.downsample_layers[i](x)
        if self.grad_checkpointing[i] and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(self.stages[i], x, use_reentrant=False)
        return self.stages[i](x)

    def _stage_output(self, i: int, x: Tensor) -> Tensor:
        return self.extra_norms[i](x).contiguous() if self.extra_norms is not None else x

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Stage outputs, as timm's ``forward_intermediates``.

        Args:
            x: (N, in_chans, H, W).
            indices: stages to return: None (all), the last n, or a list of indices.
            norm: apply the final BatchNorm ``norm`` to the last stage's output (when it is returned).
            stop_early: do not run the stages after the last index (the final output is then that stage's).
            output_fmt: ``'NCHW'`` only.
            intermediates_only: return only the list of stage outputs.

        Returns:
            ``[(N, embed_dim[i], H_i, W_i) for i in indices]`` (LayerNorm-ed by ``extra_norms`` in the dense
            backbone), or ``(final, intermediates)`` with ``final`` as :meth:`forward_features`.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        self._check_input(x)
        take, last = feature_take_indices(len(self.stages), indices)
        intermediates = []
        stages = last + 1 if stop_early or intermediates_only else len(self.stages)
        for i in range(stages):
            x = self._run_stage(i, x)
            if i in take:
                out = self._stage_output(i, x)
                if norm and i == NUM_STAGES - 1 and isinstance(self.norm, nn.BatchNorm2d):
                    out = self.norm(out)
                intermediates.append(out)
        if intermediates_only:
            return intermediates
        if self.norm is not None and stages == NUM_STAGES:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last of ``indices`` (and the head / final norm), as timm's feature wrappers do.

        Returns:
            The absolute stage indices.
        """
        take, last = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:last + 1]
        self.downsample_layers = self.downsample_layers[:last + 1]
        if self.extra_norms is not None:
            self.extra_norms = self.extra_norms[:last + 1]
        if prune_norm and self.norm is not None:
            self.norm = nn.Identity()
        if prune_head and self.out_indices is None:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: Tensor) -> Tensor | list[Tensor]:
        """Classifier: x (N, in_chans, H, W) -> the map after the final BatchNorm, (N, embed_dim[-1], H/32, W/32).
        Dense backbone: the list of :meth:`forward` outputs."""
        if self.out_indices is not None:
            return self.forward_intermediates(x, self.out_indices, intermediates_only=True)
        self._check_input(x)
        for i in range(len(self.stages)):
            x = self._run_stage(i, x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(N, C, h, w) map -> logits (N, num_classes), or the features before the head with ``pre_logits``."""
        if self.global_pool == "avg":
            x = x.flatten(2).mean(-1)  # (N, C), pooled after the BatchNorm as the official code
            x = self.pre_logits(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        """Classifier: x (N, in_chans, H, W) -> logits (N, num_classes) (pooled features if ``num_classes=0``).

        Dense backbone (``out_indices``): ``[(N, embed_dim[i], ceil(H / 2^(i+2)), ceil(W / 2^(i+2)))
        for i in out_indices]``, each LayerNorm-ed over its channels.
        """
        if self.out_indices is not None:
            return self.forward_features(x)
        return self.forward_head(self.forward_features(x))


# ---- checkpoints --------------------------------------------------------------------------------------------
_PREFIXES = ("module.", "_orig_mod.")


def checkpoint_state_dict(checkpoint: str | os.PathLike | Mapping[str, Any], *, key: str | None = None,
                          weights_only: bool = True) -> dict[str, Tensor]:
    """The weights of an official BiFormer checkpoint.

    The official training script saves ``{'model': weights, 'model_ema': ..., 'optimizer': ..., 'args': ...}``
    and the official loaders read ``'model'``. So does this: ``'model'``, else ``'state_dict'`` (mmdet/mmseg
    files), else the mapping itself when it holds only tensors. ``'model_ema'`` (which timm's own file loader
    prefers) is read only when asked for with ``key='model_ema'``. ``module.`` / ``_orig_mod.`` prefixes
    (DDP, torch.compile) are stripped.

    Args:
        checkpoint: a file path (read with ``torch.load(map_location='cpu', weights_only=...)``) or a loaded dict.
        key: the entry to read; None picks as above.
        weights_only: passed to ``torch.load`` (``argparse.Namespace``, the official ``args``, is allowed). Files
            that pickle other objects (e.g. an omegaconf ``args``) need ``weights_only=False``: use it only for
            files you trust.

    Returns:
        A plain ``{name: tensor}`` state dict.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no BiFormer checkpoint at {path!r}")
        # the official training script pickles its argparse.Namespace 'args' next to the weights: allow that one
        safe_globals = getattr(torch.serialization, "safe_globals", None)
        allow = safe_globals([argparse.Namespace]) if weights_only and safe_globals else contextlib.nullcontext()
        try:
            with allow:
                checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
        except Exception as error:  # weights_only refuses other pickled objects
            if not weights_only:
                raise
            raise RuntimeError(f"torch.load(weights_only=True) could not read {path!r} ({error}). If the file holds "
                               f"other pickled objects (e.g. training args) and you trust it, pass "
                               f"weights_only=False") from error
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"a BiFormer checkpoint must be a dict, got {type(checkpoint).__name__}")
    if key is not None:
        if key not in checkpoint:
            raise KeyError(f"the checkpoint has no {key!r} entry; its entries are {sorted(checkpoint)}")
        state = checkpoint[key]
    elif isinstance(checkpoint.get("model"), Mapping):
        state = checkpoint["model"]
    elif isinstance(checkpoint.get("state_dict"), Mapping):
        state = checkpoint["state_dict"]
    elif checkpoint and all(isinstance(v, Tensor) for v in checkpoint.values()):
        state = checkpoint
    else:
        raise ValueError(f"cannot find the weights in this checkpoint: no 'model' or 'state_dict' entry and not a "
                         f"plain state dict (entries: {sorted(checkpoint)[:10]}); pass key=")
    out = {}
    for name, value in state.items():
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        out[name] = value
    return out


def load_checkpoint(model: BiFormer, checkpoint: str | os.PathLike | Mapping[str, Any], *, strict: bool = True,
                    key: str | None = None, weights_only: bool = True):
    """Load an official checkpoint (see :func:`checkpoint_state_dict`) into ``model``.

    A classifier loads with ``strict``. A dense backbone (``out_indices``) loads a classification checkpoint
    as ``BiFormer_mm`` does: ``norm.*`` and ``head.*`` are dropped, and ``extra_norms.*``, when the file has
    none, keep their init (1 / 0); every other key must match when ``strict``. A ``BiFormer_mm`` file
    (with ``extra_norms``) loads completely.

    Returns:
        The ``(missing_keys, unexpected_keys)`` of ``load_state_dict``.
    """
    state = checkpoint_state_dict(checkpoint, key=key, weights_only=weights_only)
    if model.out_indices is not None:
        state = {k: v for k, v in state.items() if not k.startswith(("norm.", "head."))}
        if not any(k.startswith("extra_norms.") for k in state):
            result = model.load_state_dict(state, strict=False)
            missing = [k for k in result.missing_keys if not k.startswith("extra_norms.")]
            if strict and (missing or result.unexpected_keys):
                raise RuntimeError(f"the checkpoint does not fit this BiFormer backbone: missing {missing}, "
                                   f"unexpected {result.unexpected_keys}")
            return result
    return model.load_state_dict(state, strict=strict)


# ---- factories -----------------------------------------------------------------------------------------------
def _build(arch: str, pretrained: bool | str | os.PathLike, kwargs: dict) -> BiFormer:
    if pretrained is True:
        raise ValueError(f"{arch}(pretrained=True): yoloattn downloads nothing; pass the path of the official "
                         f"checkpoint, e.g. {arch}(pretrained='path/to/{arch}_best.pth')")
    if not isinstance(pretrained, (bool, str, os.PathLike)):
        raise TypeError(f"pretrained must be False or a checkpoint path, got {pretrained!r}")
    model = BiFormer(**dict(BIFORMER_ARCHS[arch], **kwargs))
    if pretrained:
        load_checkpoint(model, pretrained)
    return model


def biformer_tiny(pretrained: bool | str | os.PathLike = False, **kwargs) -> BiFormer:
    """BiFormer-T (13,142,760 parameters; ImageNet top-1 81.4 at 224 with the official weights).

    Args:
        pretrained: False, or the path of an official checkpoint to load (nothing is downloaded).
        **kwargs: :class:`BiFormer` arguments over the official ones, e.g. ``num_classes=10``, ``auto_pad=True``,
            or the detection settings ``n_win=16, auto_pad=True, out_indices=(0, 1, 2, 3)``.
    """
    return _build("biformer_tiny", pretrained, kwargs)


def biformer_small(pretrained: bool | str | os.PathLike = False, **kwargs) -> BiFormer:
    """BiFormer-S (25,536,232 parameters; top-1 83.8). Arguments as :func:`biformer_tiny`."""
    return _build("biformer_small", pretrained, kwargs)


def biformer_base(pretrained: bool | str | os.PathLike = False, **kwargs) -> BiFormer:
    """BiFormer-B (56,804,968 parameters; top-1 84.3). Arguments as :func:`biformer_tiny`."""
    return _build("biformer_base", pretrained, kwargs)


def biformer_dense(variant: str = "small", pretrained: bool | str | os.PathLike = False,
                   out_indices: Sequence[int] = (0, 1, 2, 3), **kwargs) -> BiFormer:
    """The official detection backbone (``BiFormer_mm`` with the COCO configs): ``n_win=16``, ``auto_pad=True``,
    frozen stem/downsample BatchNorm statistics (``norm_eval=True``), per-stage LayerNorms, any input size.

    Args:
        variant: ``'tiny'``, ``'small'`` or ``'base'`` (the official configs exist for small and base, trained
            with ``drop_path_rate`` 0.2 and 0.3).
        pretrained: False, or an official classification (or ``BiFormer_mm``) checkpoint path; the classifier's
            ``norm``/``head`` are dropped as the official loader does.
        out_indices: stages returned (strides 4, 8, 16, 32); a YOLO neck usually takes ``(1, 2, 3)``.
        **kwargs: :class:`BiFormer` arguments over these (e.g. ``n_win=8`` as the ADE20K configs).
    """
    arch = f"biformer_{choice('variant', variant, ('tiny', 'small', 'base'))}"
    return _build(arch, pretrained, dict(DENSE_SETTINGS, out_indices=out_indices, **kwargs))
