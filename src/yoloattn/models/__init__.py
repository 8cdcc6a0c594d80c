"""Whole networks built from yoloattn's layers (pure PyTorch, no Ultralytics import).

- :class:`BiFormer` with the official factories :func:`biformer_tiny`, :func:`biformer_small`,
  :func:`biformer_base` (official ``state_dict`` keys: official checkpoints load with ``strict=True``) and
  the detection backbone :func:`biformer_dense`;
- :func:`register_timm` makes them available to ``timm.create_model`` when timm is installed.
"""

from .biformer import (
    BIFORMER_ARCHS,
    BiFormer,
    biformer_base,
    biformer_dense,
    biformer_small,
    biformer_tiny,
    checkpoint_state_dict,
    load_checkpoint,
)
from .timm_registry import register_timm

__all__ = [
    "BIFORMER_ARCHS",
    "BiFormer",
    "biformer_base",
    "biformer_dense",
    "biformer_small",
    "biformer_tiny",
    "checkpoint_state_dict",
    "load_checkpoint",
    "register_timm",
]
