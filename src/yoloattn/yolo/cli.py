"""The ``yoloattn`` command: Ultralytics' ``yolo`` with yoloattn's layers, models and data, plus tools.

``yoloattn`` takes exactly ``yolo``'s syntax (``yoloattn train model=... data=... epochs=...``, ``val``,
``predict``, ``export``, ``track``, ``benchmark``, ``settings``, ``cfg``, ``checks``) and hands over to
Ultralytics' own entry point, which then behaves as the ``yolo`` command does (it saves predictions, prints
"Results saved to", ...). Inside it, ``model=`` names yoloattn's shipped YAMLs by short name
(``yolov8n-bra.yaml``), ``data=shapes`` is the built-in dataset, ``pretrained=some.pt`` transfers every
matching tensor (:func:`yoloattn.transfer_weights`), and every checkpoint is loaded safely
(:mod:`yoloattn.yolo.checkpoints`; ``trusted=True`` for a file you trust).

With no arguments, or ``train`` without ``model=``/``data=``, it runs the main job (:data:`MAIN_JOB`).
Its own commands: ``help``, ``version``, ``ablate``, ``bench``, ``visualize``, ``info`` (see :data:`HELP`).

A user's mistake (a bad argument, a missing file, an unknown model, a bad YAML row, a refused checkpoint)
prints one line and exits with status 2; anything else keeps its traceback. ``YOLOATTN_DEBUG=1`` always shows
the traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from pathlib import Path

__all__ = ["HELP", "MAIN_JOB", "main"]

# The main job: about 5 minutes on 2 CPU cores, YOLOv8n-BRA from scratch on the built-in data's easy level to a
# validation mAP50 above 0.5 (0.66 measured). Any of these can be overridden on the command line.
MAIN_JOB = {
    "model": "yolov8n-bra.yaml",
    "data": "shapes",
    "epochs": 24,
    "imgsz": 160,  # the easy scenes' objects are 19-48 px at 160: small images, more epochs in the same time
    "batch": 8,
    "optimizer": "SGD",
    "lr0": 0.02,
    "warmup_epochs": 0.5,  # Ultralytics' 3 warm-up epochs would be an eighth of the run
    "mosaic": 0.0,  # the generated scenes are varied already; mosaic's quarter-size objects slowed learning
    "close_mosaic": 0,
    "plots": True,
}

HELP = """\
yoloattn: Ultralytics' yolo command with yoloattn's attention layers, models and built-in data.

  yoloattn                         the main job: train {model} on the built-in shapes data (about 5 minutes)
  yoloattn help                    this help;  yoloattn version: versions and the fast CPU kernel on this machine

yoloattn's own commands (key=value arguments, all optional):
  yoloattn ablate models=yolov8n.yaml,yolov8n-bra.yaml seeds=0,1,2 data=data.yaml epochs=100
      train every model with identical settings per seed; paired differences to the first, plots
      (study=reference: the study in docs/results.md, about 1.5 hours on 2 CPU cores;
       study=layers: every layer, 6 epochs, 2 seeds, docs/layers.md, about 1.3 hours)
  yoloattn bench layers=bra,dat,conv3x3 maps=P3,P4,P5 batches=1 models=yolov8n.yaml,yolov8n-bra.yaml
      layer and whole-model speed and memory (every backend and CPU build), with a chart
  yoloattn visualize model=best.pt source=img.jpg point=320,240
      where BRA routes and where DAT samples, drawn over the image
  yoloattn info model=yolov8n-bra.yaml imgsz=640
      layer table, parameters, GFLOPs at imgsz and the attention layers a model holds
  yoloattn insert model=yolo11n.yaml layer=BiLevelRoutingAttention at=p3 topk=8
      write the model's YAML with the layer inserted (at=p3,p4,p5,head,backbone-p4,backbone,<row>), every
      later index renumbered; extra key=value pairs are the layer's keywords

Ultralytics' modes take yolo's syntax and behave as under yolo (see `yolo help`):
  yoloattn train model=yolov8s-bra.yaml data=data.yaml epochs=100 imgsz=640
  yoloattn val model=best.pt data=data.yaml     yoloattn predict model=best.pt source=img.jpg
  yoloattn export model=best.pt format=onnx     yoloattn train resume=runs/detect/train/weights/last.pt
  model= also takes yoloattn's shipped YAMLs by short name; data=shapes is the built-in dataset;
  pretrained=x.pt transfers every matching tensor; trusted=True loads a checkpoint without the safe check.

Docs: the README of yoloattn; errors print one line (YOLOATTN_DEBUG=1 shows the traceback).
"""

_OWN_COMMANDS = ("ablate", "bench", "visualize", "info", "insert")
# exceptions a user's mistake raises (from yoloattn's checks or Ultralytics' argument/data/file checks)
_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, SyntaxError, KeyError)
_USER_ERROR_SOURCES = ("yoloattn", "ultralytics")


class UsageError(ValueError):
    """A mistake on the yoloattn command line."""


def _key_values(args: list[str]) -> dict:
    """``key=value`` arguments as Ultralytics reads them (numbers, booleans and None parsed); an empty value
    (``models=``) stays an empty string."""
    from ultralytics.cfg import smart_value

    out = {}
    for arg in args:
        if "=" not in arg:
            continue
        key, value = (part.strip() for part in arg.split("=", 1))
        if not key:
            raise UsageError(f"argument {arg!r} has no key; write key=value")
        out[key] = smart_value(value) if value else ""
    return out


@contextlib.contextmanager
def _as_yolo_command(args: list[str]):
    """Ultralytics' entry point builds ``yoloattn.YOLO``, and sees itself run as ``yolo`` (it checks the program
    name, e.g. to save predictions by default)."""
    import ultralytics
    from ultralytics.utils import ARGV

    from .model import YOLO

    saved_argv, saved_yolo = ARGV[:], ultralytics.YOLO
    program = str(Path(ARGV[0] if ARGV and ARGV[0] else "yolo").with_name("yolo"))
    ARGV[:] = [program, *args]  # Ultralytics reads this list (it is sys.argv)
    ultralytics.YOLO = YOLO
    try:
        yield
    finally:
        ARGV[:] = saved_argv
        ultralytics.YOLO = saved_yolo


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
    # one annotated prediction of a validation image, so the result can be seen
    from ultralytics.data.utils import check_det_dataset

    val_dir = Path(check_det_dataset(str(trainer.args.data))["val"])
    image = sorted(p for p in val_dir.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[0]
    result = YOLO(str(trainer.best))(str(image), imgsz=overrides["imgsz"], verbose=False)[0]
    picture = Path(trainer.save_dir) / f"prediction_{image.stem}.png"
    result.save(filename=str(picture))
    print(f"\nyoloattn main job: {model_name} on {overrides['data']}, {overrides['epochs']} epochs at imgsz "
          f"{overrides['imgsz']} -> validation mAP50 {float(metrics.box.map50):.4f}, mAP50-95 {final:.4f}\n"
          f"weights: {trainer.best}\nprediction: {picture} ({len(result.boxes)} objects found in {image.name})")
    return final


def _check_options(command: str, options: dict, allowed: set) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise UsageError(f"yoloattn {command} does not take {', '.join(unknown)}; it takes {', '.join(sorted(allowed))}")


def _ablate(options: dict) -> None:
    from .ablate import ablate

    ablate(**options)


def _bench(options: dict) -> None:
    from ..bench.report import bench

    bench(**options)


def _visualize(options: dict) -> None:
    import inspect

    from .visualize import visualize

    _check_options("visualize", options, set(inspect.signature(visualize).parameters))
    visualize(**options)


def _insert(options: dict) -> None:
    """``yoloattn insert model=... layer=... at=...``: every other key=value is a keyword of the layer."""
    from .insert import insert

    for key in ("model", "layer"):
        if key not in options:
            raise UsageError(f"yoloattn insert needs {key}=, e.g. yoloattn insert model=yolo11n.yaml "
                             "layer=BiLevelRoutingAttention at=p3")
    own = {k: options.pop(k) for k in ("model", "layer", "at", "out", "scale") if k in options}
    insert(own["model"], own["layer"], own.get("at", "p3"), own.get("out"), own.get("scale"), **options)


def _info(options: dict) -> None:
    """Model summary (layers, parameters, GFLOPs at ``imgsz``) and the yoloattn layers it holds."""
    from ultralytics.utils import LOGGER

    from .model import YOLO

    _check_options("info", options, {"model", "imgsz", "detailed", "trusted"})
    model = YOLO(options.get("model", MAIN_JOB["model"]), trusted=options.get("trusted"))
    model.info(detailed=bool(options.get("detailed", False)), verbose=True, imgsz=int(options.get("imgsz", 640)))
    for i, layer in enumerate(model.model.model):
        if type(layer).__module__.startswith("yoloattn."):
            LOGGER.info(f"  layer {i}: {type(layer).__name__}({layer.extra_repr()})")


def version_text() -> str:
    """yoloattn's version, the versions it runs with, and which routed-attention backend runs on this machine."""
    import platform

    import torch

    from .. import __version__
    from ..nn.functional import routed_attention_cpu as cpu
    from ..nn.functional.depthwise_conv import kernel_info as depthwise_kernel_info
    from ..nn.functional.routed_attention import _AUTOTUNE, _TUNER, _candidates
    from .compat import installed_version

    lines = [f"yoloattn {__version__}",
             f"torch {torch.__version__} ({torch.get_num_threads()} threads), ultralytics {installed_version()}, "
             f"python {platform.python_version()}, {platform.machine()}"]
    info = cpu.build_info()
    if not info["available"]:
        lines.append(f"BRA CPU kernel: unavailable ({info['reason']}); BRA runs its sdpa backend on the CPU")
        return "\n".join(lines)
    lines.append(f"BRA CPU kernel: built for -march={info['march']} ({info['isa']}, {info['lanes']} floats per vector)")
    # YOLOv8n's P3 at 640: 49 windows of 12x12 queries over 4 routed windows, 8 heads of 8 channels
    for training, mode in ((0, "inference"), (1, "training")):
        key = (training, 1, 49, 12, 12, 144, 4, 8, 64, 64, torch.get_num_threads())
        if not _AUTOTUNE:
            lines.append(f"  {mode} at YOLOv8n's P3: cpu (YOLOATTN_AUTOTUNE=0: the kernel wherever it can run)")
            continue
        record = _TUNER.choose(info["build_id"], ",".join(map(str, key)), _candidates(key))
        ms = ", ".join(f"{name} {value:.2f} ms" for name, value in record["ms"].items())
        lines.append(f"  {mode} at YOLOv8n's P3: {record['winner']} (measured once on this machine: {ms})")
    dw = depthwise_kernel_info()
    lines.append(f"LePE depthwise-conv gradient kernel: built for -march={dw['march']} ({dw['isa']})" if dw["available"]
                 else f"LePE depthwise-conv gradient kernel: unavailable ({dw['reason']}); PyTorch's backward runs")
    return "\n".join(lines)


def _dispatch(args: list[str]) -> int:
    if args and args[0] in ("help", "--help", "-h"):
        print(HELP.format(model=MAIN_JOB["model"]))
        return 0
    if args and args[0] in ("version", "--version", "-V"):
        print(version_text())
        return 0
    # trusted=True: the user vouches for the checkpoints of this run (Ultralytics has no such argument)
    trusted = [a for a in args if a.split("=", 1)[0] == "trusted"]
    if trusted:
        args = [a for a in args if a not in trusted]
        value = _key_values(trusted[-1:]).get("trusted")
        if not isinstance(value, bool):
            raise UsageError(f"trusted must be True or False, got {trusted[-1]!r}")
        os.environ["YOLOATTN_TRUST_CHECKPOINTS"] = "1" if value else "0"

    from .register import register

    register()
    if args and args[0] in _OWN_COMMANDS:
        options = _key_values(args[1:])
        positional = [a for a in args[1:] if "=" not in a]
        if positional:
            raise UsageError(f"yoloattn {args[0]} takes key=value arguments, got {' '.join(positional)}")
        {"ablate": _ablate, "bench": _bench, "visualize": _visualize, "info": _info, "insert": _insert}[args[0]](options)
        return 0
    positional = [a for a in args if "=" not in a]
    keys = _key_values(args) if args else {}
    if isinstance(keys.get("resume"), str) and "model" not in keys:
        args = [*args, f"model={keys['resume']}"]  # `resume=last.pt` names the checkpoint (yolo would fetch a default)
        keys["model"] = keys["resume"]
    if not args or (positional[:1] == ["train"] and ("model" not in keys or "data" not in keys)
                     and not keys.get("resume")):
        if positional[:1] == ["train"] and "data" in keys:  # a user dataset: only the model is defaulted
            args = [*args, f"model={MAIN_JOB['model']}"]
        else:
            run_main_job([a for a in args if "=" in a])
            return 0
    from ultralytics.cfg import entrypoint

    with _as_yolo_command(args):
        entrypoint()
    return 0


def _is_user_error(error: BaseException) -> bool:
    """A mistake to report in one line: an argument/file/configuration error raised by yoloattn's or Ultralytics'
    own checks (an error from inside PyTorch or elsewhere is a crash and keeps its traceback)."""
    from ..nn.backends import BackendUnavailableError
    from .compat import UnsupportedUltralyticsError

    if isinstance(error, (BackendUnavailableError, UnsupportedUltralyticsError)):
        return True
    if isinstance(error, RuntimeError) and error.__cause__ is not None and _raised_by_checks(error):
        return _is_user_error(error.__cause__)  # Ultralytics wraps a dataset's missing file in a RuntimeError
    return isinstance(error, _USER_ERRORS) and _raised_by_checks(error)


def _raised_by_checks(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    origin = frames[-1].filename if frames else ""
    return any(f"{os.sep}{package}{os.sep}" in origin for package in _USER_ERROR_SOURCES)


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    if isinstance(error, KeyError):
        text = f"unknown name {text}"
    return text


def main(argv: list[str] | None = None) -> int:
    """Run the ``yoloattn`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    logger = logging.getLogger("yoloattn")
    if not logger.handlers:  # show yoloattn's own notes on the console, as Ultralytics shows its own
        logger.addHandler(logging.StreamHandler())
        logger.setLevel(logging.INFO)
    try:
        return _dispatch(args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:  # noqa: BLE001 - reported below, or re-raised with its traceback
        debug = os.environ.get("YOLOATTN_DEBUG", "").strip().lower() in ("1", "true", "yes")
        if debug or not _is_user_error(error):
            raise
        print(f"yoloattn: error: {_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
