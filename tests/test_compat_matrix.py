"""Every supported Ultralytics release, end to end: 8.3.0, the last 8.3, the first 8.4 and the newest 8.4.

Each release is installed without dependencies into its own folder (an Ultralytics wheel is about 1 MB; 8.3.x
also gets the packages it needs that the newest does not: pandas, seaborn, scipy, py-cpuinfo, tqdm), put first
on PYTHONPATH next to the same torch, and checked by ``compat_check.py``. Slow (about 4 minutes a release)
and it needs PyPI (the wheels are cached in ``$YOLOATTN_CACHE/ultralytics-releases``):

    python -m pytest -m slow tests/test_compat_matrix.py -s     # prints the README's matrix
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from yoloattn._cache import cache_dir

RELEASES = ["8.3.0", "8.3.253", "8.4.0", "installed"]
OLD_EXTRAS = ["pandas", "seaborn", "scipy", "py-cpuinfo", "tqdm", "python-dateutil", "pytz", "tzdata", "six"]
# what a release cannot do, and why (the matrix says so instead of failing)
KNOWN = {
    ("8.3.0", "yolov8-biformer.yaml"): "Ultralytics' Index layer, which the BiFormer backbone rows use, came later",
}
# a part of the check a release cannot pass for a reason outside yoloattn (plain Ultralytics fails the same)
KNOWN_PARTS = {
    ("8.3.0", "onnx"): "Ultralytics 8.3.0 calls torch.onnx.export without dynamo=False, so torch >= 2.9 runs its dynamo "
                       "exporter, which needs onnxscript (plain Ultralytics 8.3.0 fails the same; pip install onnxscript)",
}
MATRIX = {}


def _pip(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "-q", *args], capture_output=True, text=True, timeout=900)


def _release_folder(version: str) -> Path | None:
    if version == "installed":
        return None
    root = cache_dir() / "ultralytics-releases"
    target = root / version
    if not (target / "ultralytics").is_dir():
        proc = _pip("install", "--no-deps", "--target", str(target), f"ultralytics=={version}")
        if proc.returncode:
            pytest.skip(f"ultralytics {version} could not be installed (no registry?): {proc.stderr.strip()[-300:]}")
    extras = root / "old-release-extras"
    if version.startswith("8.3") and not (extras / "pandas").is_dir():
        proc = _pip("install", "--no-deps", "--target", str(extras), *OLD_EXTRAS)
        if proc.returncode:
            pytest.skip(f"the extras of ultralytics {version} could not be installed: {proc.stderr.strip()[-300:]}")
    return target


@pytest.mark.slow
@pytest.mark.parametrize("version", RELEASES)
def test_release(version, tmp_path):
    folder = _release_folder(version)
    env = dict(os.environ)
    if folder is not None:
        paths = [str(folder), *([str(folder.parent / "old-release-extras")] if version.startswith("8.3") else [])]
        env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    env["YOLOATTN_CACHE"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("compat_check.py")), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=3000, cwd=tmp_path)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("COMPAT ")), None)
    assert line, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(line[len("COMPAT "):])
    MATRIX[result["ultralytics"]] = result
    failures = {k: v for k, v in result["yaml"].items() if v != "ok" and (version, k) not in KNOWN}
    assert failures == {}
    for part in ("train", "reload", "onnx"):
        if (version, part) in KNOWN_PARTS and any(v != "ok" for v in result[part].values()):
            result[part] = {"known": KNOWN_PARTS[version, part]}
            continue
        assert all(v == "ok" for v in result[part].values()), (part, result[part])
    print(f"\nultralytics {result['ultralytics']}: " + json.dumps(result))


def teardown_module(module):
    if not MATRIX:
        return
    print("\n| Ultralytics | shipped YAMLs built (scale n) | train 1 epoch | reload, plain ultralytics.YOLO | ONNX dynamic "
          "+ onnxruntime | GFLOPs of YOLOv8n-BRA at 640 (Ultralytics / counted) |")
    print("|---|---|---|---|---|---|")
    def cell(part):
        if "known" in r[part]:
            return "no: " + r[part]["known"]
        return "ok" if all(v == "ok" for v in r[part].values()) else str(r[part])

    for version, r in MATRIX.items():
        ok = sum(v == "ok" for v in r["yaml"].values())
        missing = [k for k, v in r["yaml"].items() if v != "ok"]
        print(f"| {version} | {ok}/{len(r['yaml'])}{' (not: ' + ', '.join(missing) + ')' if missing else ''} | "
              f"{cell('train')} | {cell('reload')} | {cell('onnx')} | "
              f"{r.get('gflops_ultralytics')} / {r.get('gflops_counted')} |")
