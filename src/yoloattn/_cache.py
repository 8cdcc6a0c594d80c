"""Where yoloattn keeps generated files (datasets, resolved YAMLs, compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$YOLOATTN_CACHE`` or ``~/.cache/yoloattn``."""
    return Path(os.environ.get("YOLOATTN_CACHE") or Path.home() / ".cache" / "yoloattn")
