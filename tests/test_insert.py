"""``yoloattn insert``: the inserted model builds, every other layer keeps its original input feature maps (the
traced connections of the built models are compared), every stock Ultralytics YAML of every task, and the command
line writes a file that trains."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import ultralytics
from ultralytics.nn.tasks import guess_model_task, yaml_model_load

import yoloattn  # noqa: F401 - registers the layers
from yoloattn.yolo.insert import _build, _positions, insert, insert_rows

STOCK = Path(ultralytics.__file__).parent / "cfg" / "models"
CORE = ["v8/yolov8.yaml", "11/yolo11.yaml", "11/yolo11-seg.yaml", "v8/yolov8-pose.yaml", "11/yolo11-obb.yaml",
        "v8/yolov8-cls.yaml", "v10/yolov10n.yaml", "12/yolo12.yaml", "26/yolo26.yaml", "v5/yolov5.yaml",
        "rt-detr/rtdetr-l.yaml"]


def _sources(f, i):
    return [s if s >= 0 or i == 0 else i + s for s in (f if isinstance(f, list) else [f])]


def _check_connections(d: dict, at: str, layer: str = "BiLevelRoutingAttention"):
    """Insert, build both models, and compare every original layer's inputs with its renumbered twin's."""
    task = guess_model_task(d)
    original = _build(d, task)
    after = _positions(d, at, None)
    new, inserted, new_index = insert_rows(d, after, layer, [])
    built = _build(new, task)
    inserted_at = {k: new_index[k] + 1 for k in after}
    assert len(built.model) == len(original.model) + len(after)
    for i, m in enumerate(original.model):
        twin = built.model[new_index[i]]
        assert type(twin) is type(m), (i, type(m), type(twin))
        expected = [-1 if s < 0 else inserted_at.get(s, new_index[s]) for s in _sources(m.f, i)]
        assert _sources(twin.f, new_index[i]) == expected, (i, m.f, twin.f)
    for k, row in inserted_at.items():  # an inserted layer reads the row it follows
        assert _sources(built.model[row].f, row) == [new_index[k]]
    x = torch.zeros(1, 3, 224 if task == "classify" else 96, 224 if task == "classify" else 128)
    with torch.no_grad():
        built.eval()(x)
    return built


def _stock(path: Path) -> dict:
    d = yaml_model_load(path)
    d["scale"] = d.get("scale") or next(iter(d.get("scales") or {"": None}))
    return d


def _positions_for(d: dict) -> list[str]:
    if guess_model_task(d) == "classify":
        return ["backbone", "backbone-p4", "2"]
    return ["p3", "p5", "head", "backbone-p4", "backbone", "3"]


@pytest.mark.parametrize("name", CORE)
def test_core_yamls_every_position(name):
    d = _stock(STOCK / name)
    for at in _positions_for(d):
        _check_connections(d, at)


@pytest.mark.slow
@pytest.mark.parametrize("path", [pytest.param(p, id=str(p.relative_to(STOCK))) for p in sorted(STOCK.rglob("*.yaml"))])
def test_every_stock_yaml(path):
    d = _stock(path)
    try:
        _build(d, guess_model_task(d))
    except Exception as e:  # noqa: BLE001 - models Ultralytics itself cannot build offline (CLIP text heads, ...)
        pytest.skip(f"Ultralytics cannot build {path.name} here: {e}")
    for at in _positions_for(d):
        try:
            _check_connections(d, at)
        except ValueError as e:  # a position this model does not have (e.g. no detection-style head)
            assert "at=" in str(e), e


@pytest.mark.parametrize("layer", ["DAttention", "EMA", "MSDA", "HAB"])
def test_other_layers_insert(layer):
    _check_connections(_stock(STOCK / "11/yolo11.yaml"), "p3,p4", layer)


@pytest.mark.parametrize("at,match", [("p9", "unknown position"), ("99", "has rows 0..22"),
                                      ("p3,p3", "twice"), ("backbone-p7", "unknown position")])
def test_refused_positions(at, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        insert("yolov8n.yaml", at=at, out=tmp_path / "x.yaml", verbose=False)


def test_refused_layers_and_heads(tmp_path):
    with pytest.raises(ValueError, match="is not a layer a YAML row can name"):
        insert("yolov8n.yaml", layer="BiLevelRoutingAtention", out=tmp_path / "x.yaml", verbose=False)
    with pytest.raises(ValueError, match="has no detection-style head"):
        insert("yolov8n-cls.yaml", at="p3", out=tmp_path / "x.yaml", verbose=False)
    with pytest.raises(ValueError, match=r"does not build: .*topk must be an integer in \[1, n_win²=4\]"):
        insert("yolov8n.yaml", at="p5", out=tmp_path / "x.yaml", verbose=False, n_win=2, topk=9)


def test_written_file_is_readable_and_rebuilds(tmp_path):
    path = insert("yolo11n.yaml", "BiLevelRoutingAttention", at="p3,p5", out=tmp_path / "yolo11n-bra.yaml",
                  verbose=False, topk=8)
    text = path.read_text()
    assert "with BiLevelRoutingAttention inserted by yoloattn insert (at=p3,p5)" in text
    assert "[-1, 1, BiLevelRoutingAttention, [{topk: 8}]]  # 17 <- inserted by yoloattn" in text
    assert "[[17, 20, 24], 1, Detect, [nc]]" in text  # the head reads the inserted layers
    model = yoloattn.YOLO(str(path)).model
    assert [m.topk for m in model.modules() if isinstance(m, yoloattn.BiLevelRoutingAttention)] == [8, 8]


def test_cli_insert_then_train(tmp_path):
    from yoloattn.data import shapes

    data = shapes(n_train=8, n_val=4, imgsz=64, root=tmp_path / "data", progress=False)
    env = dict(os.environ, YOLOATTN_CACHE=str(tmp_path / "cache"))
    env.pop("PYTEST_CURRENT_TEST", None)  # a user's run: Ultralytics writes runs/ to the working directory
    run = lambda *args: subprocess.run([sys.executable, "-m", "yoloattn.yolo.cli", *args], cwd=tmp_path, env=env,
                                       capture_output=True, text=True, timeout=900)
    out = run("insert", "model=yolo11n.yaml", "layer=DAttention", "at=p3", "stride=4")
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "<- inserted" in log and "GFLOPs at 640" in log and (tmp_path / "yolo11n-dat.yaml").exists()
    out = run("train", "model=yolo11n-dat.yaml", f"data={data}", "epochs=1", "imgsz=64", "batch=4", "workers=0",
              "plots=False")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "runs" / "detect" / "train" / "weights" / "best.pt").exists()
