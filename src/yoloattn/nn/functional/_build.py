"""Compile a C++ kernel once per machine, cache it safely, and load it with ctypes.

The library is compiled into a temporary file next to its final place, then its size and SHA-256 go
into a manifest, and both are published by atomic renames (library first, manifest last), under an
exclusive file lock so that concurrent first uses build once. Before a cached library is opened, its
size and checksum are checked against the manifest, so a truncated, overwritten or foreign file is never
mapped (mapping a truncated library can kill the process with SIGBUS); then the caller's ``check`` reads
the ABI it reports. A library that fails any check is logged, removed and rebuilt; if the cache
directory is not writable, the library is built in a private temporary directory for this process.

The compiler is ``$CXX`` (a command, flags allowed, e.g. ``"ccache g++"``) or the first of ``c++``,
``g++``, ``clang++`` on the PATH.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ..._cache import cache_dir

__all__ = ["BuildError", "load_library"]

LOGGER = logging.getLogger("yoloattn")
_BASE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fno-math-errno"]


class BuildError(RuntimeError):
    """The kernel could not be compiled or loaded; the message says why."""


def _compiler() -> list[str]:
    text = os.environ.get("CXX", "").strip()
    if text:
        command = shlex.split(text)
        if shutil.which(command[0]) is None:
            raise BuildError(f"the compiler in CXX={text!r} was not found ({command[0]!r} is not on the PATH)")
        return command
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return [name]
    raise BuildError("no C++ compiler found (install g++ or clang++, or set CXX)")


def _compiler_id(command: list[str]) -> str:
    try:
        proc = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=30)
        return proc.stdout.splitlines()[0] if proc.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags."""
    try:
        with open("/proc/cpuinfo") as f:
            info = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(info)))
    except OSError:
        return platform.processor() or platform.machine()


def _digest(path: Path) -> tuple[int, str]:
    data = path.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


def _verify(library: Path, manifest: Path) -> str | None:
    """None if ``library`` matches its manifest, else why not."""
    if not library.exists():
        return "the library is missing"
    try:
        record = json.loads(manifest.read_text())
        size, sha = int(record["size"]), str(record["sha256"])
    except FileNotFoundError:
        return "its manifest is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its manifest is unreadable ({e})"
    actual_size, actual_sha = _digest(library)
    if actual_size != size:
        return f"its size is {actual_size} bytes, the manifest says {size}"
    if actual_sha != sha:
        return "its checksum differs from the manifest's"
    return None


@contextlib.contextmanager
def _locked(directory: Path, name: str) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{name}.lock", "a+") as handle:
        if sys.platform != "win32":
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _compile(source: Path, library: Path, manifest: Path, flags: list[str]) -> None:
    """Compile ``source`` and publish ``library`` and ``manifest`` atomically (same directory)."""
    compiler = _compiler()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{library.stem}-", suffix=".so", dir=library.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        errors = ""
        # OpenMP shares PyTorch's thread pool; without it (e.g. clang with no libomp) std::thread is used
        for extra in (["-fopenmp"], []):
            command = [*compiler, *flags, *extra, str(source), "-o", str(tmp)]
            try:
                proc = subprocess.run(command, capture_output=True, text=True)
            except OSError as e:
                raise BuildError(f"{' '.join(compiler)} could not be run ({e})") from e
            if proc.returncode == 0:
                break
            errors = proc.stderr.strip()[-2000:]
        else:
            raise BuildError(f"{' '.join(compiler)} failed: {errors}")
        size, sha = _digest(tmp)
        os.chmod(tmp, 0o644)
        tmp_manifest = manifest.with_name(f".{manifest.name}.{os.getpid()}")
        tmp_manifest.write_text(json.dumps({"size": size, "sha256": sha, "flags": flags}))
        os.chmod(tmp_manifest, 0o644)
        os.replace(tmp, library)
        os.replace(tmp_manifest, manifest)
    finally:
        _remove(tmp)


def _open(library: Path, check: Callable[[ctypes.CDLL], str | None]) -> tuple[ctypes.CDLL | None, str | None]:
    try:
        lib = ctypes.CDLL(str(library))
    except OSError as e:
        return None, f"it cannot be loaded ({e})"
    reason = check(lib)
    return (None, reason) if reason else (lib, None)


def load_library(source: Path, *, march: str, defines: dict[str, int],
                 check: Callable[[ctypes.CDLL], str | None]) -> ctypes.CDLL:
    """Compile (once per machine and build settings), verify and load ``source``.

    Args:
        source: the C++ file.
        march: the ``-march`` target, e.g. ``'native'``, ``'x86-64-v3'`` (AVX2), ``'x86-64'`` (SSE2).
        defines: ``-D`` macros, part of the cache key.
        check: reads a loaded library and returns why it is unusable (missing symbols, another ABI), or None.

    Returns:
        the loaded library. Raises :class:`BuildError` saying why there is none.
    """
    if sys.platform == "win32":
        raise BuildError("the CPU kernel is built with a POSIX C++ toolchain, not on Windows")
    flags = [*_BASE_FLAGS, f"-march={march}", *(f"-D{k}={v}" for k, v in sorted(defines.items()))]
    compiler = _compiler()
    key = hashlib.sha256(b"\0".join([source.read_bytes(), " ".join(flags).encode(), " ".join(compiler).encode(),
                                     _compiler_id(compiler).encode(), _cpu_signature().encode()])).hexdigest()[:16]
    directory = cache_dir() / "kernels"
    library = directory / f"{source.stem}-{key}.so"
    manifest = library.with_suffix(".json")

    reason = _verify(library, manifest)
    if reason is None:
        lib, reason = _open(library, check)
        if lib is not None:
            return lib
    try:
        with _locked(directory, library.stem):
            reason = _verify(library, manifest)  # another process may have built it while we waited
            opened_bad = False
            if reason is None:
                lib, reason = _open(library, check)
                if lib is not None:
                    return lib
                opened_bad = True
            if library.exists() or manifest.exists():
                LOGGER.warning("yoloattn: the cached kernel %s is unusable (%s); rebuilding it", library, reason)
            _remove(library, manifest)
            _compile(source, library, manifest, flags)
            if opened_bad:
                # the process already mapped a bad file under this name; the loader would return it again
                private = Path(tempfile.mkdtemp(prefix="yoloattn-kernel-")) / library.name
                shutil.copyfile(library, private)
                library = private
    except OSError as e:
        private_dir = Path(tempfile.mkdtemp(prefix="yoloattn-kernel-"))
        LOGGER.warning("yoloattn: the kernel cache %s is not writable (%s); building the kernel in %s for this "
                       "process (set YOLOATTN_CACHE to a writable directory to build it once)", directory, e,
                       private_dir)
        library, manifest = private_dir / library.name, private_dir / manifest.name
        _compile(source, library, manifest, flags)
    lib, reason = _open(library, check)
    if lib is None:
        raise BuildError(f"the freshly built {library} is unusable: {reason}")
    return lib
