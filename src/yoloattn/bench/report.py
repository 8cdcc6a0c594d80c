"""``yoloattn bench``: the layer and model speed tables behind one command, with a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["bench"]


def _csv_list(value, cast=str) -> list:
    if isinstance(value, (list, tuple)):
        return [cast(v) for v in value]
    return [cast(v) for v in str(value).split(",") if str(v).strip()]


def _chart(layer_rows: list[dict], model_rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if model_rows else 1, figsize=(12 if model_rows else 7, 4.5), dpi=120, squeeze=False)
    ax = axes[0][0]
    labels, ref_ms, fast_ms = [], [], []
    for r in layer_rows:
        labels.append(f"{r['layer']}\n{r['shape'][0]}x{r['shape'][1]}x{r['shape'][2]}x{r['shape'][3]}")
        ref_ms.append(r["ref"]["fwd_ms"] if r.get("ref") else 0.0)
        fast_ms.append(r["fast"]["fwd_ms"])
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], ref_ms, width=0.4, label="reference", color="#999999")
    ax.bar([x + 0.2 for x in xs], fast_ms, width=0.4, label="fast", color="#1f77b4")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("forward ms (median)")
    ax.set_yscale("log")
    ax.set_title(f"layers ({layer_rows[0]['device']}, {layer_rows[0]['threads']} threads)" if layer_rows else "layers")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    if model_rows:
        ax = axes[0][1]
        names = [r["model"].replace(".yaml", "") for r in model_rows]
        bars = ax.bar(names, [r["latency_ms"] for r in model_rows], color="#2ca02c")
        for bar, r in zip(bars, model_rows):
            ax.annotate(f"x{r['ratio']:.2f}\n{r['gflops']:.1f} GFLOPs", (bar.get_x() + bar.get_width() / 2,
                                                                       bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("latency ms (batch 1, fused)")
        ax.set_title("models")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def bench(layers="bra,dat,conv3x3", maps="P3,P4,P5", batches="1", models="yolov8n.yaml,yolov8n-bra.yaml,yolov8n-dat.yaml",
          imgsz=640, device="cpu", dtype="float32", threads=2, out="runs/bench") -> dict:
    """Run the layer benchmark and the model benchmark, print both tables, write JSON and a PNG chart.

    Args:
        layers, maps, batches: the layer table's rows (see ``python -m yoloattn.bench.layers --help``);
            ``layers=`` (empty) skips it.
        models, imgsz: the model table's rows; ``models=`` (empty) skips it.
        device, dtype, threads: where and how to measure.
        out: directory for ``bench.json`` and ``bench.png``.
    """
    from .layers import run_layer_benchmark
    from .models import run_model_benchmark

    layer_list, model_list = _csv_list(layers), _csv_list(models)
    if not layer_list and not model_list:
        raise ValueError("yoloattn bench needs at least one of layers= or models=")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    layer_rows = (run_layer_benchmark(layer_list, _csv_list(maps), _csv_list(batches, int), device, dtype, int(threads))
                  if layer_list else [])
    model_rows = (run_model_benchmark(model_list, int(imgsz), device, int(threads)) if model_list else [])
    (out_dir / "bench.json").write_text(json.dumps({"layers": layer_rows, "models": model_rows}, indent=2))
    chart = _chart(layer_rows, model_rows, out_dir / "bench.png") if layer_rows or model_rows else None
    print(f"tables: {out_dir / 'bench.json'}; chart: {chart}")
    return {"layers": layer_rows, "models": model_rows, "chart": chart}
