"""Where Ultralytics releases differ, in one place.

yoloattn supports the Ultralytics releases in :data:`yoloattn.ULTRALYTICS_SUPPORTED`; importing Ultralytics
outside that range after ``import yoloattn`` raises :class:`UnsupportedUltralyticsError` naming both.
"""

from __future__ import annotations

import re

__all__ = ["UnsupportedUltralyticsError", "adapt_muon", "check_installed_version", "installed_version",
           "parse_version"]


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


def adapt_muon() -> bool:
    """Let Ultralytics' MuSGD optimizer take parameters of 3 or 5+ dimensions, as its later releases do.

    Early 8.4 releases orthogonalize only 2-D and 4-D parameters and assert on any other (DAT's 3-D position
    table under ``optimizer=auto``, which picks MuSGD for short runs); later releases flatten every parameter
    to (rows, -1) and scale by its last two sizes. Decided by behaviour, not by version: the release's own
    ``muon_update`` is tried on a 3-D tensor, and wrapped only if it refuses. Returns True if it was wrapped.
    """
    import torch

    try:
        from ultralytics.optim import muon
    except ImportError:
        return False  # a release without MuSGD
    original = getattr(muon, "muon_update", None)
    if original is None or getattr(original, "_yoloattn_adapted", False):
        return False
    try:
        original(torch.ones(2, 2, 2), torch.zeros(2, 2, 2))
        return False  # handles higher ranks itself
    except AssertionError:
        pass

    def muon_update(grad, momentum, beta: float = 0.95, nesterov: bool = True):
        if not isinstance(grad, torch.Tensor) or grad.ndim in (2, 4):
            return original(grad, momentum, beta=beta, nesterov=nesterov)
        rows = len(momentum)
        flat_momentum = momentum.view(rows, -1) if momentum.is_contiguous() else momentum.reshape(rows, -1)
        flat = grad.reshape(len(grad), -1)
        update = original(flat, flat_momentum, beta=beta, nesterov=nesterov)
        if flat_momentum.data_ptr() != momentum.data_ptr():  # a copy: write the updated momentum back
            momentum.copy_(flat_momentum.view_as(momentum))
        # the release scaled by the flattened shape; later releases scale by the parameter's own last two sizes
        return update * (max(1, grad.size(-2) / grad.size(-1)) / max(1, flat.size(0) / flat.size(1))) ** 0.5

    muon_update._yoloattn_adapted = True
    muon.muon_update = muon_update
    return True
