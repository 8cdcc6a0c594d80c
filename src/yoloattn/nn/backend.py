"""One switch between the fast kernels and the plain reference math.

The fast path is the default. ``"auto"`` uses it wherever it can and falls back to the
reference with a logged reason where it cannot (for example when a caller asks for the
attention matrix, which the fast kernel never builds). ``"fast"`` and ``"reference"``
force a path; ``"fast"`` still falls back where the fast kernel cannot answer, and logs it.

Set it with :func:`set_backend`, for a block of code with :func:`use_backend`, or for a
whole process with the environment variable ``YOLOATTN_BACKEND``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

__all__ = ["BACKENDS", "get_backend", "set_backend", "use_backend", "resolve_backend", "log_decline"]

LOGGER = logging.getLogger("yoloattn")

BACKENDS = ("auto", "fast", "reference")


def _checked(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


_backend = _checked(os.environ.get("YOLOATTN_BACKEND", "auto"))
_reported: set[str] = set()


def get_backend() -> str:
    """Return the process-wide backend name: ``'auto'``, ``'fast'`` or ``'reference'``."""
    return _backend


def set_backend(name: str) -> None:
    """Set the process-wide backend.

    Args:
        name: ``'auto'`` (fast where possible), ``'fast'`` or ``'reference'``.
    """
    global _backend
    _backend = _checked(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use ``name`` as the backend inside a ``with`` block, then restore the previous one."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def resolve_backend(op: str, decline_reason: str | None = None, requested: str | None = None) -> str:
    """Decide which implementation of ``op`` runs now.

    Args:
        op: name of the operation, used in the log message.
        decline_reason: why the fast path cannot run this call, or None if it can.
        requested: a per-call override of the process-wide backend.

    Returns:
        ``'fast'`` or ``'reference'``. A declined fast path is logged once per reason.
    """
    name = _checked(requested) if requested is not None else _backend
    if name == "reference":
        return "reference"
    if decline_reason is None:
        return "fast"
    log_decline(op, decline_reason, "the reference path")
    return "reference"


def log_decline(op: str, reason: str, used: str) -> None:
    """Log, once per process and reason, that ``op`` runs ``used`` instead of a faster kernel because ``reason``."""
    key = f"{op}: {used}: {reason}"
    if key not in _reported:
        _reported.add(key)
        LOGGER.info("yoloattn: %s uses %s because %s", op, used, reason)
