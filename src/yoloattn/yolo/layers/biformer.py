"""The BiFormer family as YAML layers: the BiFormer block, C2f/C3k2 with BiFormer blocks, and a BiFormer backbone.

- ``BiFormerBlock``: BiFormer's block (position conv, BRA, MLP, residuals), keeping its input's channels.
- ``C2f_BiFormer`` (YOLOv8) and ``C3k2_BiFormer`` (YOLO11): Ultralytics' C2f / C3k2 whose bottlenecks are
  BiFormer blocks, as YOLO improvement collections build them. Ultralytics scales its own blocks' width
  (``c2``) and depth (``n``) in ``parse_model`` only for the classes it knows; these two compare equal to
  C2f and C3k2 there (and hash alike), so a row such as ``[-1, 3, C2f_BiFormer, [256, True]]`` is scaled and
  repeated exactly as ``[-1, 3, C2f, [256, True]]``: ``(c1, c2, n, shortcut, ...)``. Block options go in a
  trailing mapping: ``[-1, 3, C2f_BiFormer, [256, True, {topk: 8}]]``. (So ``C2f_BiFormer == C2f`` is True.)
- ``BiFormer``: a BiFormer backbone (``tiny``/``small``/``base``) as the first row; it returns its four stage
  outputs (strides 4, 8, 16, 32), which Ultralytics' ``Index`` rows pick (as for Ultralytics' ``TorchVision``
  layer), optionally loaded from an official ImageNet checkpoint.
"""

from __future__ import annotations

import torch.nn as nn
from ultralytics.nn.modules import C2f, C3k2

from ...nn import biformer as _biformer
from ...nn._checks import choice, positive_int
from .base import TakesInputChannels

__all__ = ["BiFormer", "BiFormerBlock", "C2f_BiFormer", "C3k2_BiFormer"]


class BiFormerBlock(_biformer.BiFormerBlock, metaclass=TakesInputChannels):
    """:class:`yoloattn.nn.BiFormerBlock` as a YAML layer: ``[-1, 1, BiFormerBlock, [{topk: 4, n_win: 7}]]``.

    Positional arguments after the channel count follow the block's signature (``drop_path,
    layer_scale_init_value, num_heads, n_win, ...``). Unlike the block's own default, ``auto_pad`` is on, so
    any map size works.
    """

    def __init__(self, dim: int, *args, auto_pad: bool = True, **kwargs):
        super().__init__(dim, *args, auto_pad=auto_pad, **kwargs)


def _blocks(c: int, n: int, options: dict) -> nn.ModuleList:
    """n BiFormer blocks of width c: BRA with 7x7 windows and top-4 routing, heads of 32 channels, LePE 5,
    MLP ratio 3 (BiFormer's stage settings), padding to whole windows (any map size)."""
    settings = dict(num_heads=max(1, c // 32), n_win=7, topk=4, kv_downsample_mode="identity", mlp_ratio=3,
                    side_dwconv=5, auto_pad=True)
    settings.update(options)
    heads = settings["num_heads"]
    if c % heads:
        settings["num_heads"] = max(h for h in range(1, heads + 1) if c % h == 0)
    return nn.ModuleList(_biformer.BiFormerBlock(c, **settings) for _ in range(n))


class _LikeUltralyticsBlock(type):
    """Metaclass: the class compares equal to (and hashes like) an Ultralytics block, so ``parse_model`` scales
    and repeats its rows as that block's; a trailing mapping in the arguments becomes keyword arguments."""

    def __eq__(cls, other):
        return other is cls or other is cls.__dict__.get("_scaled_like")

    def __hash__(cls):
        like = cls.__dict__.get("_scaled_like")
        return hash(like) if like is not None else type.__hash__(cls)

    def __call__(cls, *args, **kwargs):
        if args and isinstance(args[-1], dict):
            kwargs = {**args[-1], **kwargs}
            args = args[:-1]
        return super().__call__(*args, **kwargs)


class C2f_BiFormer(C2f, metaclass=_LikeUltralyticsBlock):  # noqa: N801 - the name YOLO collections use
    """Ultralytics' C2f with BiFormer blocks in place of its bottlenecks.

    Args:
        c1, c2, n, shortcut, g, e: as :class:`ultralytics.nn.modules.C2f` (``shortcut`` and ``g`` do not apply:
            every BiFormer block has its own residuals).
        **block: options of the BiFormer blocks (:class:`yoloattn.nn.BiFormerBlock`: ``topk``, ``n_win``,
            ``num_heads``, ``mlp_ratio``, ...).
    """

    _scaled_like = C2f

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, g: int = 1, e: float = 0.5, **block):
        super().__init__(c1, c2, n, shortcut, g, e)
        self.m = _blocks(self.c, n, block)


class C3k2_BiFormer(C3k2, metaclass=_LikeUltralyticsBlock):  # noqa: N801 - the name YOLO collections use
    """Ultralytics' C3k2 with BiFormer blocks in place of its bottlenecks (``c3k`` does not apply).

    Args:
        c1, c2, n, c3k, e, g, shortcut: as :class:`ultralytics.nn.modules.C3k2`.
        **block: options of the BiFormer blocks.
    """

    _scaled_like = C3k2

    def __init__(self, c1: int, c2: int, n: int = 1, c3k: bool = False, e: float = 0.5, g: int = 1,
                 shortcut: bool = True, **block):
        super().__init__(c1, c2, n, c3k, e, g, shortcut)
        self.m = _blocks(self.c, n, block)


VARIANTS = ("tiny", "small", "base")


class BiFormer(nn.Module, metaclass=TakesInputChannels):
    """A BiFormer backbone as a YOLO row: ``[-1, 1, BiFormer, [tiny]]``, returns its 4 stage outputs.

    Pick them with Ultralytics' ``Index`` rows (``[0, 1, Index, [128, 1]]`` for stride 8 of BiFormer-T/S, whose
    stages have 64/128/256/512 channels; BiFormer-B 96/192/384/768). The backbone's widths are its own: the
    model's scale applies to the neck and head only.

    Args:
        c1: input channels (from the model, 3).
        variant: ``'tiny'``, ``'small'`` or ``'base'``.
        n_win: BRA windows per side (BiFormer's detection configs use 16; 7 as for classification).
        weights: an official ImageNet checkpoint (``biformer_tiny_best.pth``) to load into the backbone, or None.
    """

    def __init__(self, c1: int = 3, variant: str = "tiny", n_win: int = 7, weights: str | None = None):
        super().__init__()
        from ...models.biformer import biformer_dense, load_checkpoint

        positive_int("c1", c1)
        choice("variant", variant, VARIANTS)
        positive_int("n_win", n_win)
        self.variant, self.n_win = variant, n_win
        self.body = biformer_dense(variant, in_chans=c1, n_win=n_win, out_indices=(0, 1, 2, 3), norm_eval=False)
        self.loaded = None
        if weights:
            from ..checkpoints import require_file

            require_file(weights, "BiFormer weights")
            self.loaded = load_checkpoint(self.body, str(weights), strict=False)

    def forward(self, x):
        """x: (N, C, H, W) -> [(N, C_i, H / 2^(i+2), W / 2^(i+2)) for the 4 stages]."""
        return self.body(x)
