"""Keep Ultralytics off the network: no downloads, version checks, DNS probes or package installs.

What ``import yoloattn`` changes for the process, and only once Ultralytics is imported:

- before Ultralytics runs, the environment defaults ``YOLO_OFFLINE=1`` (its ``is_online()`` then answers
  False without a DNS probe, which turns off version checks, hub and analytics) and
  ``YOLO_AUTOINSTALL=False`` (a missing package is reported, never pip-installed); a value the user set
  is kept, so ``YOLO_OFFLINE=0`` lets Ultralytics go online. Child processes (DDP workers) inherit them.
- if Ultralytics was imported before yoloattn, its ``ONLINE`` flag is set to False (its import-time DNS
  probe has happened by then).
- Ultralytics' dataset check and plotting ask the network for ``Arial.ttf``/``Arial.Unicode.ttf`` when
  they are not in its config directory; where they are missing, :func:`ensure_fonts` puts matplotlib's
  bundled DejaVu Sans there under those names (a file already there is never touched).

``import yoloattn.nn`` (the layers alone) imports no Ultralytics and changes none of this.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

__all__ = ["FONT_NAMES", "ensure_fonts", "offline", "set_environment"]

LOGGER = logging.getLogger("yoloattn")
FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")


def offline() -> bool:
    """Whether Ultralytics runs offline (``YOLO_OFFLINE``, yoloattn's default 1)."""
    return os.environ.get("YOLO_OFFLINE", "1").strip().lower() in ("1", "true", "yes")


def set_environment() -> None:
    """Offline defaults for Ultralytics, set before it is imported (user-set values win)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    ul_utils = sys.modules.get("ultralytics.utils")
    if ul_utils is not None and offline() and getattr(ul_utils, "ONLINE", False):
        ul_utils.ONLINE = False  # Ultralytics was imported first and probed the network already


def ensure_fonts(config_dir=None) -> list[Path]:
    """Place matplotlib's DejaVu Sans in Ultralytics' config dir under the font names it would download.

    Only missing files are written. Returns the files written.
    """
    if not offline():
        return []
    if config_dir is None:
        from ultralytics.utils import USER_CONFIG_DIR as config_dir
    config_dir = Path(config_dir)
    missing = [name for name in FONT_NAMES if not (config_dir / name).exists()]
    if not missing:
        return []
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    if not source.exists():
        LOGGER.warning("yoloattn: matplotlib's DejaVuSans.ttf not found; Ultralytics may try to download %s", missing)
        return []
    written = []
    for name in missing:
        try:
            config_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, config_dir / name)
            written.append(config_dir / name)
        except OSError as e:  # read-only config dir: Ultralytics will fall back to its own handling
            LOGGER.warning("yoloattn: could not place %s in %s: %s", name, config_dir, e)
    return written
