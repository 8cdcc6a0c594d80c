"""``yoloattn insert``: put a layer into any model YAML and renumber everything after it.

Inserting a row into an Ultralytics model YAML shifts every later layer index, so every later ``from``
(Concat sources, the head's inputs) must be renumbered by hand; one index left unchanged wires a layer to
the wrong feature map. :func:`insert` does it: the new layer sits on the output of the row it follows, so
every later layer that read that row now reads the new layer (as the BRA layer after YOLOv8's P3 block feeds
both the P3 detection input and the downsampling conv), and every other reference is renumbered.

Positions (``at=``, several allowed, comma-separated):

- ``p3``, ``p4``, ``p5`` (also ``p2``, ``p6``): the rows the head reads (Detect/Segment/Pose/OBB/RT-DETR
  inputs), by stride; ``head`` for all of them;
- ``backbone-p3`` ... ``backbone-p5``: the last backbone row at that stride; ``backbone`` its last row
  (classification models: before ``Classify``);
- a row index: after that row.

The result is built (at scale ``scale`` or the name's), its layer table printed with the inserted rows marked,
and its GFLOPs compared with the original's; a placement that cannot build is refused with the reason.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

__all__ = ["insert", "insert_rows", "stock_yaml"]

_HEADS = ("Detect", "Segment", "Pose", "OBB", "v10Detect", "WorldDetect", "YOLOEDetect", "YOLOESegment", "RTDETRDecoder",
          "Segment26", "Pose26", "OBB26", "YOLOESegment26")


def stock_yaml(model) -> tuple[dict, str]:
    """A model YAML (yoloattn's shipped short names, Ultralytics' own names, or a path) as a dict, and its stem."""
    from ultralytics.nn.tasks import yaml_model_load

    from .model import resolve_model

    resolved = str(resolve_model(model))
    d = yaml_model_load(resolved)
    stem = Path(str(model)).stem
    return d, stem


def _rows(d: dict) -> list[list]:
    return [list(r) for r in (d.get("backbone") or [])] + [list(r) for r in (d.get("head") or [])]


def _absolute(f, i: int):
    """A row's ``from`` with relative (negative) indices made absolute."""
    if isinstance(f, int):
        return f if f >= 0 else i + f
    return [x if x >= 0 else i + x for x in f]


def _strides(d: dict) -> list[int]:
    """Each row's output stride, from a forward pass of the model built at its smallest scale."""
    import torch
    from ultralytics.nn.tasks import guess_model_task

    d = copy.deepcopy(d)
    task = guess_model_task(d)
    model = _build(d, task)
    size = 224 if task == "classify" else 256
    strides, hooks = [], []
    for layer in model.model:
        hooks.append(layer.register_forward_hook(
            lambda m, inp, out: strides.append(size // out.shape[-1] if isinstance(out, torch.Tensor) and out.dim() == 4
                                               else 0)))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, d.get("channels", 3), size, size))
    finally:
        for h in hooks:
            h.remove()
    return strides


def _build(d: dict, task: str):
    from ultralytics.nn import tasks

    from .register import register

    register()
    classes = {"detect": tasks.DetectionModel, "segment": tasks.SegmentationModel, "pose": tasks.PoseModel,
               "obb": tasks.OBBModel, "classify": tasks.ClassificationModel}
    head = d["head"][-1][2] if d.get("head") else None
    if head == "RTDETRDecoder":
        task, classes = "detect", {"detect": tasks.RTDETRDetectionModel}
    if task not in classes:
        raise ValueError(f"yoloattn insert supports the tasks {sorted(classes)} and RT-DETR; this model's task "
                         f"could not be told from its last row ({head})")
    d = copy.deepcopy(d)
    d.pop("yaml_file", None)
    return classes[task](d, verbose=False)


def _positions(d: dict, at, strides: list[int] | None) -> list[int]:
    """Row indices after which to insert, for the ``at=`` spec."""
    rows = _rows(d)
    n_backbone = len(d.get("backbone") or [])
    head_row = next((i for i in range(len(rows) - 1, -1, -1) if rows[i][2] in _HEADS), None)
    specs = [s.strip().lower() for s in (at if isinstance(at, (list, tuple)) else str(at).split(",")) if str(s).strip()]
    if not specs:
        raise ValueError("at= needs a position: p3, p4, p5, head, backbone-p3 ... backbone-p5, backbone, or a row index")
    out = []
    for spec in specs:
        if re.fullmatch(r"-?\d+", spec):
            k = int(spec)
            if not 0 <= k < len(rows):
                raise ValueError(f"at={spec}: the model has rows 0..{len(rows) - 1}")
            out.append(k)
            continue
        match = re.fullmatch(r"(backbone-)?p([2-6])", spec)
        if spec in ("head", "p3", "p4", "p5", "p2", "p6") or (match and not match.group(1)):
            if head_row is None:
                raise ValueError(f"at={spec}: this model has no detection-style head (its last row is {rows[-1][2]}); "
                                 "use backbone, backbone-p3 ... or a row index")
            inputs = _absolute(rows[head_row][0], head_row)
            inputs = inputs if isinstance(inputs, list) else [inputs]
            if strides is None:
                strides = _strides(d)
            if spec == "head":
                out += inputs
                continue
            want = 2 ** int(match.group(2))
            found = [i for i in inputs if strides[i] == want]
            if not found:
                raise ValueError(f"at={spec}: the head reads strides {[strides[i] for i in inputs]}, not {want}")
            out.append(found[0])
        elif spec == "backbone":
            out.append(n_backbone - 1)
        elif match and match.group(1):
            if strides is None:
                strides = _strides(d)
            want = 2 ** int(match.group(2))
            found = [i for i in range(n_backbone) if strides[i] == want]
            if not found:
                raise ValueError(f"at={spec}: no backbone row has stride {want} (strides: {strides[:n_backbone]})")
            out.append(found[-1])
        else:
            raise ValueError(f"unknown position at={spec!r}; use p3, p4, p5, head, backbone-p3 ... backbone-p5, "
                             "backbone, or a row index")
    if len(set(out)) != len(out):
        raise ValueError(f"at={at!r} names row(s) {sorted(k for k in set(out) if out.count(k) > 1)} twice")
    return sorted(out)


def insert_rows(d: dict, after: list[int], layer: str, args: list) -> tuple[dict, list[int], dict[int, int]]:
    """``d`` with ``[k, 1, layer, args]`` inserted after every row k of ``after`` (original indices).

    Returns:
        the new model dict, the new rows' indices, and original index -> new index of every original row.
    """
    rows = _rows(d)
    n_backbone = len(d.get("backbone") or [])
    after = sorted(after)
    new_index, shift = {}, 0
    for i in range(len(rows)):
        new_index[i] = i + shift
        if i in after:
            shift += 1
    inserted_at = {k: new_index[k] + 1 for k in after}  # the inserted row that sits on row k's output
    out_rows = []
    for i, (f, n, m, a) in enumerate(rows):
        src = _absolute(f, i)
        me = new_index[i]

        def remap(s, relative, me=me):
            if s < 0:  # the model's input
                return -1
            s = inserted_at[s] if s in inserted_at else new_index[s]  # readers of row k read the new layer
            return -1 if relative and s == me - 1 else s  # -1 stays -1 where it still means the row before

        if isinstance(src, int):
            new_from = remap(src, f < 0)
        else:
            new_from = [remap(s, orig < 0) for s, orig in zip(src, f)]
        out_rows.append([new_from, n, m, a])
        if i in after:
            out_rows.append([-1, 1, layer, copy.deepcopy(args)])
    n_backbone_new = n_backbone + sum(1 for k in after if k < n_backbone)
    # an insertion after the last backbone row belongs to the backbone
    result = {k: v for k, v in d.items() if k not in ("backbone", "head", "yaml_file")}
    result["backbone"], result["head"] = out_rows[:n_backbone_new], out_rows[n_backbone_new:]
    return result, sorted(inserted_at.values()), new_index


def _format_args(value) -> str:
    """A YAML flow-style rendering of a row field, as Ultralytics writes its YAMLs."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_format_args(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format_args(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and not re.fullmatch(r"[A-Za-z_][\w.]*", value):
        return repr(value)
    return str(value)


def _dump(d: dict, source: str, layer: str, positions: list[int], inserted: list[int], why: str,
          note: str | None = None) -> str:
    lines = [f"# {source} with {layer} inserted by yoloattn insert ({why}).",
             f"# Inserted rows: {', '.join(map(str, inserted))}; every later `from` index, Concat source and head input",
             "# is renumbered, and the layers that read the row before an inserted one now read the inserted layer.",
             *(f"# {line}".rstrip() for line in (note or "").splitlines()),
             "# The scale comes from the file name, as for Ultralytics' YAMLs (yolov8n-... is scale n).", ""]
    for key, value in d.items():
        if key in ("backbone", "head"):
            continue
        if key == "scale":  # Ultralytics takes the scale from the file name (yolo11n-...), not from the file
            continue
        if key == "scales":
            lines.append("scales:")
            lines += [f"  {k}: {_format_args(v)}" for k, v in value.items()]
        else:
            lines.append(f"{key}: {_format_args(value)}")
    index = 0
    for part in ("backbone", "head"):
        lines += ["", f"{part}:"]
        for f, n, m, a in d[part]:
            note = f"  # {index} <- inserted by yoloattn" if index in inserted else f"  # {index}"
            lines.append(f"  - [{_format_args(f)}, {n}, {m}, {_format_args(a)}]{note}")
            index += 1
    return "\n".join(lines) + "\n"


def insert(model, layer: str = "BiLevelRoutingAttention", at="p3", out=None, scale: str | None = None,
           verbose: bool = True, note: str | None = None, **layer_kwargs) -> Path:
    """Write ``model``'s YAML with ``layer`` inserted at ``at``, every later index renumbered; returns the file.

    Args:
        model: a model YAML: yoloattn's shipped names, Ultralytics' own (``yolo11n.yaml``, ``yolov8s-seg.yaml``), a path.
        layer: a layer name a YAML row can use (yoloattn's or Ultralytics').
        at: position(s), see the module docstring.
        out: output file (default: ``<model stem>-<layer>.yaml`` in the current directory).
        scale: the scale to build and report at (default: the name's, e.g. ``n`` in ``yolo11n``, else the first).
        verbose: print the layer table (inserted rows marked) and the GFLOPs before and after.
        note: comment lines for the file's header (why the layer sits there, say).
        **layer_kwargs: the layer's keyword arguments (written as the row's mapping).
    """
    from ultralytics.nn import tasks
    from ultralytics.nn.tasks import guess_model_task
    from ultralytics.utils import LOGGER
    from ultralytics.utils.torch_utils import get_flops

    from .layers import YAML_LAYERS
    from .register import register

    register()
    if not isinstance(layer, str) or not (layer in vars(tasks) or layer in YAML_LAYERS):
        raise ValueError(f"layer={layer!r} is not a layer a YAML row can name; yoloattn's are {sorted(YAML_LAYERS)}")
    d, stem = stock_yaml(model)
    if scale is not None:
        if scale not in (d.get("scales") or {}):
            raise ValueError(f"scale={scale!r}: {stem} has the scales {sorted(d.get('scales') or {})}")
        d["scale"] = scale
    elif not d.get("scale") and d.get("scales"):
        d["scale"] = next(iter(d["scales"]))
    task = guess_model_task(d)
    positions = _positions(d, at, None)
    args = [dict(layer_kwargs)] if layer_kwargs else []
    new, inserted, _ = insert_rows(d, positions, layer, args)
    try:
        built = _build(new, task)
    except Exception as e:  # noqa: BLE001 - reported as the reason the placement cannot build
        raise ValueError(f"{layer} at {at} of {stem} does not build: {str(e).strip().splitlines()[0]}") from e
    original = _build(d, task)
    from .model import LAYER_SHORT_NAMES

    short = {v: k for k, v in LAYER_SHORT_NAMES.items()}.get(layer, layer.lower())
    path = Path(out) if out is not None else Path.cwd() / f"{stem}-{short}.yaml"
    text = _dump(new, f"{stem} ({Path(d.get('yaml_file', stem)).name})", layer, positions, inserted, f"at={at}", note)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if verbose:
        size = 224 if task == "classify" else 640
        LOGGER.info(f"{'':>3}{'from':>20}{'n':>3}{'params':>10}  {'module':<45}{'arguments'}")
        for i, m in enumerate(built.model):
            mark = "  <- inserted" if i in inserted else ""
            LOGGER.info(f"{i:>3}{str(m.f):>20}{'':>3}{m.np:10.0f}  {m.type:<45}{mark}")
        before, after = get_flops(original, size), get_flops(built, size)
        LOGGER.info(f"yoloattn insert: {layer} at {at} of {stem}: rows {inserted}; GFLOPs at {size}: {before:.2f} -> "
                    f"{after:.2f}; written to {path}")
    return path
