"""Named implementations of yoloattn's ops and the one switch that chooses between them.

Every op (routed attention, deformable attention, multi-head attention, ...) is an :class:`Op` with
named backends, each an implementation with a ``can_run(...)`` that says why it cannot run a call, or
None. Every op has ``'reference'``, the plain math of the official code; the others are faster ways to
compute the same thing (``'sdpa'``, ``'cpu'``, ...). ``ops()`` lists them.

The switch:

- ``'auto'`` (default): the first backend, in the op's order, that can run the call; the reference last.
  An expected decline (a CUDA tensor for a CPU kernel, an export trace, a mode switched off) is logged
  at DEBUG on the ``yoloattn`` logger; a surprising one (a kernel that failed to build) is also shown
  once as a :class:`YoloattnWarning`.
- ``'reference'``: every op runs its reference.
- any backend name: the ops that have it run it, and raise :class:`BackendUnavailableError` with the
  reason when it cannot run the call; the other ops stay on ``'auto'``.
- per op: ``set_backend(routed_attention='sdpa')``.

Set it for the process with :func:`set_backend`, for a block with :func:`use_backend`, per layer with the
layer's ``backend=`` argument, or before start-up with ``YOLOATTN_BACKEND``, e.g. ``reference``,
``sdpa`` or ``routed_attention:sdpa,deformable_attention:reference``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

__all__ = [
    "AUTO",
    "REFERENCE",
    "BackendUnavailableError",
    "Decline",
    "Op",
    "YoloattnWarning",
    "get_backend",
    "ops",
    "set_backend",
    "use_backend",
]

LOGGER = logging.getLogger("yoloattn")
AUTO, REFERENCE = "auto", "reference"


class YoloattnWarning(UserWarning):
    """A fast path is unavailable for a reason the user should know about (shown once per reason)."""


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run the call; the message says why."""


@dataclass(frozen=True)
class Decline:
    """Why a backend cannot run a call. ``expected`` declines are logged at DEBUG; others warn once."""

    reason: str
    expected: bool = True

    def __str__(self) -> str:
        return self.reason


CanRun = Callable[..., "Decline | str | None"]


def _as_decline(reason) -> Decline | None:
    return Decline(reason) if isinstance(reason, str) else reason


@dataclass(frozen=True)
class Backend:
    name: str
    run: Callable
    can_run: CanRun | None = None
    auto_skip: CanRun | None = None
    skip_first: bool = False  # auto_skip is a cheap rule that needs nothing can_run prepares (a build, a load)

    def decline(self, *args, **kwargs) -> Decline | None:
        """Why this backend cannot run the call, or None."""
        return None if self.can_run is None else _as_decline(self.can_run(*args, **kwargs))

    def auto_decline(self, *args, **kwargs) -> Decline | None:
        """Why ``'auto'`` does not pick this backend for the call (it cannot run it, or another is faster)."""
        if self.skip_first and self.auto_skip is not None:
            decline = _as_decline(self.auto_skip(*args, **kwargs))
            return decline if decline is not None else self.decline(*args, **kwargs)
        decline = self.decline(*args, **kwargs)
        if decline is None and self.auto_skip is not None:
            decline = _as_decline(self.auto_skip(*args, **kwargs))
        return decline


_OPS: dict[str, Op] = {}
_global = AUTO
_per_op: dict[str, str] = {}
_reported: set[tuple[str, str, str]] = set()


def _capturing_graph() -> bool:
    """Inside torch.compile/torch.export tracing: choose without side effects (no logging, no warnings)."""
    return torch.compiler.is_compiling()


class Op:
    """An op with named backends; the first registered is tried first by ``'auto'``.

    Args:
        name: the op's name, as used in ``set_backend(name=...)`` and ``YOLOATTN_BACKEND``.
    """

    def __init__(self, name: str):
        if name in _OPS:
            raise ValueError(f"an op named {name!r} is registered already")
        self.name = name
        self.backends: dict[str, Backend] = {}
        _OPS[name] = self

    def register(self, name: str, can_run: CanRun | None = None, auto_skip: CanRun | None = None,
                 skip_first: bool = False) -> Callable[[Callable], Callable]:
        """Decorator: register ``fn`` as backend ``name``.

        Args:
            name: the backend's name.
            can_run: ``can_run(*args, **kwargs)`` says why the backend cannot run a call, or None.
            auto_skip: called by ``'auto'`` only, when ``can_run`` passed: why ``'auto'`` should still pass over
                it (e.g. another backend measured faster), or None. Asking for the backend by name ignores it.
            skip_first: ``auto_skip`` is a cheap rule on the arguments alone: ``'auto'`` asks it before
                ``can_run``, so a call it passes over never costs what ``can_run`` does (building a kernel).
        """

        def add(fn: Callable) -> Callable:
            if name in (AUTO,) or name in self.backends:
                raise ValueError(f"{self.name}: backend name {name!r} is taken")
            self.backends[name] = Backend(name, fn, can_run, auto_skip, skip_first)
            return fn

        return add

    def names(self) -> tuple[str, ...]:
        """The names a caller may ask for: ``'auto'`` and every backend."""
        return (AUTO, *self.backends)

    def check_name(self, name: str | None, what: str | None = None) -> str | None:
        """``name`` if it is None or one of :meth:`names`, else ``ValueError`` naming the allowed ones."""
        if name is not None and (not isinstance(name, str) or name not in self.names()):
            raise ValueError(f"{what or f'backend for {self.name}'} must be None or one of {self.names()}, "
                             f"got {name!r}")
        return name

    def requested(self, override: str | None = None) -> str:
        """The backend name in force for this op: the per-call ``override``, else per op, else global."""
        if override is not None:
            return override
        _load_environment()
        name = _per_op.get(self.name, _global)
        return name if name in self.backends or name == AUTO else AUTO

    def select(self, override: str | None, *args, **kwargs) -> Backend:
        """The backend that runs this call (arguments as the backends take them)."""
        name = self.requested(override)
        if name != AUTO:
            backend = self.backends[name]
            decline = backend.decline(*args, **kwargs)
            if decline is not None:
                raise BackendUnavailableError(f"{self.name}: the {name!r} backend cannot run this call: {decline}")
            return backend
        for backend in self.backends.values():
            if backend.name == REFERENCE:
                continue
            decline = backend.auto_decline(*args, **kwargs)
            if decline is None:
                return backend
            self._note(backend.name, decline)
        return self.backends[REFERENCE]

    def __call__(self, *args, backend: str | None = None, **kwargs):
        """Run the call on :meth:`select`'s backend."""
        return self.select(backend, *args, **kwargs).run(*args, **kwargs)

    def _note(self, backend: str, decline: Decline) -> None:
        key = (self.name, backend, decline.reason)
        if key in _reported or _capturing_graph():
            return
        _reported.add(key)
        message = f"yoloattn: {self.name} does not use its {backend!r} backend: {decline.reason}"
        if decline.expected:
            LOGGER.debug(message)
        else:
            LOGGER.info(message)
            warnings.warn(message, YoloattnWarning, stacklevel=4)

    def __repr__(self) -> str:
        return f"Op({self.name!r}, backends={list(self.backends)})"


def ops() -> dict[str, tuple[str, ...]]:
    """Every registered op and its backend names, in ``'auto'``'s order."""
    return {name: tuple(op.backends) for name, op in _OPS.items()}


def _all_names() -> set[str]:
    return {AUTO} | {b for op in _OPS.values() for b in op.backends}


def _check_global(name: str, source: str) -> str:
    if not isinstance(name, str) or name not in _all_names():
        raise ValueError(f"{source} must be one of {sorted(_all_names())}, got {name!r}")
    return name


def _check_per_op(op: str, name: str, source: str) -> None:
    if op not in _OPS:
        raise ValueError(f"{source}: no op named {op!r}; the ops are {sorted(_OPS)}")
    _OPS[op].check_name(name, what=source)


def get_backend(op: str | None = None) -> str:
    """The process-wide backend name, or the one in force for ``op``."""
    _load_environment()
    if op is None:
        return _global
    if op not in _OPS:
        raise ValueError(f"no op named {op!r}; the ops are {sorted(_OPS)}")
    return _OPS[op].requested()


def set_backend(name: str | None = None, **per_op: str) -> None:
    """Choose backends for the whole process.

    Args:
        name: ``'auto'``, ``'reference'`` or a backend name (the ops that have it use it).
        **per_op: op name -> backend name, e.g. ``routed_attention='sdpa'``; ``'auto'`` clears it.
    """
    global _global
    _load_environment()
    if name is not None:
        _global = _check_global(name, "backend")
    for op, value in per_op.items():
        _check_per_op(op, value, f"backend for {op}")
    for op, value in per_op.items():
        if value == AUTO:
            _per_op.pop(op, None)
        else:
            _per_op[op] = value


@contextlib.contextmanager
def use_backend(name: str | None = None, **per_op: str) -> Iterator[None]:
    """:func:`set_backend` inside a ``with`` block, then restore the previous choice."""
    global _global
    _load_environment()
    saved = _global, dict(_per_op)
    set_backend(name, **per_op)
    try:
        yield
    finally:
        _global = saved[0]
        _per_op.clear()
        _per_op.update(saved[1])


_environment_loaded = False


def _load_environment() -> None:
    """Apply ``YOLOATTN_BACKEND`` once every op is registered (its names are checked against them)."""
    global _environment_loaded, _global
    if _environment_loaded:
        return
    _environment_loaded = True
    text = os.environ.get("YOLOATTN_BACKEND", "").strip()
    for entry in filter(None, (e.strip() for e in text.split(","))):
        op, sep, name = entry.partition(":")
        if sep:
            _check_per_op(op.strip(), name.strip(), f"YOLOATTN_BACKEND entry {entry!r}: the backend")
            _per_op[op.strip()] = name.strip()
        else:
            _global = _check_global(entry, "YOLOATTN_BACKEND")
