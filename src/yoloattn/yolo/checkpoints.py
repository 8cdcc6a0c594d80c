"""Checkpoints that cannot run code, and never a download.

A ``.pt`` checkpoint is a pickle, and a pickle can run any code while it loads; Ultralytics loads with
``weights_only=False`` by default. Everything yoloattn loads (``yoloattn.YOLO(path)``, ``YOLO.load``,
``transfer_weights``, ``pretrained=``, ``resume=``, the ``yoloattn`` command) is first loaded here with
``torch.load(weights_only=True)``, whose unpickler only reconstructs allowed types: tensors and plain
containers (PyTorch's own list), and the globals the file names, each allowed only if it is

- an ``nn.Module`` class of PyTorch, Ultralytics or yoloattn (the model and its layers);
- a class of Ultralytics' loss/assigner modules (some checkpoints hold a loss object);
- one of the plain data types Ultralytics' checkpoints hold (its argument namespace, NumPy scalars and
  dtypes, ``pathlib`` paths, torchvision's classification transforms, ``getattr`` restricted to a layer's
  ``forward``), under their current and legacy module paths.

Anything else refuses the file with :class:`UnsafeCheckpointError`, naming the globals. A file that loads
this way references only allowed types, so Ultralytics' own loading of it afterwards reconstructs those
same objects and nothing else. For a file you trust, ``trusted=True`` (or ``YOLOATTN_TRUST_CHECKPOINTS=1``)
skips the check. A path that is not on disk raises :class:`CheckpointNotFoundError`: nothing is downloaded.
"""

from __future__ import annotations

import enum
import importlib
import os
import pickle
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["CheckpointError", "CheckpointNotFoundError", "TRUST_ENV", "UnsafeCheckpointError", "is_trusted",
           "load_checkpoint", "require_file", "verify_checkpoint"]

TRUST_ENV = "YOLOATTN_TRUST_CHECKPOINTS"
# the module prefixes a checkpoint's globals may come from at all (nothing else is even imported)
_MODULE_PREFIXES = ("torch.", "ultralytics.", "yoloattn.", "numpy.", "pathlib", "torchvision.transforms", "builtins")
_LEGACY_MODULES = {"ultralytics.yolo.utils": "ultralytics.utils", "ultralytics.yolo.v8": "ultralytics.models.yolo",
                   "ultralytics.yolo.data": "ultralytics.data"}
_LEGACY_NAMES = {"ultralytics.nn.modules.block.Silence": "torch.nn.Identity",  # YOLOv9e
                 "ultralytics.nn.tasks.YOLOv10DetectionModel": "ultralytics.nn.tasks.DetectionModel",
                 "ultralytics.utils.loss.v10DetectLoss": "ultralytics.utils.loss.E2EDetectLoss"}
_CLASS_MODULES = ("ultralytics.utils.loss", "ultralytics.utils.tal", "ultralytics.nn.distill_model")


class CheckpointError(ValueError):
    """A checkpoint cannot be used: damaged, not a checkpoint, or refused by the safe load."""


class UnsafeCheckpointError(CheckpointError):
    """The safe load refused a checkpoint because it names types that could run code."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint path that is not on disk (yoloattn never downloads one)."""


def is_trusted(trusted: bool | None = None) -> bool:
    """``trusted``, or when None the ``YOLOATTN_TRUST_CHECKPOINTS`` environment variable."""
    if trusted is not None:
        return bool(trusted)
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def require_file(path, what: str = "checkpoint") -> Path:
    """``path`` as a Path if it is a file on disk, else :class:`CheckpointNotFoundError` saying what to do."""
    text = str(path)
    if "://" in text:
        raise CheckpointNotFoundError(
            f"{what} {text!r} is a URL; yoloattn never downloads (it runs offline): download the file yourself and "
            "pass its path")
    if not Path(text).is_file():
        hint = ("download it yourself (e.g. the Ultralytics release assets such as yolov8n.pt) and pass its path, "
                "or start from a model YAML (e.g. model=yolov8n-bra.yaml) to train from scratch")
        raise CheckpointNotFoundError(f"{what} {text!r} not found (looked in {Path(text).resolve().parent}); yoloattn "
                                      f"never downloads weights: {hint}")
    return Path(text)


def _restricted_getattr(obj, name: str):
    """``getattr`` as Ultralytics' checkpoints use it (a layer's bound ``forward``), nothing else."""
    if isinstance(obj, type) and not name.startswith("__") and issubclass(obj, (nn.Module, enum.Enum)):
        return getattr(obj, name)
    if isinstance(obj, nn.Module) and name in ("forward", "forward_fuse"):
        return getattr(type(obj), name).__get__(obj)
    raise pickle.UnpicklingError(f"getattr({type(obj).__name__}, {name!r}) is not allowed by the safe load")


def _resolve(name: str):
    """The object a checkpoint global stands for, if the safe load allows it, else None."""
    if name == "builtins.getattr":
        return _restricted_getattr
    if name in ("pathlib.PosixPath", "pathlib.WindowsPath", "pathlib._local.PosixPath", "pathlib._local.WindowsPath"):
        return type(Path())  # either OS's pickled path becomes this OS's
    if name in ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"):
        import numpy as np

        return np.float64(0).__reduce__()[0]
    if name == "numpy.dtype":
        import numpy as np

        return np.dtype
    if not name.startswith(_MODULE_PREFIXES):
        return None
    name = _LEGACY_NAMES.get(name, name)
    module_name, _, attr = name.rpartition(".")
    module_name = _LEGACY_MODULES.get(module_name, module_name)
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return None
    if not isinstance(obj, type):
        return None
    if issubclass(obj, nn.Module) and module_name.startswith(("torch.nn.", "ultralytics.", "yoloattn.")):
        return obj
    if module_name in _CLASS_MODULES and obj.__module__ == module_name:
        return obj
    if module_name.startswith("numpy.") and issubclass(obj, __import__("numpy").dtype):
        return obj  # numpy.dtypes.Float64DType and the like
    if module_name.startswith("torchvision.transforms") and (issubclass(obj, (nn.Module, enum.Enum))
                                                              or type(obj).__name__ == "type"):
        return obj
    if obj.__name__ == "IterableSimpleNamespace" and module_name == "ultralytics.utils":
        return obj
    return None


def _safe_load(path: Path):
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (ValueError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint file (a torch.save zip archive): {e}") from e
    entries, refused = [], []
    for name in names:
        obj = _resolve(name)
        (refused if obj is None else entries).append(name if obj is None else (obj, name))
    if refused:
        raise UnsafeCheckpointError(
            f"refused to load {path}: it references {sorted(refused)}, which a safe load (torch.load weights_only=True) "
            f"does not allow because they could run code. Load it only if you trust its origin: pass trusted=True "
            f"(or trusted=True on the yoloattn command line), or set {TRUST_ENV}=1.")
    if entries:
        torch.serialization.add_safe_globals(entries)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refused to load {path}: {e}. Load it only if you trust its origin: pass trusted=True, or set "
            f"{TRUST_ENV}=1.") from e
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path} is not a loadable checkpoint (empty, truncated or damaged): {e}") from e


def load_checkpoint(path, trusted: bool | None = None):
    """Load a checkpoint file: safely (see the module docstring) unless ``trusted``.

    Args:
        path: a ``.pt`` file on disk.
        trusted: skip the safe load for a file you trust; None reads ``YOLOATTN_TRUST_CHECKPOINTS``.

    Returns:
        what the file holds (an Ultralytics checkpoint dict, usually).
    """
    path = require_file(path)
    if is_trusted(trusted):
        return torch.load(path, map_location="cpu", weights_only=False)
    return _safe_load(path)


def verify_checkpoint(path, trusted: bool | None = None) -> Path:
    """Check that ``path`` exists and loads safely (unless ``trusted``); returns it as a Path."""
    load_checkpoint(path, trusted)
    return Path(str(path))

