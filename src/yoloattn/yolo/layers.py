"""YAML-facing layers: the yoloattn modules as Ultralytics ``parse_model`` builds them.

Ultralytics builds a module it does not know with ``m(*args)`` from the YAML row and assumes
it keeps its channel count; it never passes the input channel count. These classes take it
themselves: when ``parse_model`` calls them, :class:`_TakesInputChannels` reads the row's
``ch[f]`` from the calling ``parse_model`` frame (the scale's real width) and puts it first,
as Ultralytics does for its own layers. Called anywhere else they are ordinary modules whose
first argument is the input channel count.

A bad row raises ``ValueError`` naming the row, the layer and the arguments.
"""

from __future__ import annotations

import sys

from ..nn import bra as _bra
from ..nn import dat as _dat

__all__ = ["BiLevelRoutingAttention", "DAttention", "YAML_LAYERS"]


def _parse_model_frame():
    """The ``parse_model`` frame that is building a row right now, or None."""
    frame = sys._getframe(2)  # 0: here, 1: __call__, 2: the caller
    if frame.f_code.co_name == "<genexpr>":  # rows with n > 1 build inside a generator expression
        frame = frame.f_back
    if frame is not None and frame.f_code.co_name == "parse_model" and "ch" in frame.f_locals:
        return frame
    return None


class _TakesInputChannels(type):
    """Metaclass: prepend ``ch[f]`` to the arguments when built by Ultralytics ``parse_model``."""

    def __call__(cls, *args, **kwargs):
        frame = _parse_model_frame()
        if frame is None:
            return super().__call__(*args, **kwargs)
        f_locals = frame.f_locals
        row, source, ch = f_locals.get("i"), f_locals.get("f"), f_locals["ch"]
        where = f"YAML row {row} ({cls.__name__}, from={source!r}, args={list(args)!r})"
        if not isinstance(source, int):
            raise ValueError(f"{where}: {cls.__name__} takes one input, so 'from' must be a single index")
        try:
            c1 = ch[source]
        except IndexError:
            raise ValueError(f"{where}: 'from' index {source} does not name an earlier layer") from None
        try:
            return super().__call__(c1, *args, **kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where} with input channels {c1}: {e}") from e


class BiLevelRoutingAttention(_bra.BiLevelRoutingAttention, metaclass=_TakesInputChannels):
    """:class:`yoloattn.nn.BiLevelRoutingAttention` as a YAML layer.

    YAML: ``[-1, 1, BiLevelRoutingAttention, []]`` or with the positional arguments that follow
    ``dim`` in the seed signature, e.g. ``[7, 8, None, None, 4, 4, None, 'identity', 4]``
    (n_win, num_heads, qk_dim, qk_scale, kv_per_win, kv_downsample_ratio, kv_downsample_kernel,
    kv_downsample_mode, topk, ...). The input channel count comes from the model.
    """


class DAttention(_dat.DAttention, metaclass=_TakesInputChannels):
    """:class:`yoloattn.nn.DAttention` (deformable attention) as a YAML layer.

    YAML: ``[-1, 1, DAttention, []]`` or with the arguments after ``c1``:
    ``[n_heads, n_groups, stride, ksize, offset_range_factor, pe, pe_size, attn_drop, proj_drop, residual]``, e.g. ``[None, None, 8]``.
    The input channel count comes from the model.
    """


# names a YAML can use -> classes; never a name Ultralytics already has (checked at registration)
YAML_LAYERS = {"BiLevelRoutingAttention": BiLevelRoutingAttention, "DAttention": DAttention}
