"""YAML-facing layers: the yoloattn modules as Ultralytics ``parse_model`` builds them.

Ultralytics builds a module it does not know with ``m(*args)`` from the YAML row and assumes it keeps
its channel count; it never passes the input channel count. These classes take it themselves: when
``parse_model`` calls them, :class:`TakesInputChannels` reads the row's ``ch[f]`` from the calling
``parse_model`` frame (the scale's real width) and puts it first, as Ultralytics does for its own
layers. Called anywhere else they are ordinary modules whose first argument is the input channel count.
Every one keeps its input's channel count (parse_model records it so).

A row's arguments are the constructor's arguments after the channel count, positional, then optionally
one mapping of keyword arguments (the recommended form)::

    - [-1, 1, BiLevelRoutingAttention, [{topk: 8, n_win: 10}]]
    - [-1, 1, DAttention, [None, None, 4, {pe: dwc}]]

A bad row raises ``ValueError`` naming the row, the layer and the arguments; an unknown keyword names the
allowed ones. The classes live in one module per family; checkpoints name them under the stable path
``yoloattn.yolo.layers.<Name>``, whatever module defines them.
"""

from __future__ import annotations

# Importing the families imports Ultralytics' blocks, which runs yoloattn's registration hook; registration needs
# this package complete, so it waits for the end of this file (below).
_loading = True

from .base import TakesInputChannels, split_arguments  # noqa: E402
from .biformer import BiFormer, BiFormerBlock, C2f_BiFormer, C3k2_BiFormer
from .convolutional import CPCA, EMA, MSCA, PolarizedSelfAttention, SeaAttention
from .deformable import DLKA, DAttention
from .routing import BiLevelRoutingAttention
from .transformer import HAB, MSDA, ACmix

__all__ = ["ACmix", "BiFormer", "BiFormerBlock", "BiLevelRoutingAttention", "C2f_BiFormer", "C3k2_BiFormer", "CPCA", "DAttention", "DLKA", "EMA", "HAB", "MSCA", "MSDA",
           "PolarizedSelfAttention", "SeaAttention", "TakesInputChannels", "YAML_LAYERS", "split_arguments"]

# names a YAML can use -> classes; never a name Ultralytics already has (checked at registration)
YAML_LAYERS = {cls.__name__: cls for cls in (BiLevelRoutingAttention, DAttention, DLKA, EMA, CPCA, MSCA,
                                             PolarizedSelfAttention, SeaAttention, MSDA, ACmix, HAB, BiFormerBlock,
                                             C2f_BiFormer, C3k2_BiFormer, BiFormer)}
for _cls in YAML_LAYERS.values():
    _cls.__module__ = __name__  # the stable pickle path of every YAML layer

_loading = False
from ..register import register as _register  # noqa: E402

_register()  # Ultralytics is imported by now (the families need its blocks): finish what its import hook deferred
