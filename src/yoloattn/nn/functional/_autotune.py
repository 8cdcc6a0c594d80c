"""Measured choice between implementations of an op, once per machine, build, shape and direction.

Like cuDNN's benchmark mode or Triton's autotuner: the first call with a new shape times each candidate
on synthetic inputs of that shape (interleaved, best of a few runs) and keeps the fastest; a measurement
that goes against the preferred candidate is taken a second time and each candidate keeps its best time of
both, so that a moment of load on the machine does not decide against the kernel for good. Decisions
are cached in memory and in a JSON file next to the compiled kernel, named by the kernel's build, so a
rebuilt kernel is measured again; a damaged or unwritable file is ignored (the decision is then kept
for this process only).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ..._cache import cache_dir

__all__ = ["Autotuner"]

LOGGER = logging.getLogger("yoloattn")


def _time(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best wall time in ms of each function over ``rounds`` interleaved runs, after one warm-up each."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return best


class Autotuner:
    """Per-key fastest candidate, measured once and cached.

    Args:
        name: the op's name, used in the cache file's name.
        preferred: the candidate that wins ties (within ``margin``): the one that needs less memory.
        margin: relative slack granted to ``preferred``, so that timing noise does not flip decisions.
    """

    def __init__(self, name: str, preferred: str, margin: float = 0.05, rounds: int = 3):
        self.name, self.preferred, self.margin, self.rounds = name, preferred, margin, rounds
        self.decisions: dict[tuple[str, str], dict] = {}
        self._loaded: set[str] = set()

    def _file(self, build_id: str) -> Path:
        return cache_dir() / "kernels" / f"{self.name}-{build_id}.autotune.json"

    def _read(self, build_id: str) -> dict:
        try:
            data = json.loads(self._file(build_id).read_text())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            LOGGER.debug("yoloattn: ignoring the unreadable autotune cache %s (%s)", self._file(build_id), e)
            return {}

    def _write(self, build_id: str, key: str, record: dict) -> None:
        path = self._file(build_id)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            data = {**self._read(build_id), key: record}
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError as e:
            LOGGER.debug("yoloattn: autotune decision not saved to %s (%s)", path, e)

    def _winner(self, ms: dict[str, float]) -> str:
        fastest = min(ms, key=ms.get)
        return self.preferred if ms.get(self.preferred, float("inf")) <= ms[fastest] * (1 + self.margin) else fastest

    def choose(self, build_id: str, key: str, candidates: Callable[[], dict[str, Callable[[], object]]]) -> dict:
        """The decision for ``key``: ``{'winner': name, 'ms': {name: best ms}}``, measured on first use.

        Args:
            build_id: identifies the compiled kernel (decisions of another build are not reused).
            key: the shape and direction.
            candidates: builds the functions to time (called only when a measurement is needed).
        """
        if (build_id, key) in self.decisions:
            return self.decisions[build_id, key]
        if build_id not in self._loaded:
            self._loaded.add(build_id)
            for k, record in self._read(build_id).items():
                if isinstance(record, dict) and isinstance(record.get("winner"), str):
                    self.decisions[build_id, k] = record
            if (build_id, key) in self.decisions:
                return self.decisions[build_id, key]
        fns = candidates()
        ms = _time(fns, self.rounds)
        winner = self._winner(ms)
        if winner != self.preferred and self.preferred in ms:
            # confirm: the other candidate has to win again; load only ever adds time, so keep each one's best
            again = _time(fns, self.rounds)
            ms = {name: min(first, again[name]) for name, first in ms.items()}
            winner = self._winner(ms)
        record = {"winner": winner, "ms": {k: round(v, 4) for k, v in ms.items()}}
        self.decisions[build_id, key] = record
        self._write(build_id, key, record)
        LOGGER.debug("yoloattn: %s autotune %s: %s -> %s", self.name, key, record["ms"], winner)
        return record
