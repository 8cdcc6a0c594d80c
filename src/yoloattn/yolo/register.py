"""Make stock Ultralytics build, save and load yoloattn layers: ``import yoloattn`` is enough.

Ultralytics resolves a YAML module name with ``globals()[name]`` inside ``ultralytics.nn.tasks``
and has no plugin mechanism. :func:`register` therefore

- adds the YAML layers to that namespace (never replacing a name Ultralytics has),
- wraps ``parse_model`` so that a YAML naming an unknown layer fails with a ``ValueError``
  that names the row and the layer instead of a bare ``KeyError``,
- allows the layers in ``torch.load(weights_only=True)`` (``ULTRALYTICS_SAFE_LOAD=1``).

No Ultralytics file is edited or copied, and nothing is text-patched.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch

from .layers import YAML_LAYERS

__all__ = ["register", "registered_layers"]

_done = False


def registered_layers() -> dict[str, type]:
    """YAML name -> class of every layer yoloattn adds to Ultralytics."""
    return dict(YAML_LAYERS)


def _resolvable(name: str, namespace: dict) -> bool:
    if name.startswith("nn."):
        return hasattr(torch.nn, name[3:])
    if name.startswith("torchvision.ops."):
        return hasattr(importlib.import_module("torchvision").ops, name[16:])
    return name in namespace


def _check_rows(d: dict, namespace: dict) -> None:
    rows = list(d.get("backbone") or []) + list(d.get("head") or [])
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) != 4:
            raise ValueError(f"YAML row {i} must be [from, repeats, module, args], got {row!r}")
        name = row[2]
        if not isinstance(name, str) or not _resolvable(name, namespace):
            extra = ", ".join(sorted(YAML_LAYERS))
            raise ValueError(f"YAML row {i} names an unknown layer {name!r}; it is neither an Ultralytics layer nor a "
                             f"yoloattn layer ({extra}). Check the spelling, or import the package that defines it.")


def _wrap_parse_model(tasks) -> None:
    original = tasks.parse_model
    if getattr(original, "_yoloattn", False):
        return

    @functools.wraps(original)
    def parse_model(d, ch, verbose=True):
        _check_rows(d, vars(tasks))
        return original(d, ch, verbose)

    parse_model._yoloattn = True
    parse_model.__wrapped__ = original
    tasks.parse_model = parse_model


def register() -> None:
    """Register the yoloattn layers with Ultralytics (idempotent)."""
    global _done
    if _done:
        return
    from . import offline

    offline.configure()
    from ultralytics.nn import tasks

    namespace = vars(tasks)
    for name, cls in YAML_LAYERS.items():
        existing = namespace.get(name)
        if existing is not None and existing is not cls:
            # never shadow Ultralytics' own layer; its YAML rows keep meaning what Ultralytics means
            logging.getLogger("yoloattn").warning(
                "yoloattn: Ultralytics already defines %r (%r); the yoloattn layer is not registered under that "
                "name", name, existing)
            continue
        namespace[name] = cls
    _wrap_parse_model(tasks)
    if hasattr(torch.serialization, "add_safe_globals"):
        from ..nn import biformer, bra, dat

        torch.serialization.add_safe_globals([*YAML_LAYERS.values(), bra.BiLevelRoutingAttention, bra.TopkRouting,
                                              bra.QKVLinear, biformer.BiFormerBlock, biformer.Attention,
                                              biformer.AttentionLePE, biformer.DWConv, biformer.DropPath,
                                              biformer._Permute, dat.DAttentionBaseline, dat.DAttention,
                                              dat.LayerNormProxy])
    _done = True
