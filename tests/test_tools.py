"""yoloattn ablate / bench / visualize at tiny settings: real runs, real PNG files."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from yoloattn.data import shapes

IMGSZ = 32


def _png_ok(path, min_bytes=2000):
    import cv2

    assert path.exists() and path.stat().st_size > min_bytes, path
    image = cv2.imread(str(path))
    assert image is not None and image.std() > 5, f"{path} looks blank"
    return image


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return shapes(n_train=8, n_val=4, imgsz=64, max_objects=6, root=tmp_path_factory.mktemp("data"), progress=False)


def _cli(args, cwd, env=None):
    proc = subprocess.run([sys.executable, "-m", "yoloattn.yolo.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env=env or dict(os.environ))
    assert proc.returncode == 0, f"{args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def test_ablate_tables_plots_and_resume(tmp_path, tiny_data):
    args = ["ablate", f"data={tiny_data}", "models=yolov8n.yaml,yolov8n-bra.yaml", "seeds=0,1", "epochs=1",
            f"imgsz={IMGSZ}", "batch=4", "workers=0", f"project={tmp_path}", "name=abl"]
    log = _cli(args, tmp_path)
    out = tmp_path / "abl"
    with open(out / "results.csv") as f:
        runs = list(csv.DictReader(f))
    assert [(r["model"], r["seed"]) for r in runs] == [("yolov8n.yaml", "0"), ("yolov8n.yaml", "1"),
                                                       ("yolov8n-bra.yaml", "0"), ("yolov8n-bra.yaml", "1")]
    assert all(float(r["gflops"]) > 0 and float(r["latency_ms"]) > 0 and int(r["params"]) > 0 for r in runs)
    assert float(runs[2]["params"]) > float(runs[0]["params"])  # the BRA layer adds parameters
    table = (out / "results.md").read_text()
    assert "| yolov8n-bra.yaml | 2 |" in table and " ± " in table and "mAP50-95" in table
    for name in ("map_vs_latency.png", "map_curves.png"):
        _png_ok(out / name)
    assert "yolov8n-bra.yaml" in log
    # a second call reuses every finished run
    before = {p: p.stat().st_mtime for p in out.glob("*/ablate.json")}
    _cli(args, tmp_path)
    assert {p: p.stat().st_mtime for p in out.glob("*/ablate.json")} == before


def test_bench_tables_and_chart(tmp_path):
    log = _cli(["bench", "layers=bra,dat,conv3x3", "maps=P5", "batches=1", "models=yolov8n.yaml,yolov8n-bra.yaml",
                "imgsz=64", f"out={tmp_path}"], tmp_path)
    assert "| bra | P5 | (1, 256, 20, 20) |" in log and "| dat | P5 |" in log and "| conv3x3 | P5 |" in log
    assert "| yolov8n-bra.yaml |" in log
    _png_ok(tmp_path / "bench.png")
    assert (tmp_path / "bench.json").exists()


@pytest.mark.parametrize("model,kind", [("yolov8n-bra.yaml", "bra"), ("yolov8n-dat.yaml", "dat")])
def test_visualize_draws_over_the_picture(tmp_path, model, kind):
    import cv2
    from ultralytics.utils import ASSETS

    log = _cli(["visualize", f"model={model}", f"source={ASSETS / 'bus.jpg'}", "imgsz=320", "point=160,160",
                f"out={tmp_path}"], tmp_path)
    path = tmp_path / f"bus_{kind}_layer16.png"
    drawn = _png_ok(path)
    assert drawn.shape[:2] == (320, 320)
    from ultralytics.data.augment import LetterBox

    plain = LetterBox((320, 320), auto=False, stride=32)(image=cv2.imread(str(ASSETS / "bus.jpg")))
    assert np.abs(drawn.astype(int) - plain.astype(int)).mean() > 1.0  # something was drawn on top
    assert ("routes to" if kind == "bra" else "sampling points per group") in log


def test_visualize_rejects_models_without_attention(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "yoloattn.yolo.cli", "visualize", "model=yolov8n.yaml",
                           "imgsz=320", f"out={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "has no BiLevelRoutingAttention or DAttention layer" in proc.stderr


def test_info_prints_summary_and_layers(tmp_path):
    log = _cli(["info", "model=yolov10n-bra.yaml", "imgsz=320"], tmp_path)
    assert "GFLOPs" in log and "layer 17: BiLevelRoutingAttention(dim=64" in log and "layer 21: BiLevelRoutingAttention(dim=128" in log
