"""yoloattn ablate / bench / visualize / info at tiny settings: real runs, real PNG files, honest tables."""

import csv
import json
import os
import re
import subprocess
import sys

import pytest

from yoloattn.data import shapes
from yoloattn.yolo.ablate import compare, run_flags

IMGSZ = 32


def _png_ok(path, min_bytes=2000):
    import cv2

    assert path.exists() and path.stat().st_size > min_bytes, path
    image = cv2.imread(str(path))
    assert image is not None and image.std() > 5, f"{path} looks blank"
    return image


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return shapes(n_train=8, n_val=4, imgsz=64, root=tmp_path_factory.mktemp("data"), progress=False)


def _cli(args, cwd, env=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "yoloattn.yolo.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env=env or dict(os.environ))
    if check:
        assert proc.returncode == 0, f"{args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


# ---- ablate: statistics on inputs whose answer is known -------------------------------------------------------
def test_paired_comparison_known_answers():
    base = {0: 0.30, 1: 0.32, 2: 0.31, 3: 0.29}
    better = {s: v + 0.05 + 0.001 * s for s, v in base.items()}  # a consistent gain: the interval excludes 0
    c = compare(base, better)
    assert c["n"] == 4 and c["mean"] == pytest.approx(0.0515) and c["low"] > 0 and c["verdict"] == "better"
    worse = {s: v - 0.04 for s, v in base.items()}
    worse[0] -= 0.001
    assert compare(base, worse)["verdict"] == "worse"
    noisy = {0: 0.36, 1: 0.27, 2: 0.33, 3: 0.28}  # mean difference 0.005, spread 0.05: nothing detected
    c = compare(base, noisy)
    assert c["low"] < 0 < c["high"] and c["verdict"] == "no difference detected with 4 seeds"
    # the interval is the paired t interval: mean ± t(0.975, n-1) * sd / sqrt(n); t(0.975, 3) = 3.182446
    import statistics

    diffs = [noisy[s] - base[s] for s in base]
    assert c["high"] - c["mean"] == pytest.approx(3.182446 * statistics.stdev(diffs) / 2, rel=1e-5)
    assert compare(base, {0: 0.4})["verdict"].startswith("one seed")
    assert compare(base, {7: 0.4})["verdict"] == "no common seeds"
    assert compare({0: 0.3, 1: 0.3}, {0: 0.4, 1: 0.2, 5: 0.9})["n"] == 2  # only the seeds both have


def test_t_quantiles_match_the_tables():
    from yoloattn.yolo.ablate import t_cdf, t_quantile

    # two-sided 95% critical values of Student's t (any statistics table)
    for dof, value in ((1, 12.706205), (2, 4.302653), (4, 2.776445), (9, 2.262157), (29, 2.045230), (200, 1.971896)):
        assert t_quantile(0.975, dof) == pytest.approx(value, rel=1e-5)
    assert t_quantile(0.995, 5) == pytest.approx(4.032143, rel=1e-5)
    assert t_cdf(0.0, 7) == pytest.approx(0.5) and t_cdf(-2.262157, 9) == pytest.approx(0.025, rel=1e-5)


def test_run_flags():
    assert run_flags([0.1, 0.2, 0.3, 0.35, 0.36, 0.36, 0.36, 0.36]) == []  # plateaued
    assert run_flags([0.05, 0.1, 0.15, 0.2, 0.25, 0.3]) == ["not converged"]  # still rising at the end
    assert run_flags([0.1, 0.2, 0.3, 0.24, 0.24, 0.23, 0.22]) == ["unstable"]  # 27% below its best
    assert run_flags([0.001, 0.004, 0.003]) == []  # a drop below 0.01 absolute is noise
    assert run_flags([]) == []


def test_ablate_tables_plots_reuse_and_redo(tmp_path, tiny_data):
    args = ["ablate", f"data={tiny_data}", "models=yolov8n.yaml,yolov8n-bra.yaml", "seeds=0,1", "epochs=2",
            f"imgsz={IMGSZ}", "batch=4", "workers=0", f"project={tmp_path}", "name=abl"]
    log = _cli(args, tmp_path)
    out = tmp_path / "abl"
    with open(out / "results.csv") as f:
        runs = list(csv.DictReader(f))
    assert [(r["model"], r["seed"]) for r in runs] == [("yolov8n.yaml", "0"), ("yolov8n.yaml", "1"),
                                                       ("yolov8n-bra.yaml", "0"), ("yolov8n-bra.yaml", "1")]
    assert all(float(r["gflops"]) > 0 and float(r["latency_ms"]) > 0 and int(r["params"]) > 0 for r in runs)
    assert all(int(r["epochs"]) == 2 and 1 <= int(r["best_epoch"]) <= 2 for r in runs)
    assert float(runs[2]["params"]) > float(runs[0]["params"])  # the BRA layer adds parameters
    table = (out / "results.md").read_text()
    assert "final epoch, val split" in table and "95% paired-t interval" in table
    assert "| yolov8n-bra.yaml | 2 |" in table and "(baseline)" in table
    assert ("no difference detected with 2 seeds" in table or "better" in table or "worse" in table)
    assert "trained: " in table and "reused: " not in table
    for name in ("map_vs_latency.png", "map_curves.png"):
        _png_ok(out / name)
    assert "0 of 4 runs reused" in log
    # the same call reuses every run ...
    log = _cli(args, tmp_path)
    assert "4 of 4 runs reused" in log and "reused: " in (out / "results.md").read_text()
    # ... a changed argument trains again, into its own folders
    log = _cli([*args[:-1], "lr0=0.005", "name=abl"], tmp_path)
    assert "0 of 4 runs reused" in log
    assert len({r["config_hash"] for r in csv.DictReader(open(out / "results.csv"))}) == 4
    assert len(list(out.glob("*/ablate.json"))) == 8


def test_ablate_parallel_runs_in_worker_processes_and_reuses_across_settings(tmp_path, tiny_data):
    import torch

    from yoloattn.yolo.ablate import ablate

    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="parallel must be a positive integer"):
            ablate(data=str(tiny_data), parallel=bad, project=str(tmp_path))
    args = dict(data=str(tiny_data), models="yolov8n.yaml,yolov8n-bra.yaml", seeds="0", epochs=1, imgsz=IMGSZ,
                batch=4, workers=0, project=str(tmp_path), name="par")
    result = ablate(**args, parallel=2)
    runs = result["runs"]
    assert [(r["model"], r["seed"], r["reused"]) for r in runs] == [("yolov8n.yaml", 0, False),
                                                                    ("yolov8n-bra.yaml", 0, False)]
    assert all(r["threads"] == max(1, torch.get_num_threads() // 2) and r["epochs"] == 1 for r in runs)
    with open(result["out"] / "results.csv") as f:
        assert [row["threads"] for row in csv.DictReader(f)] == [str(runs[0]["threads"])] * 2
    # the thread count is recorded, not part of the configuration: one at a time reuses both runs
    again = ablate(**args, parallel=1)["runs"]
    assert [r["reused"] for r in again] == [True, True]


def test_ablate_study_preset(tmp_path):
    from yoloattn.yolo.ablate import STUDIES, ablate

    with pytest.raises(ValueError, match="study='nope' is not a known study; known: reference, reference-long, layers"):
        ablate(study="nope")
    # every model the studies name builds
    from yoloattn import YOLO

    for study in STUDIES.values():
        for model in study["models"].split(","):
            assert YOLO(model).model is not None


def test_ablate_charts_have_no_overlapping_text(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from yoloattn._plots import overlapping_texts, save

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0.0, 2.0], [0.0, 1.0], "o")
    for name in ["yolov8n", "yolov8n-bra", "yolov8n-dat"]:  # three models at (nearly) one point
        ax.annotate(name, (1.0, 0.5), textcoords="offset points", xytext=(5, 4))
    assert overlapping_texts(fig)  # three labels on one spot overlap ...
    save(fig, tmp_path / "x.png")
    assert not overlapping_texts(fig)  # ... until save() spreads them


# ---- bench --------------------------------------------------------------------------------------------------
def test_bench_rows_name_backend_and_build(tmp_path):
    log = _cli(["bench", "layers=bra,dat,conv3x3", "maps=P5", "batches=1", "models=yolov8n.yaml,yolov8n-bra.yaml",
                "imgsz=64", "train=2x64", "memory=False", f"out={tmp_path}"], tmp_path)
    assert "| bra | P5 | (1, 256, 20, 20) | reference |" in log and "| bra | P5 | (1, 256, 20, 20) | sdpa |" in log
    assert "| dat | P5 | (1, 256, 20, 20) | fused |" in log and "| conv3x3 | P5 |" in log
    assert "cpu[" in log and "threads" in log  # the kernel's build (ISA) in its rows, the machine in the header
    assert "| yolov8n-bra.yaml | inference |" in log and "| yolov8n-bra.yaml | train | 2 × 64 |" in log
    _png_ok(tmp_path / "bench.png")
    data = json.loads((tmp_path / "bench.json").read_text())
    assert {r["backend"] for r in data["layers"] if r["layer"] == "bra"} >= {"reference", "sdpa"}


@pytest.mark.slow
def test_bench_peak_memory_rows(tmp_path):
    log = _cli(["bench", "layers=bra", "maps=P5", "batches=1", "models=", f"out={tmp_path}"], tmp_path)
    rows = [line for line in log.splitlines() if line.startswith("| bra | P5")]
    assert rows and all(line.split("|")[7].strip() not in ("", "—") for line in rows)  # peak MiB measured


@pytest.mark.slow
def test_biformer_bench_rows_and_ratios(tmp_path):
    """A real BiFormer-T run at a tiny size: every path timed, memory measured in fresh processes."""
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "benchmarks/biformer.py", "--cases", "tiny@112x2", "--json", str(out)],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| BiFormer-tiny | (2, 3, 112, 112) | reference |" in proc.stdout and "threads" in proc.stdout
    rows = json.loads(out.read_text())
    assert [r["impl"] for r in rows] == ["reference", "auto", "checkpoint-mlp", "checkpoint"]
    assert rows[0]["fwdbwd_x"] == 1.0 and all(r["peak_mib"] is not None and r["fwdbwd_ms"] > 0 for r in rows)


def test_biformer_bench_bad_case_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "yoloattn.bench.biformer", "--cases", "tiny@224"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "case 'tiny@224' is not <variant>@<imgsz>x<batch>" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "yoloattn.bench.biformer", "--cases", "tiny@32x1", "--no-memory"],
                          capture_output=True, text=True)  # the classifier needs stage maps divisible by n_win
    assert proc.returncode == 2 and proc.stderr.startswith("error: BiFormer with auto_pad=False needs")
    assert proc.stderr.strip().count("\n") == 0


def test_model_bench_modes_and_training_shapes(tmp_path):
    """``--modes both`` times both modes (it once matched neither and printed an empty table); bad specs are errors."""
    from yoloattn.bench.models import parse_modes, parse_train_shapes

    assert parse_modes("both") == parse_modes("inference,train") == ("inference", "train")
    assert parse_modes("train, inference ") == ("train", "inference")
    assert parse_modes("train") == ("train",) and parse_train_shapes("8x320, 4X640") == [(8, 320), (4, 640)]
    for bad in ("bogus", "", "inference,both"):
        with pytest.raises(ValueError, match="expected inference, train, both"):
            parse_modes(bad)
    for bad in ("8x", "0x320", "8*320", "8x320,"):
        with pytest.raises(ValueError, match="expected BATCHxIMGSZ"):
            parse_train_shapes(bad)
    root = os.path.dirname(os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, "benchmarks/yolo.py", "--models", "yolov8n.yaml", "--imgsz", "64",
                           "--train", "1x64", "--rounds", "3", "--modes", "both"], capture_output=True, text=True,
                          cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| yolov8n.yaml | inference | 1 × 64 |" in proc.stdout and "| yolov8n.yaml | train | 1 × 64 |" in proc.stdout
    proc = subprocess.run([sys.executable, "benchmarks/yolo.py", "--modes", "both,bogus"], capture_output=True,
                          text=True, cwd=root)
    assert proc.returncode == 2 and "error: modes 'both,bogus': expected" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "yoloattn.yolo.cli", "bench", "layers=", "models=yolov8n.yaml",
                           "train=8x", f"out={tmp_path}"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert "training shapes '8x': expected BATCHxIMGSZ" in proc.stderr


def test_bench_chart_text_does_not_overlap():
    from yoloattn._plots import overlapping_texts
    from yoloattn.bench.report import chart

    layer_rows = [dict(layer=layer, map=m, shape=[8, 64, 80, 80], backend=b, fwd_ms=10.0 + i, fwdbwd_ms=30.0 + i)
                  for i, (layer, m, b) in enumerate((l, m, b) for l in ("bra", "dat") for m in ("P3", "P4", "P5")
                                                    for b in ("reference", "sdpa", "cpu[avx512]", "cpu[avx2]"))]
    model_rows = [dict(model=f"yolov8n-{k}.yaml", mode=mode, batch=8, imgsz=320, ms=100.0, ratio=1.0 + 0.1 * i)
                  for i, k in enumerate(("base", "bra", "dat")) for mode in ("inference", "train")]
    fig = chart(layer_rows, model_rows, "a machine")
    assert overlapping_texts(fig) == []


# ---- visualize ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_bra(tmp_path_factory, tiny_data):
    folder = tmp_path_factory.mktemp("vis-train")
    _cli(["train", "model=yolov8n-bra.yaml", f"data={tiny_data}", "epochs=1", "imgsz=64", "batch=4", "workers=0",
          f"project={folder}", "name=run", "plots=False"], folder)
    return folder / "run" / "weights" / "best.pt"


def test_visualize_bra_points_in_original_pixels(tmp_path, trained_bra, tiny_data):
    image = next((tiny_data.parent / "images" / "val").glob("*.png"))
    args = ["visualize", f"model={trained_bra}", f"source={image}", "imgsz=64", "point=10,20,50,40",
            f"project={tmp_path}", "name=vis"]
    log = _cli(args, tmp_path)
    first = tmp_path / "vis" / f"{image.stem}_bra_layer16.png"
    _png_ok(first)
    assert "point (10,20)" in log and "point (50,40)" in log and "logit" in log and " w 0." in log
    assert "untrained" not in log
    _cli(args, tmp_path)  # a second run does not overwrite the first: a numbered folder, as for predict
    assert (tmp_path / "vis2" / first.name).exists() or (tmp_path / "vis-2" / first.name).exists()


def test_visualize_dat_and_untrained_warning(tmp_path):
    from ultralytics.utils import ASSETS

    log = _cli(["visualize", "model=yolov8n-dat.yaml", f"source={ASSETS / 'bus.jpg'}", "imgsz=320",
                f"project={tmp_path}", "name=d", "exist_ok=True"], tmp_path)
    _png_ok(tmp_path / "d" / "bus_dat_layer16.png")
    assert "untrained" in log and "sampling points; offset length" in log
    assert re.search(r"\d+ outside the picture", log)  # points matplotlib clips away are counted, not hidden


def test_info_prints_summary_and_layers(tmp_path):
    log = _cli(["info", "model=yolov10n-bra.yaml", "imgsz=320"], tmp_path)
    assert "GFLOPs" in log and "layer 17: BiLevelRoutingAttention(dim=64" in log and "layer 21: BiLevelRoutingAttention(dim=128" in log


def test_bra_profile_names_where_it_ran_and_its_categories():
    """The BRA profile's header names the CPU, threads, PyTorch's CPU kernels and the kernel build it used."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    proc = subprocess.run([sys.executable, "-m", "yoloattn.bench.profile", "--shape", "1,32,14,14", "--steps", "1",
                           "--build", "x86-64"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    header = proc.stdout.splitlines()[0]
    assert "BRA forward+backward at (1, 32, 14, 14), backend auto, on " in header
    assert "2 threads" in header and "(CPU kernels " in header and ", oneDNN up to AVX2, MKL up to AVX2)" in header
    assert "kernel -march=x86-64 (sse2)" in header or "no CPU kernel" in header
    assert "| attention (kernel backward) |" in proc.stdout


def test_machine_line_flags_an_emulation_that_leaves_mkl_uncapped():
    """Capping oneDNN alone leaves the matrix products (BRA's projections) at the CPU's full width: said so."""
    from yoloattn.bench.measure import machine_info, machine_line

    info = dict(machine_info(), torch_cpu="AVX2", onednn_max="AVX2", mkl_max=None)
    assert "oneDNN up to AVX2, MKL not capped (MKL_ENABLE_INSTRUCTIONS unset)" in machine_line(info)
    assert "MKL" not in machine_line(dict(info, onednn_max=None))
    assert "MKL up to AVX2" in machine_line(dict(info, mkl_max="AVX2"))
