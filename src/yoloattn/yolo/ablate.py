"""``yoloattn ablate``: train several models with identical settings and seeds, and compare them fairly.

One run proves nothing. Every model is trained with the same arguments once per seed, and the report is
built to survive a skeptical reviewer:

- **No selection on the reported split.** Each run's *final-epoch* validation metrics are the figures
  compared (the best epoch, picked on that same split, is shown next to them but never used for the
  verdict); with ``split=test`` the final weights are also evaluated on the data's test split, and those
  figures are compared instead.
- **Paired differences.** For every model against the first (the baseline), over the seeds both have:
  the mean difference in mAP50-95 and mAP50 with a 95% confidence interval from the paired t
  distribution (n - 1 degrees of freedom), and a plain verdict: "better" or "worse" when the interval
  excludes 0, else "no difference detected with N seeds".
- **Stability shown.** A run is flagged "not converged" when its validation mAP50-95 was still rising at
  the end (the least-squares slope over its last quarter of epochs, at least 3, would add more than 10% of
  the final value, and at least 0.01, over that window) and "unstable" when its final mAP50-95 is more than 20% below its own
  best (and at least 0.01 lower): a larger drop than seed-to-seed spread usually is, so its best epoch
  would misrepresent it. The curves plot marks each run's best and final points.
- **Honest reuse.** A finished run is reused only when its whole configuration matches: model, data (its
  YAML and its files' names and sizes), seed, every train argument, and the yoloattn, Ultralytics and
  PyTorch versions. The hash of that configuration is part of the run's folder name; the table says which
  rows were reused. The thread count is recorded with each run but is not part of it: ``parallel=2`` (two
  runs at a time, one thread each on 2 cores) and ``parallel=1`` reuse each other's runs.

Outputs in ``project/name`` (default ``runs/ablate/<data>``): ``results.csv`` (one row per run),
``results.md`` (per model, with the paired comparison), ``map_vs_latency.png`` and ``map_curves.png``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import statistics
import time
from pathlib import Path

__all__ = ["ABLATE_DEFAULTS", "STUDIES", "ablate", "compare", "run_flags", "t_cdf", "t_quantile"]

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
    "split": "val",
    "parallel": 1,
}
# Named studies: ``study=reference`` reproduces the study in docs/results.md (1.5 hours on 2 CPU cores, 2 at a time),
# ``study=reference-long`` its longer schedule (same file), ``study=layers`` the short ablation of every layer in
# docs/layers.md.
# Its values replace the defaults; arguments given with it still win.
_REFERENCE = {  # issue: YOLO's own models as peers, the harder level, >= 3 seeds, about 2 hours of CPU
    "data": "shapes-hard",
    "models": "yolov8n.yaml,yolo11n.yaml,yolo26n.yaml,yolov8n-bra.yaml,yolov8n-dat.yaml",
    "seeds": "0,1,2",
    "epochs": 60,
    "imgsz": 160,
    "batch": 8,
    "nbs": 8,  # an optimizer step every batch: Ultralytics' nominal batch of 64 would step once in 8 batches
    "lr0": 0.01,
    "mosaic": 0.0,  # as in the main job: the generated scenes are varied already
    "close_mosaic": 0,
    "parallel": 2,  # two runs at a time, each on half the cores: small models use one core better than two
    "name": "reference",
}
STUDIES = {
    "reference": _REFERENCE,
    # The reference study's settings at 120 epochs, for the baseline and the two attention layers whose
    # curves were still rising at 60 (docs/results.md, "Plateau"; 1.6 hours on 2 CPU cores, 2 at a time).
    "reference-long": {
        **_REFERENCE,
        "models": "yolov8n.yaml,yolov8n-bra.yaml,yolov8n-dat.yaml",
        "epochs": 120,
        "name": "reference-long",
    },
    "layers": {  # a short ablation of every yoloattn layer and model on the default level (about 1 hour)
        "models": "yolov8n.yaml,yolov8n-bra.yaml,yolov8n-dat.yaml,yolov8n-ema.yaml,yolov8n-cpca.yaml,"
        "yolov8n-msca.yaml,yolov8n-polarized.yaml,yolov8n-sea.yaml,yolov8n-msda.yaml,yolov8n-acmix.yaml,"
        "yolov8n-hab.yaml,yolov8n-dlka.yaml,yolov8n-c2f-biformer.yaml,yolov8n-biformer.yaml,yolo11n.yaml,"
        "yolo11n-c3k2-biformer.yaml",
        "name": "layers",
    },
}
_OWN_KEYS = ("models", "seeds", "project", "name", "split", "parallel")
NOT_CONVERGED_GAIN = 0.10  # relative gain over the last quarter of epochs that counts as "still rising"
UNSTABLE_DROP = 0.20  # relative drop of the final below the best that counts as "unstable"


def _listify(value) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _stem(model: str) -> str:
    return Path(model).name.rsplit(".", 1)[0]


def latency_ms(model, imgsz: int, device) -> float:
    """Median batch-1 forward time of a fused, eval-mode copy of ``model`` at ``imgsz`` on ``device``."""
    import copy

    import torch

    from ..bench.measure import median_ms

    net = copy.deepcopy(model).to(device).float().eval()
    if hasattr(net, "fuse"):
        net = net.fuse(verbose=False) if "verbose" in net.fuse.__code__.co_varnames else net.fuse()
    x = torch.zeros(1, 3, imgsz, imgsz, device=device)
    with torch.no_grad():
        return median_ms(lambda: net(x), torch.device(device), rounds=7, reps=3, budget_s=3.0)


def _data_fingerprint(data_yaml: str) -> str:
    """A hash of the data YAML and of the names and sizes of the files of its splits (cheap: no reading)."""
    import yaml

    path = Path(data_yaml)
    digest = hashlib.sha256()
    if not path.is_file():
        return f"unresolved:{data_yaml}"  # an Ultralytics dataset name: its files are Ultralytics' business
    text = path.read_text()
    digest.update(text.encode())
    cfg = yaml.safe_load(text) or {}
    root = Path(cfg.get("path") or path.parent)
    if not root.is_absolute():
        root = path.parent / root
    for split in ("train", "val", "test"):
        for entry in _listify(cfg.get(split) or []):
            folder = root / entry
            files = sorted(folder.rglob("*")) if folder.is_dir() else [folder] if folder.is_file() else []
            for f in files:
                if f.is_file() and f.suffix != ".cache":
                    digest.update(f"{f.relative_to(root)}:{f.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def _versions() -> dict:
    import torch

    from .. import __version__
    from .compat import installed_version

    return {"yoloattn": __version__, "ultralytics": installed_version(), "torch": torch.__version__}


def run_config(model_name: str, seed: int, train_args: dict, split: str) -> dict:
    """Everything that decides a run's result: what a reused run must match."""
    return {"model": model_name, "seed": seed, "data": str(train_args["data"]),
            "data_fingerprint": _data_fingerprint(str(train_args["data"])), "split": split,
            "train_args": {k: v for k, v in sorted(train_args.items()) if k != "data"}, "versions": _versions()}


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _epoch_table(run_dir: Path) -> list[dict]:
    path = run_dir / "results.csv"
    if not path.exists():
        return []
    with open(path) as f:
        return [{k.strip(): v for k, v in row.items()} for row in csv.DictReader(f)]


def _curve(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


def run_flags(curve: list[float]) -> list[str]:
    """"not converged" / "unstable" for one run's per-epoch validation mAP50-95 (see the module docstring)."""
    flags = []
    if len(curve) >= 3:
        window = max(3, math.ceil(len(curve) / 4))
        ys = curve[-window:]
        xs = range(window)
        mean_x, mean_y = (window - 1) / 2, statistics.fmean(ys)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
        gain = slope * window
        if gain > NOT_CONVERGED_GAIN * curve[-1] and gain >= 0.01:
            flags.append("not converged")
    if curve:
        best, final = max(curve), curve[-1]
        if final < (1 - UNSTABLE_DROP) * best and best - final >= 0.01:
            flags.append("unstable")
    return flags


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast below the mean; use the symmetry above it
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x)) / a
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / (c if abs(c) > tiny else tiny)
        f *= c * d
        if abs(1.0 - c * d) < 1e-14:
            break
    return front * (f - 1.0)


def t_cdf(t: float, dof: int) -> float:
    """The CDF of Student's t distribution with ``dof`` degrees of freedom."""
    tail = 0.5 * _betainc(dof / 2, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, dof: int) -> float:
    """The ``p`` quantile of Student's t distribution (bisection on :func:`t_cdf`; no SciPy needed)."""
    low, high = -1e3, 1e3
    for _ in range(200):
        mid = (low + high) / 2
        if t_cdf(mid, dof) < p:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def compare(baseline: dict[int, float], other: dict[int, float], confidence: float = 0.95) -> dict:
    """Paired comparison of two models over the seeds both have.

    Args:
        baseline, other: seed -> metric.
        confidence: of the interval.

    Returns:
        ``n``, ``mean`` (other - baseline), ``low``/``high`` (the paired t interval; None below 2 seeds) and
        ``verdict`` ("better", "worse", or "no difference detected with N seeds").
    """
    seeds = sorted(set(baseline) & set(other))
    diffs = [other[s] - baseline[s] for s in seeds]
    n = len(diffs)
    if n == 0:
        return {"n": 0, "mean": None, "low": None, "high": None, "verdict": "no common seeds"}
    mean = statistics.fmean(diffs)
    if n < 2:
        return {"n": 1, "mean": mean, "low": None, "high": None,
                "verdict": "one seed: no interval (use seeds=0,1,2 or more)"}
    sd = statistics.stdev(diffs)
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    verdict = ("better" if low > 0 else "worse" if high < 0 else f"no difference detected with {n} seeds")
    return {"n": n, "mean": mean, "low": low, "high": high, "verdict": verdict}


def _reused(model_name: str, seed: int, out: Path, train_args: dict, split: str) -> tuple[Path, dict, dict | None]:
    """The run's folder, its configuration, and its record if a run with that whole configuration finished."""
    config = run_config(model_name, seed, train_args, split)
    run_dir = out / f"{_stem(model_name)}-seed{seed}-{config_hash(config)}"
    record = run_dir / "ablate.json"
    if record.exists():
        try:
            result = json.loads(record.read_text())
            if result.get("config") == json.loads(json.dumps(config, default=str)):
                return run_dir, config, {**result, "reused": True}
        except (OSError, ValueError):
            pass  # a damaged record: train again
    return run_dir, config, None


def _train_one(model_name: str, seed: int, out: Path, train_args: dict, split: str, run_dir: Path, config: dict,
               threads: int | None = None) -> dict:
    """Train one (model, seed) run into ``run_dir`` (its configuration not finished before: see :func:`_reused`).

    ``threads``: set PyTorch's thread count first (a run in a worker process of ``parallel=N``).
    """
    import torch
    from ultralytics.utils.torch_utils import get_flops

    from .model import YOLO

    if threads is not None:
        torch.set_num_threads(threads)
    record = run_dir / "ablate.json"
    model = YOLO(model_name)
    start = time.perf_counter()
    model.train(**train_args, seed=seed, deterministic=True, project=str(out), name=run_dir.name, exist_ok=True)
    train_s = time.perf_counter() - start
    if Path(model.trainer.save_dir).resolve() != run_dir.resolve():
        raise RuntimeError(f"Ultralytics saved the run to {model.trainer.save_dir}, not {run_dir}")
    epochs = _epoch_table(run_dir)
    curve50_95, curve50 = _curve(epochs, "metrics/mAP50-95(B)"), _curve(epochs, "metrics/mAP50(B)")
    best_i = max(range(len(curve50_95)), key=curve50_95.__getitem__) if curve50_95 else 0
    net = model.model
    imgsz = int(train_args["imgsz"])
    result = {
        "model": model_name, "seed": seed,
        "final_map50": curve50[-1] if curve50 else float("nan"),
        "final_map50_95": curve50_95[-1] if curve50_95 else float("nan"),
        "best_map50": curve50[best_i] if curve50 else float("nan"),
        "best_map50_95": curve50_95[best_i] if curve50_95 else float("nan"),
        "best_epoch": best_i + 1, "epochs": len(curve50_95), "flags": run_flags(curve50_95),
        "params": int(sum(p.numel() for p in net.parameters())),
        "gflops": float(get_flops(net, imgsz)),
        "latency_ms": latency_ms(net, imgsz, model.trainer.device),
        "device": str(model.trainer.device), "threads": torch.get_num_threads(), "train_s": train_s,
        "epoch_s": train_s / max(len(curve50_95), 1), "run_dir": str(run_dir), "config": config,
    }
    if split == "test":
        last = YOLO(str(run_dir / "weights" / "last.pt"))
        metrics = last.val(data=train_args["data"], split="test", imgsz=imgsz, batch=train_args.get("batch", 16),
                           plots=False, verbose=False, project=str(run_dir), name="test", exist_ok=True)
        result.update(test_map50=float(metrics.box.map50), test_map50_95=float(metrics.box.map))
    record.write_text(json.dumps(result, indent=2, default=str))  # written last: its presence means "finished"
    return {**result, "reused": False}


def _metric_keys(split: str) -> tuple[str, str]:
    return ("test_map50_95", "test_map50") if split == "test" else ("final_map50_95", "final_map50")


def summarize(runs: list[dict], models: list[str], split: str = "val") -> list[dict]:
    """Per-model aggregates (mean ± std over seeds) and the paired comparison with the first model."""
    key95, key50 = _metric_keys(split)
    by_model = {m: [r for r in runs if r["model"] == m] for m in models}
    base = {r["seed"]: r for r in by_model[models[0]]}
    rows = []
    for name in models:
        mine = by_model[name]
        if not mine:
            continue
        row = {"model": name, "seeds": len(mine), "params": mine[0]["params"], "gflops": mine[0]["gflops"],
               "flags": sorted({f for r in mine for f in r["flags"]}), "reused": sum(r["reused"] for r in mine)}
        for key in (key95, key50, "best_map50_95", "best_map50", "latency_ms", "epoch_s"):
            values = [r[key] for r in mine]
            row[key] = statistics.fmean(values)
            row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        if name != models[0]:
            row["vs_first_map50_95"] = compare({s: r[key95] for s, r in base.items()}, {r["seed"]: r[key95] for r in mine})
            row["vs_first_map50"] = compare({s: r[key50] for s, r in base.items()}, {r["seed"]: r[key50] for r in mine})
        rows.append(row)
    return rows


def _diff_cell(c: dict | None) -> str:
    if not c:
        return "(baseline)"
    if c["mean"] is None:
        return c["verdict"]
    if c["low"] is None:
        return f"{c['mean']:+.4f} ({c['verdict']})"
    return f"{c['mean']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] {c['verdict']}"


def _write_tables(out: Path, runs: list[dict], rows: list[dict], imgsz: int, split: str) -> str:
    fields = list(dict.fromkeys(k for r in runs for k in r if k != "config"))  # a run from an older version may lack some
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*fields, "config_hash"])
        writer.writeheader()
        for r in runs:
            writer.writerow({**{k: (";".join(r[k]) if k == "flags" else r.get(k, "")) for k in fields},
                             "config_hash": config_hash(r["config"])})
    key95, key50 = _metric_keys(split)
    which = "test split, final weights" if split == "test" else "final epoch, val split"
    lines = [f"# yoloattn ablation ({len(runs)} runs, imgsz {imgsz}, device {runs[0]['device']})", "",
             f"Compared: {which} (the best epoch, chosen on the val split, is shown but not used). Differences: "
             f"mean over paired seeds with a 95% paired-t interval; verdicts at that level.", "",
             f"| model | seeds | mAP50-95 ({which}) | mAP50 | best-epoch mAP50-95 | Δ mAP50-95 vs first | "
             f"Δ mAP50 vs first | params (M) | GFLOPs @imgsz | latency ms | s / epoch | flags | reused |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['seeds']} | {r[key95]:.4f} ± {r[key95 + '_std']:.4f} | {r[key50]:.4f} ± "
            f"{r[key50 + '_std']:.4f} | {r['best_map50_95']:.4f} | {_diff_cell(r.get('vs_first_map50_95'))} | "
            f"{_diff_cell(r.get('vs_first_map50'))} | {r['params'] / 1e6:.3f} | {r['gflops']:.2f} | "
            f"{r['latency_ms']:.1f} ± {r['latency_ms_std']:.1f} | {r['epoch_s']:.1f} | {', '.join(r['flags']) or '—'} | "
            f"{r['reused']}/{r['seeds']} |")
    lines += ["", "Per run:", "", "| model | seed | final mAP50-95 | best mAP50-95 (epoch) | flags | run |",
              "|---|---|---|---|---|---|"]
    for r in runs:
        where = ("reused: " if r["reused"] else "trained: ") + r["run_dir"]
        lines.append(f"| {r['model']} | {r['seed']} | {r['final_map50_95']:.4f} | {r['best_map50_95']:.4f} "
                     f"({r['best_epoch']}/{r['epochs']}) | {', '.join(r['flags']) or '—'} | {where} |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def _plots(out: Path, runs: list[dict], rows: list[dict], split: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._plots import save

    key95, _ = _metric_keys(split)
    # up to 10 models: matplotlib's default colours and a label at each point; more: 20 colours and a marker
    # each, so no two look alike, and the legend beside the plot names them
    many = len(rows) > 10
    colours = [plt.get_cmap("tab20")(i % 20) if many else f"C{i}" for i in range(len(rows))]
    markers = ["o", "s", "^", "D", "v", "P", "X", "<", ">"] if many else ["o"]
    size = (10, 5.5) if many else (7, 5)

    def legend(ax):
        if many:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
        else:
            ax.legend(fontsize=8)

    fig, ax = plt.subplots(figsize=size)
    for i, r in enumerate(rows):
        label = f"{_stem(r['model'])} ({r['seeds']} seed{'s' if r['seeds'] != 1 else ''})"
        ax.errorbar(r["latency_ms"], r[key95], xerr=r["latency_ms_std"], yerr=r[key95 + "_std"],
                    fmt=markers[i % len(markers)], capsize=4, color=colours[i], label=label)
        if not many:  # with more, points crowd and labels would be pushed far from them: the legend names them
            ax.annotate(_stem(r["model"]), (r["latency_ms"], r[key95]), textcoords="offset points", xytext=(6, 4),
                        fontsize=8)
    ax.set_xlabel(f"latency, ms (batch 1, {runs[0]['device']})")
    ax.set_ylabel("mAP50-95 (final epoch; mean ± std over seeds)")
    ax.set_title("accuracy vs latency")
    ax.grid(alpha=0.3)
    legend(ax)
    scatter = save(fig, out / "map_vs_latency.png")

    fig, ax = plt.subplots(figsize=size)
    for i, r in enumerate(rows):
        colour = colours[i]
        for run in (run for run in runs if run["model"] == r["model"]):
            curve = _curve(_epoch_table(Path(run["run_dir"])), "metrics/mAP50-95(B)")
            if not curve:
                continue
            xs = range(1, len(curve) + 1)
            ax.plot(xs, curve, color=colour, alpha=0.6, lw=1.2)
            best = max(range(len(curve)), key=curve.__getitem__)
            ax.plot(best + 1, curve[best], marker="*", color=colour, ms=9, ls="none")
            ax.plot(len(curve), curve[-1], marker="o", color=colour, ms=5, ls="none")
        ax.plot([], [], color=colour, label=_stem(r["model"]))
    ax.plot([], [], marker="*", color="k", ls="none", label="best epoch")
    ax.plot([], [], marker="o", color="k", ls="none", label="final epoch")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val mAP50-95")
    ax.set_title("per-epoch validation mAP, one line per run")
    ax.grid(alpha=0.3)
    legend(ax)
    curves = save(fig, out / "map_curves.png")
    return [scatter, curves]


def _run_all(jobs: list[tuple[str, int]], out: Path, train_args: dict, split: str, parallel: int,
             desc: str) -> list[dict]:
    """Every (model, seed) run: in this process, or ``parallel`` at a time in worker processes that share the
    cores (each with PyTorch's thread count divided by ``parallel``). Finished runs are read back here."""
    import torch
    from ultralytics.utils import TQDM

    bar = TQDM(total=len(jobs), desc=desc, unit="run")
    runs, todo = [], []
    for model_name, seed in jobs:
        run_dir, config, reused = _reused(model_name, seed, out, train_args, split)
        if reused is not None:
            runs.append(reused)
            bar.update(1)
        else:
            todo.append((model_name, seed, out, train_args, split, run_dir, config))
    if parallel == 1 or len(todo) < 2:
        for job in todo:
            bar.set_description(f"{_stem(job[0])} seed {job[1]}")
            runs.append(_train_one(*job))
            bar.update(1)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, torch.get_num_threads() // parallel)
        # spawn: a fresh interpreter per worker (forking a process that holds PyTorch's thread pools is unsafe)
        with ProcessPoolExecutor(min(parallel, len(todo)), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_train_one, *job, threads) for job in todo]
            bar.set_description(f"{len(todo)} runs, {parallel} at a time, {threads} thread(s) each")
            try:
                for future in as_completed(futures):
                    runs.append(future.result())
                    bar.update(1)
            except BaseException:  # a failed or interrupted run stops the study now, not after every queued run
                for future in futures:
                    future.cancel()
                raise
    bar.close()
    return runs


def ablate(**kwargs) -> dict:
    """Run an ablation; every argument not listed here passes through to Ultralytics ``train``.

    Args:
        models: comma-separated model YAMLs/weights (shipped short names and Ultralytics' own YAMLs such as
            ``yolo11n.yaml``, ``yolo12n.yaml``, ``yolo26n.yaml``); the first is the baseline.
        seeds: comma-separated integer seeds.
        data: dataset YAML or ``'shapes'`` (the built-in data; ``shapes-hard`` its harder level).
        split: ``'val'`` (final-epoch validation metrics) or ``'test'`` (the final weights on the test split).
        study: a named set of these arguments from :data:`STUDIES` (``'reference'``: the study reported in
            ``docs/results.md``, ``'reference-long'`` its 120-epoch schedule for YOLOv8n, BRA and DAT;
            ``'layers'``: the short ablation in ``docs/layers.md``); arguments given next
            to it override it.
        project, name: output directory ``project/name`` (name defaults to the data's stem).
        parallel: runs trained at a time, each in its own process with PyTorch's threads divided between them
            (1: one after another in this process). Finished runs are reused whatever the value; the thread
            count of each run is recorded (``threads`` in ``results.csv``).
        **kwargs: Ultralytics train arguments (epochs, imgsz, batch, device, ...), the same for every run.

    Returns:
        dict with ``runs`` (one record per run), ``summary`` (per model), ``out`` and ``plots`` paths.
    """
    from ultralytics.cfg import DEFAULT_CFG_DICT, check_dict_alignment
    from ultralytics.utils import LOGGER

    from .model import resolve_data

    study = kwargs.pop("study", None)
    if study is not None and study not in STUDIES:
        raise ValueError(f"study={study!r} is not a known study; known: {', '.join(STUDIES)}")
    args = {**ABLATE_DEFAULTS, **STUDIES.get(study, {}), **kwargs}
    models = _listify(args.pop("models"))
    try:
        seeds = [int(s) for s in _listify(args.pop("seeds"))]
    except ValueError as e:
        raise ValueError(f"seeds must be comma-separated integers, got {kwargs.get('seeds')!r}") from e
    if not models or not seeds:
        raise ValueError(f"ablate needs at least one model and one seed, got models={models} seeds={seeds}")
    if len(set(models)) != len(models) or len(set(seeds)) != len(seeds):
        raise ValueError(f"ablate needs distinct models and seeds, got models={models} seeds={seeds}")
    parallel = args.pop("parallel")
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"parallel must be a positive integer (runs trained at a time), got {parallel!r}")
    split = args.pop("split")
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    # absolute: Ultralytics files a relative project under its runs directory
    project, name = Path(args.pop("project")).resolve(), args.pop("name") or _stem(str(args["data"]))
    out = project / name
    train_args = {k: v for k, v in args.items() if k not in _OWN_KEYS}
    check_dict_alignment(DEFAULT_CFG_DICT, train_args)
    train_args["data"] = resolve_data(train_args["data"])
    train_args.setdefault("plots", False)
    train_args.setdefault("verbose", False)
    out.mkdir(parents=True, exist_ok=True)

    # seed-major: a study stopped part-way has every model at the same seeds (and reuses those runs when called again)
    jobs = [(m, s) for s in seeds for m in models]
    runs = _run_all(jobs, out, train_args, split, parallel, f"yoloattn ablate: {len(models)} models x {len(seeds)} seeds")
    runs.sort(key=lambda r: (models.index(r["model"]), seeds.index(r["seed"])))
    rows = summarize(runs, models, split)
    table = _write_tables(out, runs, rows, int(train_args["imgsz"]), split)
    plots = _plots(out, runs, rows, split)
    reused = sum(r["reused"] for r in runs)
    LOGGER.info(f"\n{table}\n{reused} of {len(runs)} runs reused (same configuration); results: {out / 'results.md'}, "
                f"{out / 'results.csv'}; plots: " + ", ".join(str(p) for p in plots))
    return {"runs": runs, "summary": rows, "out": out, "plots": plots}
