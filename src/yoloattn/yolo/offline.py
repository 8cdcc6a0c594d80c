"""Keep Ultralytics off the network: no downloads, version checks or package installs at run time.

:func:`configure` runs before Ultralytics is first imported (``import yoloattn`` does it) and sets

- ``YOLO_OFFLINE=1``: Ultralytics' ``is_online()`` answers False without a DNS probe, which
  turns off its version checks, hub and analytics;
- ``YOLO_AUTOINSTALL=False``: a missing package is reported, never pip-installed;

unless the user set them. Ultralytics' dataset check and its plotting still ask the network for
``Arial.ttf`` when that font is not in its config directory; :func:`ensure_fonts` puts
matplotlib's bundled DejaVu Sans there under those names, so nothing is fetched.
Set ``YOLO_OFFLINE=0`` before importing yoloattn to let Ultralytics go online.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

__all__ = ["configure", "ensure_fonts"]

LOGGER = logging.getLogger("yoloattn")
FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")


def configure() -> None:
    """Set the offline environment defaults and provide Ultralytics' fonts locally."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    if os.environ["YOLO_OFFLINE"].lower() in ("1", "true") and "ultralytics.utils" in sys.modules:
        # Ultralytics was imported first and probed the network already; correct its flag.
        import ultralytics.utils as ul_utils

        ul_utils.ONLINE = False
    ensure_fonts()


def ensure_fonts() -> None:
    """Copy matplotlib's DejaVu Sans to Ultralytics' config dir as the fonts it would download."""
    from ultralytics.utils import USER_CONFIG_DIR

    missing = [name for name in FONT_NAMES if not (Path(USER_CONFIG_DIR) / name).exists()]
    if not missing:
        return
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    if not source.exists():
        LOGGER.warning("yoloattn: matplotlib's DejaVuSans.ttf not found; Ultralytics may try to download %s", missing)
        return
    for name in missing:
        try:
            Path(USER_CONFIG_DIR).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, Path(USER_CONFIG_DIR) / name)
        except OSError as e:  # read-only config dir: Ultralytics will fall back to its own handling
            LOGGER.warning("yoloattn: could not place %s in %s: %s", name, USER_CONFIG_DIR, e)
