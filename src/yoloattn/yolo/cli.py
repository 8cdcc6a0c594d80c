"""The ``yoloattn`` command: Ultralytics' ``yolo`` with yoloattn's layers, models and data.

``yoloattn`` accepts exactly ``yolo``'s syntax (``yoloattn train model=... data=... epochs=...``,
``val``, ``predict``, ``export``, ``info``, ``settings``, ...) and hands over to Ultralytics'
own entry point after registering the layers. Inside it, ``model=`` names yoloattn's shipped
YAMLs by short name (``yolov8n-bra.yaml``), ``data=shapes`` is the built-in dataset, and
``pretrained=some.pt`` transfers every matching tensor (:func:`yoloattn.transfer_weights`).

With no arguments, or ``train`` without ``model=``/``data=``, it runs the main job: train
``yolov8n-bra.yaml`` on the built-in ``shapes`` data with settings that finish in a few minutes
on a 2-core CPU, then print the final mAP50-95.

Commands of its own:

- ``yoloattn ablate models=a.yaml,b.yaml seeds=0,1,2 data=... [train args]``: a fair comparison
  (:mod:`yoloattn.yolo.ablate`);
- ``yoloattn bench [layers=bra,dat,conv3x3 maps=P3,P4,P5 batches=1 models=... imgsz=640 device=cpu]``:
  speed and memory tables and a chart (:mod:`yoloattn.bench.report`);
- ``yoloattn visualize model=best.pt source=img.jpg [point=x,y imgsz=640 out=dir]``: where BRA routes
  and where DAT samples (:mod:`yoloattn.yolo.visualize`);
- ``yoloattn info model=yolov8n-bra.yaml [imgsz=640 detailed=True]``: the model summary with GFLOPs at
  ``imgsz`` and the attention layers it holds (``yolo`` has no ``info`` mode).
"""

from __future__ import annotations

import contextlib
import logging
import sys

__all__ = ["MAIN_JOB", "main"]

# The main job: a few minutes on 2 CPU cores. Any of these can be overridden on the command line.
MAIN_JOB = {
    "model": "yolov8n-bra.yaml",
    "data": "shapes",
    "epochs": 10,
    "imgsz": 256,
    "batch": 8,  # twice the steps of batch 16 for the same compute: a from-scratch model learns sooner
    "optimizer": "SGD",
    "lr0": 0.02,
    "warmup_epochs": 0.5,  # Ultralytics' 3 warm-up epochs would be a third of the run
    "close_mosaic": 3,
    "plots": True,
}


def _key_values(args: list[str]) -> dict:
    from ultralytics.cfg import parse_key_value_pair

    return dict(parse_key_value_pair(a) for a in args if "=" in a)


@contextlib.contextmanager
def _yoloattn_yolo_class():
    """Let Ultralytics' entry point build ``yoloattn.YOLO`` (it imports ``YOLO`` from the package)."""
    import ultralytics

    from .model import YOLO

    original = ultralytics.YOLO
    ultralytics.YOLO = YOLO
    try:
        yield
    finally:
        ultralytics.YOLO = original


def run_main_job(args: list[str]) -> float:
    """Train with :data:`MAIN_JOB` plus the ``key=value`` overrides in ``args``; print and return mAP50-95."""
    from ultralytics.cfg import DEFAULT_CFG_DICT, check_dict_alignment

    from .model import YOLO

    overrides = {**MAIN_JOB, **_key_values(args)}
    overrides.pop("mode", None)
    model_name = overrides.pop("model")
    check_dict_alignment(DEFAULT_CFG_DICT, overrides)
    model = YOLO(model_name)
    metrics = model.train(**overrides)
    trainer = model.trainer
    final = float(metrics.box.map) if metrics is not None else float("nan")
    print(f"\nyoloattn main job: {model_name} on {overrides['data']}, {overrides['epochs']} epochs at imgsz "
          f"{overrides['imgsz']} -> mAP50-95 {final:.4f}, mAP50 {float(metrics.box.map50):.4f}\n"
          f"weights: {trainer.best}")
    return final


def _ablate(options: dict) -> None:
    from .ablate import ablate

    ablate(**options)


def _bench(options: dict) -> None:
    """Layer table (BRA, DAT, 3x3 conv: reference vs fast) and model table, plus a PNG chart."""
    from ..bench.report import bench

    bench(**options)


def _visualize(options: dict) -> None:
    from .visualize import visualize

    allowed = {"model", "source", "imgsz", "point", "out"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"yoloattn visualize does not take {unknown}; it takes {sorted(allowed)}")
    visualize(**options)


def _info(options: dict) -> None:
    """Model summary (layers, parameters, GFLOPs at ``imgsz``) and the yoloattn layers it holds."""
    from ultralytics.utils import LOGGER

    from .model import YOLO

    allowed = {"model", "imgsz", "detailed"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"yoloattn info does not take {unknown}; it takes {sorted(allowed)}")
    model = YOLO(options.get("model", MAIN_JOB["model"]))
    model.info(detailed=bool(options.get("detailed", False)), verbose=True, imgsz=int(options.get("imgsz", 640)))
    for i, layer in enumerate(model.model.model):
        if type(layer).__module__ == "yoloattn.yolo.layers":
            LOGGER.info(f"  layer {i}: {type(layer).__name__}({layer.extra_repr()})")


SUBCOMMANDS = {"ablate": _ablate, "bench": _bench, "info": _info, "visualize": _visualize}


def main(argv: list[str] | None = None) -> int:
    """Run the ``yoloattn`` command with ``argv`` (default: ``sys.argv[1:]``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    logger = logging.getLogger("yoloattn")
    if not logger.handlers:  # show yoloattn's own notes (e.g. a fast path declining) on the console
        logger.addHandler(logging.StreamHandler())
        logger.setLevel(logging.INFO)
    from .register import register

    register()
    if args and args[0] in SUBCOMMANDS:
        SUBCOMMANDS[args[0]](_key_values(args[1:]))
        return 0
    positional = [a for a in args if "=" not in a]
    keys = _key_values(args) if args else {}
    if isinstance(keys.get("resume"), str) and "model" not in keys:
        args = [*args, f"model={keys['resume']}"]  # `resume=last.pt` names the checkpoint (yolo would fetch yolo26n.pt)
        keys["model"] = keys["resume"]
    if not args or (positional[:1] == ["train"] and ("model" not in keys or "data" not in keys)
                     and not keys.get("resume")):
        if positional[:1] == ["train"] and "data" in keys:  # a user dataset: only the model is defaulted
            args = [*args, f"model={MAIN_JOB['model']}"]
        else:
            run_main_job([a for a in args if "=" in a])
            return 0
    from ultralytics.cfg import entrypoint
    from ultralytics.utils import ARGV

    saved = ARGV[:]
    ARGV[:] = ["yoloattn", *args]  # Ultralytics reads the process' argv list
    try:
        with _yoloattn_yolo_class():
            entrypoint()
    finally:
        ARGV[:] = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
