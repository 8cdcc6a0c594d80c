"""The metaclass that gives a YAML row's layer its input channel count, and the row-argument rules."""

from __future__ import annotations

import inspect
import sys

__all__ = ["ResidualMixin", "TakesInputChannels", "split_arguments"]


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


class ResidualMixin:
    """``x + layer(x)`` when ``residual`` (the YOLO layer's default for attentions whose output replaces their
    input: as a drop-in layer they would otherwise start by discarding the feature map; see DAttention)."""

    def forward(self, x):
        y = super().forward(x)
        return x + y if self.residual else y
