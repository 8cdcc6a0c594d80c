"""Ultralytics integration: registration, shipped YAMLs at every scale, seed YAMLs, errors, FLOPs, transfer."""


import pytest
import torch

import yoloattn
from yoloattn import YOLO
from yoloattn.yolo import layers, resolve_model, shipped_models, transfer_weights

SCALES = {
    "yolov8-bra.yaml": "nsmlx",
    "yolov10-bra.yaml": "nsmblx",
    "yolov5-bra.yaml": "nsmlx",
    "yolo11-bra.yaml": "nsmlx",
    "yolov8-dat.yaml": "nsmlx",
    "yolo11-dat.yaml": "nsmlx",
    **{f"yolov8-{layer}.yaml": "nsmlx" for layer in ("acmix", "cpca", "dlka", "ema", "hab", "msca", "msda", "polarized",
                                                     "sea")},
    "yolov8-biformer.yaml": "nsmlx",
    "yolov8-c2f-biformer.yaml": "nsmlx",
    "yolo11-c3k2-biformer.yaml": "nsmlx",
}
# the width of the map a P3 layer reads, per scale (yolo11's m/l/x widths differ from YOLOv8's)
YOLO11_P3_WIDTH = {"n": 64, "s": 128, "m": 256, "l": 256, "x": 384}
# Ultralytics' width for the P3 head block at each scale (the BRA input)
P3_WIDTH = {"n": 64, "s": 128, "m": 192, "b": 256, "l": 256, "x": 320}

SEED_003_YAML = """\
# Parameters
nc: 80 # number of classes
scales: # model compound scaling constants, i.e. 'model=yolov8n.yaml' will call yolov8.yaml with scale 'n'
  # [depth, width, max_channels]
  n: [0.33, 0.25, 1024] # YOLOv8n summary: 225 layers, 3157200 parameters, 3157184 gradients, 8.9 GFLOPs
  s: [0.33, 0.50, 1024] # YOLOv8s summary: 225 layers, 11166560 parameters, 11166544 gradients, 28.8 GFLOPs
  m: [0.67, 0.75, 768] # YOLOv8m summary: 295 layers, 25902640 parameters, 25902624 gradients, 79.3 GFLOPs
  l: [1.00, 1.00, 512] # YOLOv8l summary: 365 layers, 43691520 parameters, 43691504 gradients, 165.7 GFLOPs
  x: [1.00, 1.25, 512] # YOLOv8x summary: 365 layers, 68229648 parameters, 68229632 gradients, 258.5 GFLOPs
# YOLOv8.0n backbone
backbone:
# [from, repeats, module, args]
- [-1, 1, Conv, [64, 3, 2]] # 0-P1/2
- [-1, 1, Conv, [128, 3, 2]] # 1-P2/4
- [-1, 3, C2f, [128, True]]
- [-1, 1, Conv, [256, 3, 2]] # 3-P3/8
- [-1, 6, C2f, [256, True]]
- [-1, 1, Conv, [512, 3, 2]] # 5-P4/16
- [-1, 6, C2f, [512, True]]
- [-1, 1, Conv, [1024, 3, 2]] # 7-P5/32
- [-1, 3, C2f, [1024, True]]
- [-1, 1, SPPF, [1024, 5]] # 9
# YOLOv8.0n head
head:
- [-1, 1, nn.Upsample, [None, 2, 'nearest']]
- [[-1, 6], 1, Concat, [1]] # cat backbone P4
- [-1, 3, C2f, [512]] # 12
- [-1, 1, nn.Upsample, [None, 2, 'nearest']]
- [[-1, 4], 1, Concat, [1]] # cat backbone P3
- [-1, 3, C2f, [256]] # 15 (P3/8-small)
- [-1, 1, BiLevelRoutingAttention, []] # 16
- [-1, 1, Conv, [256, 3, 2]]
- [[-1, 12], 1, Concat, [1]] # cat head P4
- [-1, 3, C2f, [512]] # 19 (P4/16-medium)
- [-1, 1, Conv, [512, 3, 2]]
- [[-1, 9], 1, Concat, [1]] # cat head P5
- [-1, 3, C2f, [1024]] # 22 (P5/32-large)
- [[16, 19, 22], 1, Detect, [nc]] # Detect(P3, P4, P5)
"""

SEED_000_YAML = """\
# Parameters
nc: 80 # number of classes
scales: # model compound scaling constants, i.e. 'model=yolov8n.yaml' will call yolov8.yaml with scale 'n'
  # [depth, width, max_channels]
  n: [0.33, 0.25, 1024] 

# YOLOv8.0n backbone
backbone:
  # [from, repeats, module, args]
  - [-1, 1, Conv, [64, 3, 2]] # 0-P1/2
  - [-1, 1, Conv, [128, 3, 2]] # 1-P2/4
  - [-1, 3, C2f, [128, True]]
  - [-1, 1, Conv, [256, 3, 2]] # 3-P3/8
  - [-1, 6, C2f, [256, True]]
  - [-1, 1, SCDown, [512, 3, 2]] # 5-P4/16
  - [-1, 6, C2f, [512, True]]
  - [-1, 1, SCDown, [1024, 3, 2]] # 7-P5/32
  - [-1, 3, C2f, [1024, True]]
  - [-1, 1, SPPF, [1024, 5]] # 9
  - [-1, 1, PSA, [1024]] # 10

# YOLOv8.0n head
head:
  - [-1, 1, nn.Upsample, [None, 2, "nearest"]]
  - [[-1, 6], 1, Concat, [1]] # cat backbone P4
  - [-1, 3, C2f, [512]] # 13

  - [-1, 1, nn.Upsample, [None, 2, "nearest"]]
  - [[-1, 4], 1, Concat, [1]] # cat backbone P3
  - [-1, 3, C2f, [256]] # 16 (P3/8-small)
  - [-1,1,BiLevelRoutingAttention,[]] #17

  - [-1, 1, Conv, [256, 3, 2]]
  - [[-1, 13], 1, Concat, [1]] # cat head P4
  - [-1, 3, C2f, [512]] #20 (P4/16-medium)
  - [-1,1,BiLevelRoutingAttention,[]] #21

  - [-1, 1, SCDown, [512, 3, 2]]
  - [[-1, 10], 1, Concat, [1]] # cat head P5
  - [-1, 3, C2fCIB, [1024, True, True]] # 22 (P5/32-large)

  - [[17, 21, 24], 1, v10Detect, [nc]] # Detect(P3, P4, P5)
"""


def _bra_layers(model):
    return [m for m in model.modules() if isinstance(m, yoloattn.BiLevelRoutingAttention)]


def _attention_layers(model):
    return [m for m in model.model if type(m).__module__ == "yoloattn.yolo.layers"]


def _scale_params():
    for name, scales in SCALES.items():
        for scale in scales:
            marks = [] if scale in "ns" else [pytest.mark.slow]  # every scale builds; m and up in the slow run
            yield pytest.param(name, scale, marks=marks, id=f"{name}-{scale}")


@pytest.mark.parametrize("name,scale", _scale_params())
def test_shipped_yaml_every_scale(name, scale):
    family, rest = name.split("-", 1)
    model = YOLO(f"{family}{scale}-{rest}").model.eval()
    found = _attention_layers(model)
    assert found, [type(m).__name__ for m in model.model]
    seen = []
    hook = found[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    hook.remove()
    if "biformer" not in name:  # the P3 layer is built for the scale's real channel count, not the raw YAML number
        assert seen[0] == (YOLO11_P3_WIDTH[scale] if name.startswith("yolo11") else P3_WIDTH[scale])
    with torch.no_grad():
        for hw in ((64, 64), (32, 96)):  # square and non-square
            out = model(torch.zeros(1, 3, *hw))
            preds = out[0] if isinstance(out, (tuple, list)) else out
            assert torch.isfinite(preds["one2many"]["boxes"] if isinstance(preds, dict) else preds).all()


def test_every_shipped_yaml_is_tested():
    assert shipped_models() == sorted(SCALES)


@pytest.mark.parametrize("text,n_bra", [(SEED_003_YAML, 1), (SEED_000_YAML, 2)], ids=["seed003-v8", "seed000-v10"])
def test_seed_yaml_verbatim_from_user_folder(tmp_path, text, n_bra):
    import ultralytics

    path = tmp_path / "my models" / "yolov8n-BiLevelRoutingAttention.yaml"
    path.parent.mkdir()
    path.write_text(text)
    model = ultralytics.YOLO(str(path)).model.eval()  # stock Ultralytics class, only `import yoloattn` done
    assert [b.dim for b in _bra_layers(model)] == [64, 128][:n_bra]
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))


def test_yaml_positional_arguments(tmp_path):
    text = SEED_003_YAML.replace("BiLevelRoutingAttention, []]", "BiLevelRoutingAttention, [7, 8, None, None, 4, 4, None, 'identity', 2]]")
    path = tmp_path / "yolov8n-args.yaml"
    path.write_text(text)
    (bra,) = _bra_layers(YOLO(str(path)).model)
    assert (bra.dim, bra.n_win, bra.num_heads, bra.topk, bra.kv_downsample_mode) == (64, 7, 8, 2, "identity")


def test_repeated_row_builds(tmp_path):
    path = tmp_path / "yolov8n-rep.yaml"
    path.write_text(SEED_003_YAML.replace("- [-1, 1, BiLevelRoutingAttention, []]", "- [-1, 6, BiLevelRoutingAttention, [7, 4]]"))
    bras = _bra_layers(YOLO(str(path)).model)
    assert len(bras) == 2 and all(b.dim == 64 and b.num_heads == 4 for b in bras)  # 6 x depth 0.33


def test_unknown_layer_names_the_row(tmp_path):
    path = tmp_path / "yolov8n-typo.yaml"
    path.write_text(SEED_003_YAML.replace("BiLevelRoutingAttention, []]", "BiLevelRoutingAtention, []]"))
    with pytest.raises(ValueError, match=r"YAML row 16 names an unknown layer 'BiLevelRoutingAtention'"):
        YOLO(str(path))


def test_bad_bra_arguments_name_the_row(tmp_path):
    path = tmp_path / "yolov8n-bad.yaml"
    path.write_text(SEED_003_YAML.replace("BiLevelRoutingAttention, []]", "BiLevelRoutingAttention, [7, 6]]"))
    with pytest.raises(ValueError, match=r"YAML row 16 \(BiLevelRoutingAttention, from=-1, args=\[7, 6\]\) with input "
                                         r"channels 64: dim=64 and qk_dim=64 must both be divisible by num_heads=6"):
        YOLO(str(path))


def test_ultralytics_names_not_shadowed():
    from ultralytics.nn import tasks
    from ultralytics.nn.modules import PSA

    assert tasks.PSA is PSA
    assert tasks.BiLevelRoutingAttention is layers.BiLevelRoutingAttention


def test_direct_construction_is_plain():
    layer = layers.BiLevelRoutingAttention(32, 7, 4)
    assert (layer.dim, layer.num_heads) == (32, 4)


def test_resolve_model_names():
    assert resolve_model("yolov8n.yaml") == "yolov8n.yaml"  # Ultralytics' own, untouched
    assert resolve_model("yolov8n-bra.yaml").endswith("cfg/yolov8n-bra.yaml")
    assert resolve_model("somewhere/yolov8n-bra.yaml") == "somewhere/yolov8n-bra.yaml"  # a user path stays


def test_model_info_gflops_true_at_imgsz():
    from torch.utils.flop_counter import FlopCounterMode
    from ultralytics.utils.torch_utils import get_flops

    def counted(model, size):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, 3, size, size))
        return counter.get_total_flops() / 1e9

    bra_model, base_model = YOLO("yolov8n-bra.yaml").model.eval(), YOLO("yolov8n.yaml").model.eval()
    reported = bra_model.info(verbose=True, imgsz=640)[3]  # the figure model.info() prints
    assert reported == pytest.approx(get_flops(bra_model, 640))
    assert reported == pytest.approx(counted(bra_model, 640), rel=0.02)
    # the BRA layer's own share, where a 32x32 probe scaled by (640/32)² would be off by up to 8x
    added = reported - get_flops(base_model, 640)
    assert added == pytest.approx(counted(bra_model, 640) - counted(base_model, 640), rel=0.02)
    # and it holds the attention itself: QK^T and PV over 4 routed 12x12 windows for each of 49 windows, 64 channels
    assert added > 2 * 2 * 49 * 144 * (4 * 144) * 64 / 1e9
    assert get_flops(bra_model, 256) == pytest.approx(counted(bra_model, 256), rel=0.02)


def test_transfer_weights_across_shifted_layers():
    import ultralytics

    src = ultralytics.YOLO("yolov8n.yaml").model
    dst = YOLO("yolov8n-bra.yaml").model
    stats = transfer_weights(dst, {"model": src}, verbose=False)
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    n_bra = sum(1 for k in dst_sd if k.startswith("model.16."))
    assert stats["transferred"] == len(src_sd) == len(dst_sd) - n_bra
    assert stats["layer_map"][15] == 15 and stats["layer_map"][16] == 17 and stats["layer_map"][22] == 23
    assert torch.equal(dst_sd["model.23.cv2.0.0.conv.weight"], src_sd["model.22.cv2.0.0.conv.weight"])
    # Ultralytics' own name-based load moves far fewer once a layer is inserted
    from ultralytics.utils.torch_utils import intersect_dicts

    assert len(intersect_dicts(src_sd, ultralytics.YOLO("yolov8n.yaml").model.state_dict())) == len(src_sd)
    assert len(intersect_dicts(src_sd, YOLO("yolov8n-bra.yaml").model.state_dict())) < 0.6 * len(src_sd)


def test_offline_environment():
    import os

    from ultralytics.utils import ONLINE, USER_CONFIG_DIR

    assert os.environ["YOLO_OFFLINE"] == "1" and os.environ["YOLO_AUTOINSTALL"] == "False"
    assert ONLINE is False
    assert (USER_CONFIG_DIR / "Arial.ttf").exists()


def test_safe_globals_registered():
    assert layers.BiLevelRoutingAttention in torch.serialization.get_safe_globals()


def test_existing_ultralytics_name_is_not_shadowed(monkeypatch, caplog):
    import importlib
    import logging

    from ultralytics.nn import tasks

    register_module = importlib.import_module("yoloattn.yolo.register")  # the module, not the function

    sentinel = type("DAttention", (torch.nn.Module,), {})
    monkeypatch.setitem(vars(tasks), "DAttention", sentinel)
    monkeypatch.setattr(register_module, "_done", False)
    with caplog.at_level(logging.WARNING, logger="yoloattn"):
        register_module.register()
    assert tasks.DAttention is sentinel and "already defines 'DAttention'" in caplog.text
