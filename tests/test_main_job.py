"""The README's main job end to end (about 5 minutes on 2 cores): run with `python -m pytest -m slow`."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_main_job_learns(tmp_path):
    env = dict(os.environ, YOLOATTN_CACHE=str(tmp_path / "cache"))
    # a user's run, not a test run: Ultralytics would put runs/ under its own tests/tmp when it sees pytest
    env.pop("PYTEST_CURRENT_TEST", None)
    proc = subprocess.run([sys.executable, "-m", "yoloattn.yolo.cli"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-5000:]
    match = re.search(r"yoloattn main job: yolov8n-bra.yaml on shapes, 24 epochs at imgsz 160 -> validation mAP50 "
                      r"([0-9.]+), mAP50-95 ([0-9.]+)", proc.stdout)
    assert match, proc.stdout[-3000:]
    assert float(match.group(1)) >= 0.5  # 0.661 when measured
    assert (tmp_path / "runs" / "detect" / "train" / "weights" / "best.pt").exists()
    picture = re.search(r"prediction: (\S+\.png) \((\d+) objects found", proc.stdout)
    assert picture and Path(picture.group(1)).exists() and int(picture.group(2)) > 0
