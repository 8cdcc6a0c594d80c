"""Make stock Ultralytics build, save, load and count yoloattn layers: ``import yoloattn`` is enough.

Ultralytics resolves a YAML module name with ``globals()[name]`` inside ``ultralytics.nn.tasks`` and has
no plugin mechanism. :func:`register` therefore

- checks once that the Ultralytics internals it relies on are there (``parse_model`` with its locals
  ``i``, ``f``, ``ch``, which :mod:`.layers` reads to learn a row's input channels) and raises
  :class:`UnsupportedUltralyticsError` naming the installed version otherwise;
- adds the YAML layers to ``ultralytics.nn.tasks`` (never replacing a name Ultralytics has);
- wraps ``parse_model`` so a YAML naming an unknown layer fails with a ``ValueError`` naming the row;
- allows yoloattn's classes in ``torch.load(weights_only=True)`` (safe checkpoint loading);
- teaches thop (Ultralytics' GFLOPs counter) the FLOPs of the compiled routed-attention op.

No Ultralytics file is edited or copied, and nothing is text-patched. It runs when ``ultralytics.nn.tasks``
is first imported after ``import yoloattn`` (or at once, if it was imported before).
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
import threading

import torch

from .compat import UnsupportedUltralyticsError, adapt_muon, installed_version

__all__ = ["UnsupportedUltralyticsError", "check_internals", "register", "safe_classes"]

LOGGER = logging.getLogger("yoloattn")
_lock = threading.RLock()  # the layers package may finish a registration from inside one
_done = False
# the names yoloattn's YAML layers read from parse_model's frame (see layers.py)
PARSE_MODEL_LOCALS = ("i", "f", "ch")


def check_internals(tasks) -> None:
    """Raise :class:`UnsupportedUltralyticsError` unless ``tasks`` has what registration relies on."""
    parse_model = getattr(getattr(tasks, "parse_model", None), "__wrapped__", getattr(tasks, "parse_model", None))
    problems = []
    if not callable(parse_model) or not hasattr(parse_model, "__code__"):
        problems.append("ultralytics.nn.tasks.parse_model is missing")
    else:
        code = parse_model.__code__
        names = {*code.co_varnames, *code.co_cellvars}  # a local a nested scope reads is a cell variable
        missing = [name for name in PARSE_MODEL_LOCALS if name not in names]
        if missing:
            problems.append(f"parse_model has no local variable(s) {missing} (yoloattn reads i, f and ch there to "
                            "give each YAML layer its input channels)")
    if not isinstance(vars(tasks), dict) or "Conv" not in vars(tasks):
        problems.append("ultralytics.nn.tasks does not hold the layer namespace parse_model resolves names in")
    if problems:
        from .. import ULTRALYTICS_SUPPORTED

        raise UnsupportedUltralyticsError(
            f"yoloattn cannot register its layers with Ultralytics {installed_version() or '(unknown version)'}: " + "; ".join(problems)
            + f". yoloattn supports ultralytics {ULTRALYTICS_SUPPORTED}; install a supported release "
              f"(pip install 'ultralytics{ULTRALYTICS_SUPPORTED}').")


def _resolvable(name: str, namespace: dict) -> bool:
    if name.startswith("nn."):
        return hasattr(torch.nn, name[3:])
    if name.startswith("torchvision.ops."):
        return hasattr(importlib.import_module("torchvision").ops, name[16:])
    return name in namespace


def _check_rows(d: dict, namespace: dict) -> None:
    from .layers import YAML_LAYERS

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
    def parse_model(d, ch, *args, **kwargs):
        _check_rows(d, vars(tasks))
        return original(d, ch, *args, **kwargs)

    parse_model._yoloattn = True
    tasks.parse_model = parse_model


def safe_classes() -> list[type]:
    """Every yoloattn module class a checkpoint can hold (allowed by ``torch.load(weights_only=True)``)."""
    import pkgutil

    import torch.nn as nn

    from .. import models as yoloattn_models
    from .. import nn as yoloattn_nn
    from .layers import YAML_LAYERS

    classes = set(YAML_LAYERS.values())
    # every nn.Module class of the layer and network modules: the submodules the layers build (routers,
    # projections, norms) and the BiFormer backbone's
    names = [f"{package.__name__}.{info.name}" for package in (yoloattn_nn, yoloattn_models)
             for info in pkgutil.iter_modules(package.__path__)]
    for name in names:
        module = importlib.import_module(name)
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, nn.Module) and value.__module__ == module.__name__:
                classes.add(value)
    return sorted(classes, key=lambda c: f"{c.__module__}.{c.__qualname__}")


def _register_thop() -> None:
    """thop counts functional ops it has a rule for (SDPA, matmul); give it the compiled routed-attention op."""
    try:
        thop_profile = importlib.import_module("thop.profile")  # the module (the package's `profile` is a function)
    except ImportError:
        return
    hooks = getattr(thop_profile, "functional_hooks", None)
    if not isinstance(hooks, dict):
        return
    from ..nn.functional import routed_attention_cpu

    def rule(args, kwargs, y):
        return routed_attention_cpu.mac_count(args[0], args[1], args[2])

    for op in (torch.ops.yoloattn.routed_attention, torch.ops.yoloattn.routed_attention.default):  # packet or overload
        hooks[op] = rule


def register(tasks=None) -> None:
    """Register the yoloattn layers with Ultralytics (idempotent; ``import yoloattn`` arranges it)."""
    global _done
    if _done:
        return
    layers = sys.modules.get(f"{__package__}.layers")
    if layers is not None and getattr(layers, "_loading", False):
        return  # the layers package is being imported (it imports Ultralytics' blocks); it registers when complete
    if tasks is None:
        from ultralytics.nn import tasks  # importing it may register right here, through yoloattn's import hook
    with _lock:
        if _done:
            return
        check_internals(tasks)
        from .layers import YAML_LAYERS  # imports Ultralytics' blocks: only once Ultralytics is there

        if _done:  # importing the layers package completed the registration
            return

        namespace = vars(tasks)
        for name, cls in YAML_LAYERS.items():
            existing = namespace.get(name)
            if existing is not None and existing is not cls:
                # never shadow Ultralytics' own layer; its YAML rows keep meaning what Ultralytics means
                LOGGER.warning("yoloattn: Ultralytics already defines %r (%r); the yoloattn layer is not registered "
                               "under that name", name, existing)
                continue
            namespace[name] = cls
        _wrap_parse_model(tasks)
        if hasattr(torch.serialization, "add_safe_globals"):
            torch.serialization.add_safe_globals(safe_classes())
        _register_thop()
        adapt_muon()  # early 8.4 MuSGD refuses 3-D parameters (DAT's position table)
        _done = True
