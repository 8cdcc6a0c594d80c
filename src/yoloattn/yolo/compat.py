"""Where Ultralytics releases differ, in one place.

yoloattn supports the Ultralytics releases in :data:`yoloattn.ULTRALYTICS_SUPPORTED`; importing Ultralytics
outside that range after ``import yoloattn`` raises :class:`UnsupportedUltralyticsError` naming both.
"""

from __future__ import annotations

import re

__all__ = ["UnsupportedUltralyticsError", "check_installed_version", "installed_version", "parse_version"]


class UnsupportedUltralyticsError(ImportError):
    """The installed Ultralytics release is outside the supported range, or lacks an internal yoloattn needs."""


def parse_version(text: str) -> tuple[int, ...]:
    """'8.4.190' -> (8, 4, 190); pre-release and local suffixes are ignored."""
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def installed_version() -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python < 3.8
        return None
    try:
        return version("ultralytics")
    except PackageNotFoundError:
        return None


def _bounds(spec: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    low = re.search(r">=\s*([\d.]+)", spec)
    high = re.search(r"<\s*([\d.]+)", spec)
    return parse_version(low.group(1)) if low else (0,), parse_version(high.group(1)) if high else (10**9,)


def check_installed_version(version: str | None = None) -> None:
    """Raise :class:`UnsupportedUltralyticsError` if Ultralytics ``version`` (default: installed) is unsupported."""
    from .. import ULTRALYTICS_SUPPORTED

    version = installed_version() if version is None else version
    if version is None:
        return  # not installed as a distribution (a source checkout): nothing to compare
    low, high = _bounds(ULTRALYTICS_SUPPORTED)
    if not low <= parse_version(version) < high:
        raise UnsupportedUltralyticsError(
            f"yoloattn supports ultralytics{ULTRALYTICS_SUPPORTED}, but ultralytics {version} is installed; install a "
            f"supported release, e.g. pip install 'ultralytics{ULTRALYTICS_SUPPORTED}'")
