"""Run code when a module is first imported (a post-import hook), without importing it.

``import yoloattn`` uses this to act only when Ultralytics is actually imported: just before the
``ultralytics`` package runs (offline settings, which it reads at import time) and just after
``ultralytics.nn.tasks`` has run (registering the YAML layers). If the module is imported already, the
action runs at once. A finder placed first on ``sys.meta_path`` asks the other finders for the module's
spec and wraps its loader; nothing else about the import changes.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from collections.abc import Callable
from types import ModuleType

__all__ = ["after_import", "before_import", "constant_for_compile"]

_before: dict[str, list[Callable[[], None]]] = {}
_after: dict[str, list[Callable[[ModuleType], None]]] = {}
_lock = threading.RLock()


class _Loader(importlib.abc.Loader):
    def __init__(self, loader, name: str):
        self.loader, self.name = loader, name

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        for action in _before.pop(self.name, []):
            action()
        self.loader.exec_module(module)
        for action in _after.pop(self.name, []):
            action(module)

    def __getattr__(self, item):  # get_code, get_source, is_package, ... of the wrapped loader
        return getattr(self.loader, item)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _before and fullname not in _after:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, fullname)
                return spec
        return None


_finder = _Finder()


def _install() -> None:
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def before_import(name: str, action: Callable[[], None]) -> None:
    """Run ``action()`` just before module ``name`` first executes; at once if it was imported already."""
    with _lock:
        if name in sys.modules:
            action()
            return
        _before.setdefault(name, []).append(action)
        _install()


def after_import(name: str, action: Callable[[ModuleType], None]) -> None:
    """Run ``action(module)`` just after module ``name`` first executes; at once if it was imported already."""
    with _lock:
        module = sys.modules.get(name)
        if module is not None:
            action(module)
            return
        _after.setdefault(name, []).append(action)
        _install()


def constant_for_compile(fn):
    """``torch.compiler.assume_constant_result(fn)``, applied once ``torch._dynamo`` is imported.

    The decorator imports ``torch._dynamo``, which sets ``TORCHINDUCTOR_CACHE_DIR`` in the environment: done at
    our import time, merely importing yoloattn would change the process. Dynamo reads the mark only while
    compiling, by when it is imported, so marking then is the same.
    """

    def mark(_module):
        import torch

        torch.compiler.assume_constant_result(fn)

    after_import("torch._dynamo", mark)
    return fn
