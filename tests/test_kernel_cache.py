"""The compiled kernel's cache cannot crash the process or lie: every damage is detected, logged, removed and
rebuilt, and a kernel that cannot be had leaves BRA on its SDPA backend with the reason shown once. Each case
runs in a fresh subprocess with its own cache directory."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32" or shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="needs a C++ compiler")

# BRA on the CPU: prints which backend 'auto' took, whether the kernel is available, and the largest
# difference to the reference; warnings go to stderr as a user would see them
PROBE = textwrap.dedent("""
    import torch, warnings
    from yoloattn.nn import BiLevelRoutingAttention, use_backend
    from yoloattn.nn.functional import ROUTED_ATTENTION, routed_attention_cpu as cpu
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(16, n_win=2, num_heads=2)
    x = torch.randn(1, 16, 6, 6)
    chosen = []
    original = ROUTED_ATTENTION.select
    ROUTED_ATTENTION.select = lambda *a, **k: chosen.append(original(*a, **k).name) or original(*a, **k)
    with torch.no_grad():
        out = layer(x)
        out2 = layer(x)
        with use_backend("reference"):
            ref = layer(x)
    print("RESULT", json.dumps({"backend": chosen[0], "available": cpu.build_info()["available"],
                                "diff": float((out - ref).abs().max())}))
""").replace("import torch, warnings", "import json, torch, warnings")


def run_probe(cache: Path, env_extra=None, script: str = PROBE) -> tuple[dict, str]:
    env = dict(os.environ, YOLOATTN_CACHE=str(cache), YOLOATTN_AUTOTUNE="0")
    env.pop("CXX", None)
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[7:]), proc.stderr


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory) -> Path:
    """A cache directory holding a good build of the native kernel."""
    cache = tmp_path_factory.mktemp("cache")
    result, _ = run_probe(cache)
    assert result["backend"] == "cpu" and result["diff"] < 1e-5
    return cache


def fresh_copy(built: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    cache = tmp_path / "cache"
    shutil.copytree(built, cache)
    (library,) = (cache / "kernels").glob("routed_attention_cpu-*.so")
    return cache, library, library.with_suffix(".json")


@pytest.mark.parametrize("size", [1000, *(pytest.param(s, marks=pytest.mark.slow) for s in (0, 10_000, 100_000))])
def test_truncated_library_is_rebuilt(built_cache, tmp_path, size):
    cache, library, _ = fresh_copy(built_cache, tmp_path)
    good = library.read_bytes()
    library.write_bytes(good[:size])
    result, stderr = run_probe(cache)
    assert result["backend"] == "cpu" and result["diff"] < 1e-5
    assert f"its size is {size} bytes, the manifest says {len(good)}" in stderr and "rebuilding it" in stderr
    assert library.stat().st_size == len(good)


@pytest.mark.slow
def test_garbage_of_the_right_size_is_rebuilt(built_cache, tmp_path):
    cache, library, _ = fresh_copy(built_cache, tmp_path)
    library.write_bytes(os.urandom(library.stat().st_size))
    result, stderr = run_probe(cache)
    assert result["backend"] == "cpu" and "its checksum differs from the manifest's" in stderr


def _foreign_library(tmp_path: Path) -> bytes:
    source = tmp_path / "foreign.cpp"
    source.write_text('extern "C" int something_else() { return 42; }\n')
    out = tmp_path / "foreign.so"
    subprocess.run([shutil.which("c++") or "g++", "-shared", "-fPIC", str(source), "-o", str(out)], check=True)
    return out.read_bytes()


@pytest.mark.parametrize("manifest", [pytest.param("stale", marks=pytest.mark.slow), "forged"])
def test_foreign_library_is_rebuilt(built_cache, tmp_path, manifest):
    """A valid shared library that is not the kernel: refused by its checksum, or (with a forged manifest that
    matches it) by its missing entry points; either way rebuilt, and the process does not die."""
    import hashlib

    cache, library, manifest_path = fresh_copy(built_cache, tmp_path)
    foreign = _foreign_library(tmp_path)
    library.write_bytes(foreign)
    if manifest == "forged":
        manifest_path.write_text(json.dumps({"size": len(foreign), "sha256": hashlib.sha256(foreign).hexdigest()}))
    result, stderr = run_probe(cache)
    assert result["backend"] == "cpu" and result["diff"] < 1e-5
    expected = "lacks the kernel's entry points" if manifest == "forged" else "the manifest says"
    assert expected in stderr and "rebuilding it" in stderr


@pytest.mark.slow
def test_missing_or_damaged_manifest_is_rebuilt(built_cache, tmp_path):
    cache, library, manifest = fresh_copy(built_cache, tmp_path)
    manifest.unlink()
    result, stderr = run_probe(cache)
    assert result["backend"] == "cpu" and "its manifest is missing" in stderr
    manifest.write_text("{not json")
    result, stderr = run_probe(cache)
    assert result["backend"] == "cpu" and "its manifest is unreadable" in stderr


def test_unwritable_cache_builds_in_a_private_directory(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory would be")
    result, stderr = run_probe(blocker)
    assert result["backend"] == "cpu" and result["diff"] < 1e-5
    assert "is not writable" in stderr and "for this process" in stderr


@pytest.mark.parametrize("cxx", ["/no/such/compiler", pytest.param("false", marks=pytest.mark.slow)])
def test_no_working_compiler_falls_back_to_sdpa_and_says_so_once(tmp_path, cxx):
    result, stderr = run_probe(tmp_path / "cache", {"CXX": cxx})
    assert result == {"backend": "sdpa", "available": False, "diff": result["diff"]} and result["diff"] < 1e-5
    assert stderr.count("YoloattnWarning") == 1  # shown once, though the layer ran twice
    assert "routed_attention does not use its 'cpu' backend: the CPU kernel (-march=native) could not be built" in stderr


@pytest.mark.slow
def test_cxx_may_hold_a_command_with_flags(tmp_path):
    compiler = shutil.which("c++") or shutil.which("g++")
    result, stderr = run_probe(tmp_path / "cache", {"CXX": f"{compiler} -Wno-unused-variable -g0"})
    assert result["backend"] == "cpu" and result["diff"] < 1e-5, stderr


def test_concurrent_first_uses_build_once(tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, YOLOATTN_CACHE=str(cache), YOLOATTN_AUTOTUNE="0")
    procs = [subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(3)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    results = [json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:]) for out, _ in outputs]
    assert all(r["backend"] == "cpu" and r["diff"] < 1e-5 for r in results)
    assert len(list((cache / "kernels").glob("routed_attention_cpu-*.so"))) == 1
    assert not [p for p in (cache / "kernels").iterdir() if p.name.startswith(".")]  # no temporary left behind
