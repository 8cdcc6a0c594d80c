"""Where yoloattn keeps generated files (datasets, resolved YAMLs, compiled kernels), and how a generated
directory is published so that a killed run, a deleted or truncated file or a concurrent first use never
leaves a broken one in use.

:func:`published_dir` builds a directory into a temporary sibling, writes a manifest of every file and its
size last, and renames the whole directory into place (atomic on one filesystem), under an exclusive lock.
Every later use checks the manifest against the files on disk (existence and size: cheap) and rebuilds
when anything is missing or damaged. Temporary directories left by killed runs are removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["cache_dir", "check_manifest", "published_dir"]

LOGGER = logging.getLogger("yoloattn")
MANIFEST = "manifest.json"


def cache_dir() -> Path:
    """``$YOLOATTN_CACHE`` or ``~/.cache/yoloattn``."""
    return Path(os.environ.get("YOLOATTN_CACHE") or Path.home() / ".cache" / "yoloattn")


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        if sys.platform != "win32":
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def check_manifest(directory: Path) -> str | None:
    """None if every file the manifest of ``directory`` lists is there with its size, else what is wrong."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "it has no manifest" if directory.exists() else "it does not exist"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its manifest is unreadable ({e})"
    for name, size in files.items():
        try:
            actual = (directory / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, expected {size}"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(parent: Path, prefix: str) -> None:
    """Temporary build directories of processes that died (their name holds the owner's pid)."""
    for path in parent.glob(f".{prefix}*.tmp"):
        try:
            pid = int(path.name.rsplit("-", 2)[-2])
        except (ValueError, IndexError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def _fix_permissions(directory: Path) -> None:
    """0755 directories and 0644 files (a temporary directory starts as 0700)."""
    for root, dirs, files in os.walk(directory):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)


def published_dir(target: Path, build: Callable[[Path], None], what: str) -> Path:
    """``target``, built by ``build(tmp_dir)`` unless a verified copy is there already.

    Args:
        target: the directory to publish.
        build: writes the directory's content into the given (empty) temporary directory.
        what: a description for log messages.
    """
    target = Path(target)
    if check_manifest(target) is None:
        return target
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _lock(parent / f".{target.name}.lock"):
        problem = check_manifest(target)
        if problem is None:  # another process built it while we waited
            return target
        _remove_stale_temporaries(parent, "")  # of every configuration: their names hold their dead owner's pid
        if target.exists():
            LOGGER.warning("yoloattn: %s in %s is damaged (%s); generating it again", what, target, problem)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-{os.getpid()}-", suffix=".tmp", dir=parent))
        try:
            build(tmp)
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
            _fix_permissions(tmp)
            if target.exists():
                stale = target.with_name(f".{target.name}-{os.getpid()}-stale.tmp")
                os.rename(target, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
