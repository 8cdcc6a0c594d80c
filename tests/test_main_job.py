"""The README's main job end to end (about 5 minutes on 2 cores): run with `python -m pytest -m slow`."""

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_main_job_learns(tmp_path):
    env = dict(os.environ, YOLOATTN_CACHE=str(tmp_path / "cache"))
    # a user's run, not a test run: Ultralytics would put runs/ under its own tests/tmp when it sees pytest
    env.pop("PYTEST_CURRENT_TEST", None)
    proc = subprocess.run([sys.executable, "-m", "yoloattn.yolo.cli"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-5000:]
    match = re.search(r"yoloattn main job: yolov8n-bra.yaml on shapes, 10 epochs at imgsz 256 -> mAP50-95 ([0-9.]+)",
                      proc.stdout)
    assert match, proc.stdout[-3000:]
    assert float(match.group(1)) > 0.01  # 0.044 when measured; from scratch, 10 epochs of 256 images
    assert (tmp_path / "runs" / "detect" / "train" / "weights" / "best.pt").exists()
