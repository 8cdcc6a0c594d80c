"""``yoloattn bench``: the layer and whole-model tables behind one command, with a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["bench", "chart"]


def _csv_list(value, cast=str) -> list:
    if isinstance(value, (list, tuple)):
        return [cast(v) for v in value]
    return [cast(v) for v in str(value).split(",") if str(v).strip()]


def chart(layer_rows: list[dict], model_rows: list[dict], machine: str):
    """Left: forward and forward+backward ms of every layer backend (horizontal bars, one line per row); right:
    each model's inference latency and training-step time relative to the first model. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in (layer_rows, model_rows) if p]
    height = max(4.0, 0.32 * max(len(layer_rows), 2 * len({r["model"] for r in model_rows})) + 1.8)
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), height), squeeze=False, layout="constrained")
    axes = list(axes[0])
    if layer_rows:
        ax = axes.pop(0)
        labels = [f"{r['layer']} {r['map']} b{r['shape'][0]}  {r['backend']}" for r in layer_rows]
        ys = range(len(layer_rows))
        ax.barh([y + 0.2 for y in ys], [r["fwd_ms"] for r in layer_rows], height=0.4, label="forward", color="#1f77b4")
        ax.barh([y - 0.2 for y in ys], [r["fwdbwd_ms"] for r in layer_rows], height=0.4, label="forward+backward",
                color="#ff7f0e")
        ax.set_yticks(list(ys))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("ms (median, log scale)")
        ax.set_title("layers", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(axis="x", alpha=0.3)
    if model_rows:
        ax = axes.pop(0)
        labels = [f"{r['model'].replace('.yaml', '')}  {r['mode']} {r['batch']}×{r['imgsz']}" for r in model_rows]
        ys = range(len(model_rows))
        colours = ["#2ca02c" if r["mode"] == "inference" else "#9467bd" for r in model_rows]
        ax.barh(list(ys), [r["ratio"] for r in model_rows], color=colours)
        for y, r in zip(ys, model_rows):
            ax.annotate(f"{r['ms']:.0f} ms", (r["ratio"], y), xytext=(3, 0), textcoords="offset points", va="center",
                        fontsize=7)
        ax.axvline(1.0, color="grey", lw=1)
        ax.set_yticks(list(ys))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, max(r["ratio"] for r in model_rows) * 1.25)
        ax.set_xlabel(f"time relative to {model_rows[0]['model'].replace('.yaml', '')}")
        ax.set_title("whole models (green: inference, purple: training step)", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(machine, fontsize=8)
    return fig


def bench(layers="bra,dat,conv3x3", maps="P3,P4,P5", batches="1", models="yolov8n.yaml,yolov8n-bra.yaml,yolov8n-dat.yaml",
          imgsz=640, train="8x320", device="cpu", dtype="float32", threads=2, build=None, memory=True,
          out="runs/bench") -> dict:
    """Run the layer benchmark and the model benchmark, print both tables, write JSON and a PNG chart.

    Args:
        layers, maps, batches: the layer table's rows (see ``python -m yoloattn.bench.layers --help``);
            ``layers=`` (empty) skips it.
        models, imgsz: the model table's rows, inference at ``imgsz``; ``models=`` (empty) skips it.
        train: training steps as ``BATCHxIMGSZ`` (comma-separated), ``train=`` (empty) skips them.
        device, dtype, threads: where and how to measure.
        build: the CPU kernel's ``-march`` target for the model table (e.g. ``x86-64-v3``); default native.
        memory: also measure each layer backend's peak memory (a fresh process per row).
        out: directory for ``bench.json`` and ``bench.png``.
    """
    from .layers import run_layer_benchmark
    from .measure import machine_info, machine_line
    from .models import parse_train_shapes, run_model_benchmark
    from .._plots import save

    layer_list, model_list = _csv_list(layers), _csv_list(models)
    if not layer_list and not model_list:
        raise ValueError("yoloattn bench needs at least one of layers= or models=")
    train_shapes = parse_train_shapes(",".join(_csv_list(train))) if _csv_list(train) else []
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    layer_rows = (run_layer_benchmark(layer_list, _csv_list(maps), _csv_list(batches, int), device, dtype, int(threads),
                                      memory=bool(memory)) if layer_list else [])
    modes = ["inference", *(["train"] if train_shapes else [])]
    model_rows = (run_model_benchmark(model_list, int(imgsz), device, int(threads), modes=modes,
                                      train_shapes=train_shapes, build=build) if model_list else [])
    machine = machine_line(machine_info(device))
    (out_dir / "bench.json").write_text(json.dumps({"machine": machine, "layers": layer_rows, "models": model_rows},
                                                   indent=2))
    path = save(chart(layer_rows, model_rows, machine), out_dir / "bench.png")
    print(f"tables: {out_dir / 'bench.json'}; chart: {path}")
    return {"layers": layer_rows, "models": model_rows, "chart": path}
