"""``yoloattn ablate``: train several models with identical settings and seeds, and compare them fairly.

One run proves nothing (BiFormer issue #23: BRA in YOLOv5s, no gain). Every model is trained with
the same arguments once per seed; the table reports mean ± std over seeds of mAP50 and mAP50-95,
with params, GFLOPs at imgsz, latency on the device used and train time. Finished runs are not
redone, so an interrupted ablation continues where it stopped.

Outputs in ``project/name`` (default ``runs/ablate``): ``results.csv`` (one row per run),
``results.md`` (per model), ``map_vs_latency.png`` and ``map_curves.png``.
"""

from __future__ import annotations

import csv
import json
import statistics
import time
from pathlib import Path

__all__ = ["ABLATE_DEFAULTS", "ablate"]

# Defaults: the built-in data, the three layouts, two seeds, about 10 minutes on 2 CPU cores.
ABLATE_DEFAULTS = {
    "data": "shapes",
    "models": "yolov8n.yaml,yolov8n-bra.yaml,yolov8n-dat.yaml",
    "seeds": "0,1",
    "epochs": 6,
    "imgsz": 192,
    "batch": 8,
    "optimizer": "SGD",
    "lr0": 0.02,
    "warmup_epochs": 0.5,
    "close_mosaic": 2,
    "project": "runs/ablate",
    "name": "",
}
_OWN_KEYS = ("models", "seeds", "project", "name")


def _listify(value) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _stem(model: str) -> str:
    return Path(model).name.rsplit(".", 1)[0]


def latency_ms(model, imgsz: int, device, reps: int = 20) -> float:
    """Median batch-1 forward time of a fused, eval-mode copy of ``model`` at ``imgsz`` on ``device``."""
    import copy

    import torch

    from ..bench.measure import median_ms

    net = copy.deepcopy(model).to(device).float().eval()
    if hasattr(net, "fuse"):
        net = net.fuse(verbose=False) if "verbose" in net.fuse.__code__.co_varnames else net.fuse()
    x = torch.zeros(1, 3, imgsz, imgsz, device=device)
    with torch.no_grad():
        return median_ms(lambda: net(x), torch.device(device), budget_s=2.0, min_reps=5, max_reps=reps)


def _run_one(model_name: str, seed: int, run_dir: Path, train_args: dict) -> dict:
    """Train one (model, seed) run, or read it back if it finished before."""
    from ultralytics.utils.torch_utils import get_flops

    from .model import YOLO

    record = run_dir / "ablate.json"
    if record.exists():
        return json.loads(record.read_text())
    model = YOLO(model_name)
    start = time.perf_counter()
    model.train(**train_args, seed=seed, deterministic=True, project=str(run_dir.parent), name=run_dir.name,
                exist_ok=True)
    train_s = time.perf_counter() - start
    if Path(model.trainer.save_dir).resolve() != run_dir.resolve():
        raise RuntimeError(f"Ultralytics saved the run to {model.trainer.save_dir}, not {run_dir}")
    metrics = model.trainer.validator.metrics
    net = model.model
    imgsz = int(train_args["imgsz"])
    result = {
        "model": model_name,
        "seed": seed,
        "map50": float(metrics.box.map50),
        "map50_95": float(metrics.box.map),
        "params": int(sum(p.numel() for p in net.parameters())),
        "gflops": float(get_flops(net, imgsz)),
        "latency_ms": latency_ms(net, imgsz, model.trainer.device),
        "device": str(model.trainer.device),
        "train_s": train_s,
        "run_dir": str(run_dir),
    }
    record.write_text(json.dumps(result, indent=2))  # written last: its presence means "finished"
    return result


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict], models: list[str]) -> list[dict]:
    """Per-model aggregates (mean ± std over seeds) in the order of ``models``."""
    rows = []
    for name in models:
        mine = [r for r in runs if r["model"] == name]
        if not mine:
            continue
        row = {"model": name, "seeds": len(mine)}
        for key in ("map50", "map50_95", "latency_ms", "train_s"):
            row[key], row[key + "_std"] = _mean_std([r[key] for r in mine])
        row["params"], row["gflops"] = mine[0]["params"], mine[0]["gflops"]
        rows.append(row)
    return rows


def _write_tables(out: Path, runs: list[dict], rows: list[dict], imgsz: int, device: str) -> str:
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(runs[0]))
        writer.writeheader()
        writer.writerows(runs)
    lines = [f"# yoloattn ablation ({len(runs)} runs, imgsz {imgsz}, device {device})", "",
             "| model | seeds | mAP50 | mAP50-95 | params (M) | GFLOPs @imgsz | latency ms | train time s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['seeds']} | {r['map50']:.4f} ± {r['map50_std']:.4f} | "
                     f"{r['map50_95']:.4f} ± {r['map50_95_std']:.4f} | {r['params'] / 1e6:.3f} | {r['gflops']:.2f} | "
                     f"{r['latency_ms']:.1f} ± {r['latency_ms_std']:.1f} | {r['train_s']:.0f} |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def _epoch_curves(run_dir: Path) -> list[float]:
    path = run_dir / "results.csv"
    if not path.exists():
        return []
    with open(path) as f:
        reader = csv.DictReader(f)
        return [float(row["metrics/mAP50-95(B)"]) for row in reader if row.get("metrics/mAP50-95(B)")]


def _plots(out: Path, runs: list[dict], rows: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, ax, name: str, xlabel: str, ylabel: str, title: str) -> Path:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        return out / name

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for r in rows:
        ax.errorbar(r["latency_ms"], r["map50_95"], xerr=r["latency_ms_std"], yerr=r["map50_95_std"], fmt="o",
                    capsize=4, label=f"{r['model']} ({r['seeds']} seeds)")
        ax.annotate(_stem(r["model"]), (r["latency_ms"], r["map50_95"]), textcoords="offset points", xytext=(5, 5))
    scatter = save(fig, ax, "map_vs_latency.png", f"latency, ms (batch 1, {runs[0]['device']})",
                   "mAP50-95 (mean ± std over seeds)", "accuracy vs latency")

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for i, r in enumerate(rows):
        colour = f"C{i}"
        curves = [c for c in (_epoch_curves(Path(run["run_dir"])) for run in runs if run["model"] == r["model"]) if c]
        for c in curves:
            ax.plot(range(1, len(c) + 1), c, color=colour, alpha=0.3, lw=1)
        if curves:
            length = min(len(c) for c in curves)
            mean = [statistics.fmean(c[e] for c in curves) for e in range(length)]
            ax.plot(range(1, length + 1), mean, color=colour, lw=2, marker="o", label=_stem(r["model"]))
    curves_png = save(fig, ax, "map_curves.png", "epoch", "val mAP50-95",
                      "per-epoch mAP (thin: single seeds, thick: mean)")
    return [scatter, curves_png]


def ablate(**kwargs) -> dict:
    """Run an ablation; every argument not listed here passes through to Ultralytics ``train``.

    Args:
        models: comma-separated model YAMLs/weights (shipped short names allowed).
        seeds: comma-separated integer seeds.
        data: dataset YAML or ``'shapes'``.
        project, name: output directory ``project/name`` (name defaults to the data's stem).
        **kwargs: Ultralytics train arguments (epochs, imgsz, batch, device, ...), the same for every run.

    Returns:
        dict with ``runs`` (one record per run), ``summary`` (per model), ``out`` and ``plots`` paths.
    """
    from ultralytics.cfg import DEFAULT_CFG_DICT, check_dict_alignment
    from ultralytics.utils import LOGGER, TQDM

    from .model import resolve_data

    args = {**ABLATE_DEFAULTS, **kwargs}
    models = _listify(args.pop("models"))
    try:
        seeds = [int(s) for s in _listify(args.pop("seeds"))]
    except ValueError as e:
        raise ValueError(f"seeds must be comma-separated integers, got {kwargs.get('seeds')!r}") from e
    if not models or not seeds:
        raise ValueError(f"ablate needs at least one model and one seed, got models={models} seeds={seeds}")
    # absolute: Ultralytics files a relative project under its runs directory
    project, name = Path(args.pop("project")).resolve(), args.pop("name") or _stem(str(args["data"]))
    out = project / name
    train_args = {k: v for k, v in args.items() if k not in _OWN_KEYS}
    check_dict_alignment(DEFAULT_CFG_DICT, train_args)
    train_args["data"] = resolve_data(train_args["data"])
    train_args.setdefault("plots", False)
    train_args.setdefault("verbose", False)
    out.mkdir(parents=True, exist_ok=True)

    jobs = [(m, s) for m in models for s in seeds]
    runs = []
    bar = TQDM(jobs, desc=f"yoloattn ablate: {len(models)} models x {len(seeds)} seeds", unit="run")
    for model_name, seed in bar:
        run_dir = out / f"{_stem(model_name)}-seed{seed}"
        done = (run_dir / "ablate.json").exists()
        bar.set_description(f"{'reusing' if done else 'training'} {_stem(model_name)} seed {seed}")
        runs.append(_run_one(model_name, seed, run_dir, train_args))
    rows = summarize(runs, models)
    table = _write_tables(out, runs, rows, int(train_args["imgsz"]), runs[0]["device"])
    plots = _plots(out, runs, rows)
    LOGGER.info(f"\n{table}\nResults: {out / 'results.md'}, {out / 'results.csv'}; plots: "
                + ", ".join(str(p) for p in plots))
    if any(r["seeds"] < 2 for r in rows):
        LOGGER.info("yoloattn: with one seed per model the ± columns are 0; use seeds=0,1,2 or more to see the spread")
    return {"runs": runs, "summary": rows, "out": out, "plots": plots}
