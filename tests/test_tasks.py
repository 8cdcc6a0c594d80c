"""Every YOLO task with yoloattn's layers: segmentation, pose, oriented boxes and classification models with BRA and
DAT (yoloattn's ``<model>-<task>-<layer>.yaml`` names) build at every scale, train an epoch on the built-in data of
their task, validate, predict, reload in a fresh process with plain Ultralytics, and export to ONNX (onnxruntime
parity); the built-in data's labels are exact."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import yoloattn  # noqa: F401
from yoloattn import YOLO
from yoloattn.data import FLIP_IDX, shapes

TASKS = {"seg": "segment", "pose": "pose", "obb": "obb", "cls": "classify"}
IMGSZ = 64


def _names():
    for family in ("yolov8", "yolo11"):
        for task in TASKS:
            for layer in ("bra", "dat"):
                fast = family == "yolov8" and layer == "bra"  # one model per task in the default run
                yield pytest.param(family, task, layer, marks=[] if fast else [pytest.mark.slow],
                                   id=f"{family}-{task}-{layer}")


@pytest.mark.parametrize("family,task,layer", _names())
def test_task_model_trains_validates_predicts_reloads_exports(family, task, layer, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    name = f"{family}n-{task}-{layer}.yaml"
    data = shapes(n_train=8, n_val=4, imgsz=IMGSZ, task=TASKS[task], root=tmp_path / "data", progress=False)
    imgsz = 32 if task == "cls" else IMGSZ
    model = YOLO(name)
    assert model.task == TASKS[task]
    assert any(type(m).__module__ == "yoloattn.yolo.layers" for m in model.model.model)
    model.train(data=str(data), epochs=1, imgsz=imgsz, batch=4, workers=0, plots=False, project=str(tmp_path),
                name="run", exist_ok=True, verbose=False)
    best = tmp_path / "run" / "weights" / "best.pt"
    assert best.exists()
    metrics = YOLO(str(best)).val(data=str(data), imgsz=imgsz, batch=4, plots=False, verbose=False,
                                  project=str(tmp_path), name="val", exist_ok=True)
    assert metrics is not None
    source = next((data if task == "cls" else data.parent / "images" / "val").rglob("*.png"))
    results = YOLO(str(best)).predict(str(source), imgsz=imgsz, verbose=False)
    assert len(results) == 1
    check = textwrap.dedent(f"""
        import torch
        from ultralytics import YOLO
        model = YOLO({str(best)!r})
        print(model.task, sum(type(m).__module__ == "yoloattn.yolo.layers" for m in model.model.modules()))
    """)
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.split()[-2:] == [TASKS[task], "1"], proc.stderr[-2000:]
    onnx_path = YOLO(str(best)).export(format="onnx", imgsz=imgsz, dynamic=task != "cls", simplify=False)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    net = YOLO(str(best)).model.float().eval()
    x = torch.rand(1, 3, imgsz, imgsz)
    with torch.no_grad():
        expected = net(x)
    while isinstance(expected, (list, tuple)):  # the first output: detections (masks' prototypes come second)
        expected = expected[0]
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected.numpy(), atol=2e-3, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("scale", "nsmlx")
def test_task_models_every_scale(task, scale):
    for family in ("yolov8", "yolo11"):
        for layer in ("bra", "dat"):
            model = YOLO(f"{family}{scale}-{task}-{layer}.yaml").model.eval()
            size = 64 if task == "cls" else 96
            with torch.no_grad():
                model(torch.zeros(1, 3, size, size))


def _labels(folder, task):
    rows = []
    for path in sorted((folder / "labels" / "train").glob("*.txt")):
        rows += [[float(v) for v in line.split()] for line in path.read_text().splitlines() if line.strip()]
    return rows


@pytest.mark.parametrize("level", ["easy", "hard"])
def test_builtin_labels_are_exact_for_every_task(tmp_path, level):
    import yaml

    detect = _labels(shapes(n_train=6, n_val=2, imgsz=64, task="detect", level=level, root=tmp_path,
                            progress=False).parent, "detect")
    seg = _labels(shapes(n_train=6, n_val=2, imgsz=64, task="segment", level=level, root=tmp_path,
                         progress=False).parent, "segment")
    pose_yaml = shapes(n_train=6, n_val=2, imgsz=64, task="pose", level=level, root=tmp_path, progress=False)
    pose = _labels(pose_yaml.parent, "pose")
    obb = _labels(shapes(n_train=6, n_val=2, imgsz=64, task="obb", level=level, root=tmp_path,
                         progress=False).parent, "obb")
    assert len(detect) == len(seg) == len(pose) == len(obb) > 0  # the same scenes, the same objects
    for box, poly, kp, rot in zip(detect, seg, pose, obb):
        assert box[0] == poly[0] == kp[0] == rot[0]  # the same class
        xy = np.array(poly[1:]).reshape(-1, 2)
        (x0, y0), (x1, y1) = xy.min(0), xy.max(0)
        np.testing.assert_allclose(box[1:], [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], atol=2e-6)
        assert kp[1:5] == box[1:5] and len(kp) == 5 + 4 * 3
        corners = np.array(rot[1:]).reshape(4, 2)
        sides = np.linalg.norm(corners - np.roll(corners, 1, 0), axis=1)
        assert np.allclose(sides, sides[0], rtol=1e-3) or (corners.min() == 0 or corners.max() == 1)  # a square
    cfg = yaml.safe_load(pose_yaml.read_text())
    assert cfg["kpt_shape"] == [4, 3] and cfg["flip_idx"] == FLIP_IDX
    cls_root = shapes(n_train=6, n_val=2, imgsz=64, task="classify", level=level, root=tmp_path, progress=False)
    assert sorted(p.name for p in (cls_root / "train").iterdir()) == sorted(["circle", "cross", "square", "triangle"])
    assert any((cls_root / "train").rglob("*.png"))


def test_levels_have_their_documented_character(tmp_path):
    """easy: 2-8 large, separate objects; hard: 8-24 small ones (median about a tenth of the side, COCO-small at
    imgsz 160), in clusters that overlap (a study's conclusions depend on what 'hard' means)."""
    stats = {}
    for level in ("easy", "hard"):
        boxes = _labels(shapes(n_train=24, n_val=2, imgsz=256, level=level, root=tmp_path, progress=False).parent,
                        "detect")
        folder = next(tmp_path.glob(f"shapes-detect-{level}-*"))
        per_image = [len(p.read_text().splitlines()) for p in (folder / "labels" / "train").glob("*.txt")]
        widths = np.array([b[3] for b in boxes])
        stats[level] = (np.mean(per_image), np.median(widths), per_image)
    easy_n, easy_w, easy_counts = stats["easy"]
    hard_n, hard_w, hard_counts = stats["hard"]
    assert 2 <= min(easy_counts) and max(easy_counts) <= 8 and easy_w > 0.15
    assert 8 <= min(hard_counts) and max(hard_counts) <= 24 and hard_n >= 12
    assert 1 / 14 < hard_w < 1 / 7 and hard_w * 160 < 32  # a tenth of the side: small objects at imgsz 160


def test_data_aliases():
    from yoloattn.data import parse_alias

    assert parse_alias("shapes") == {"task": "detect", "level": "easy"}
    assert parse_alias("shapes-hard") == {"task": "detect", "level": "hard"}
    assert parse_alias("shapes-seg-hard") == {"task": "segment", "level": "hard"}
    assert parse_alias("shapes-cls") == {"task": "classify", "level": "easy"}
    assert parse_alias("shapes-pose.yaml") == {"task": "pose", "level": "easy"}
    assert parse_alias("shapes-nope") is None and parse_alias("coco8.yaml") is None
    assert os.path.isdir(yoloattn.yolo.model.resolve_data("shapes-cls"))
