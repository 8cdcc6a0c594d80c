"""YAML-facing layers: the yoloattn modules as Ultralytics ``parse_model`` builds them.

Ultralytics builds a module it does not know with ``m(*args)`` from the YAML row and assumes it keeps
its channel count; it never passes the input channel count. These classes take it themselves: when
``parse_model`` calls them, :class:`TakesInputChannels` reads the row's ``ch[f]`` from the calling
``parse_model`` frame (the scale's real width) and puts it first, as Ultralytics does for its own
layers. Called anywhere else they are ordinary modules whose first argument is the input channel count.

A row's arguments are the constructor's arguments after the channel count, positional, then optionally
one mapping of keyword arguments (the recommended form)::

    - [-1, 1, BiLevelRoutingAttention, [{topk: 8, n_win: 10}]]
    - [-1, 1, DAttention, [None, None, 4, {pe: dwc}]]

A bad row raises ``ValueError`` naming the row, the layer and the arguments; an unknown keyword names the
allowed ones.
"""

from __future__ import annotations

import inspect
import sys

from ..nn import bra as _bra
from ..nn import dat as _dat

__all__ = ["BiLevelRoutingAttention", "DAttention", "TakesInputChannels", "YAML_LAYERS"]


def _parse_model_frame():
    """The ``parse_model`` frame that is building a row right now, or None."""
    frame = sys._getframe(2)  # 0: here, 1: __call__, 2: the caller
    if frame.f_code.co_name == "<genexpr>":  # rows with n > 1 build inside a generator expression
        frame = frame.f_back
    if frame is not None and frame.f_code.co_name == "parse_model" and "ch" in frame.f_locals:
        return frame
    return None


def _keywords(cls) -> list[str]:
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]  # self, the channel count
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def split_arguments(cls, args: tuple, where: str) -> tuple[tuple, dict]:
    """A row's arguments -> (positional, keyword): a trailing mapping holds the keyword arguments."""
    kwargs = {}
    if args and isinstance(args[-1], dict):
        kwargs, args = dict(args[-1]), tuple(args[:-1])
    if any(isinstance(a, dict) for a in args):
        raise ValueError(f"{where}: only the last argument may be a mapping of keyword arguments")
    allowed = _keywords(cls)
    unknown = sorted(k for k in kwargs if k not in allowed)
    if unknown:
        raise ValueError(f"{where}: unknown keyword argument(s) {unknown} for {cls.__name__}; allowed: {allowed}")
    if len(args) > len(allowed):
        raise ValueError(f"{where}: {cls.__name__} takes at most {len(allowed)} arguments after the input channels "
                         f"({', '.join(allowed)}), got {len(args)}")
    doubled = sorted(k for k in kwargs if k in allowed[:len(args)])
    if doubled:
        raise ValueError(f"{where}: {doubled} given both by position and by keyword")
    return args, kwargs


class TakesInputChannels(type):
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
        args, row_kwargs = split_arguments(cls, args, where)
        try:
            layer = super().__call__(c1, *args, **row_kwargs, **kwargs)
            cls.check_row(layer, args, row_kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where} with input channels {c1}: {e}") from e
        return layer

    def check_row(cls, layer, args: tuple, kwargs: dict) -> None:
        """Refuse row arguments that have no effect (a value in the wrong position, most likely)."""


class BiLevelRoutingAttention(_bra.BiLevelRoutingAttention, metaclass=TakesInputChannels):
    """:class:`yoloattn.nn.BiLevelRoutingAttention` as a YAML layer.

    YAML: ``[-1, 1, BiLevelRoutingAttention, []]``, keywords ``[{topk: 8}]``, or BiFormer's positional order
    after ``dim``: ``[n_win, num_heads, qk_dim, qk_scale, kv_per_win, kv_downsample_ratio, kv_downsample_kernel,
    kv_downsample_mode, topk, param_attention, param_routing, diff_routing, soft_routing, side_dwconv, auto_pad]``.
    The input channel count comes from the model. A row that sets an argument its configuration ignores
    (``kv_per_win`` without an ``ada_*`` pooling mode, ``kv_downsample_ratio`` without ``avgpool``/``maxpool``,
    ``kv_downsample_kernel``) is refused: it is almost always a value in the wrong position.
    """

    @classmethod
    def check_row(cls, layer, args, kwargs):
        given = dict(zip(_keywords(cls), args), **kwargs)
        defaults = {p.name: p.default for p in inspect.signature(_bra.BiLevelRoutingAttention.__init__).parameters.values()}
        ignored = []
        if not layer.kv_downsample_mode.startswith("ada_"):
            ignored.append("kv_per_win")
        if layer.kv_downsample_mode not in ("avgpool", "maxpool"):
            ignored.append("kv_downsample_ratio")
        ignored.append("kv_downsample_kernel")
        for name in ignored:
            if name in given and given[name] != defaults[name]:
                raise ValueError(f"{name}={given[name]!r} has no effect with kv_downsample_mode="
                                 f"{layer.kv_downsample_mode!r}; check the argument order (positional: "
                                 f"{', '.join(_keywords(cls))}) or use keywords, e.g. [{{topk: 8}}]")


class DAttention(_dat.DAttention, metaclass=TakesInputChannels):
    """:class:`yoloattn.nn.DAttention` (deformable attention) as a YAML layer.

    YAML: ``[-1, 1, DAttention, []]``, keywords ``[{stride: 4}]``, or positional after ``c1``:
    ``[n_heads, n_groups, stride, ksize, offset_range_factor, pe, pe_size, attn_drop, proj_drop, residual]``.
    The input channel count comes from the model.
    """


# names a YAML can use -> classes; never a name Ultralytics already has (checked at registration)
YAML_LAYERS = {"BiLevelRoutingAttention": BiLevelRoutingAttention, "DAttention": DAttention}
