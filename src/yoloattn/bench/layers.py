"""Layer-level benchmark: reference vs fast path, side by side.

Each case runs in fresh processes: one times the implementations interleaved on the same layer and
input (so a drifting machine speed cancels out of their ratio), one per implementation measures the
peak memory.

Rows: BRA and DAT (reference and fast) and, for scale, Ultralytics' 3x3 Conv of the same width.

Run ``python benchmarks/bra.py`` (or ``python -m yoloattn.bench.layers``); ``--help`` lists options.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

__all__ = ["LAYER_CASES", "run_layer_benchmark", "build_layer"]

# YOLOv8n feature maps at imgsz 640: P3, P4, P5
YOLOV8N_MAPS = {"P3": (64, 80, 80), "P4": (128, 40, 40), "P5": (256, 20, 20)}
LAYER_CASES = {
    # layer name -> implementations compared, the baseline first (one entry: no baseline)
    "bra": ("reference", "fast"),
    "dat": ("reference", "fast"),
    "conv3x3": ("fast",),
}


def build_layer(layer: str, channels: int) -> torch.nn.Module:
    """The layer of a benchmark row: BRA and DAT at their defaults, or a 3x3 conv of the same width."""
    if layer == "bra":
        from ..nn.bra import BiLevelRoutingAttention

        return BiLevelRoutingAttention(channels)  # seed defaults: n_win=7, 8 heads, topk=4
    if layer == "dat":
        from ..nn.dat import DAttention

        return DAttention(channels)  # head dim 32, stride 8, table position bias
    if layer == "conv3x3":
        from ultralytics.nn.modules import Conv

        return Conv(channels, channels, 3)  # Ultralytics' Conv: 3x3 conv + BN + SiLU
    raise ValueError(f"unknown layer {layer!r}; choose from {sorted(LAYER_CASES)}")


def _worker(spec: dict) -> dict:
    from .measure import measure_case

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    shape = tuple(spec["shape"])
    return measure_case(lambda: build_layer(spec["layer"], shape[1]), shape, spec["device"], spec["dtype"],
                        backends=tuple(spec["impls"]), what=spec["what"])


def _run_worker(spec: dict, memory: bool = False) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    if memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed blocks leave the RSS at once
    proc = subprocess.run([sys.executable, "-m", "yoloattn.bench.layers", "--worker",
                           json.dumps(dict(spec, what="memory" if memory else "time"))],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"benchmark case {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _isolated(spec: dict) -> dict:
    """{impl: {fwd_ms, fwdbwd_ms, peak_mib}}: times interleaved in one fresh process, memory one process each."""
    result = _run_worker(spec)
    for impl in spec["impls"]:
        result[impl].update(_run_worker(dict(spec, impls=[impl]), memory=True)[impl])
    return result


def run_layer_benchmark(layers=("bra",), maps=("P3", "P4", "P5"), batches=(1, 8), device="cpu", dtype="float32",
                        threads=2, printer=print) -> list[dict]:
    """Measure every (layer, map, batch) case for each implementation and print a table.

    Returns:
        one dict per case with the figures of each implementation and the ratios.
    """
    rows = []
    header = ("| layer | map | input (N, C, H, W) | ref fwd ms | fast fwd ms | fwd × | ref f+b ms | fast f+b ms "
              "| f+b × | ref peak MiB | fast peak MiB | mem ÷ |")
    printer(f"device={device} dtype={dtype} threads={threads} torch={torch.__version__}")
    printer(header)
    printer("|" + "---|" * (header.count("|") - 1))
    for layer in layers:
        if layer not in LAYER_CASES:
            raise ValueError(f"unknown layer {layer!r}; choose from {sorted(LAYER_CASES)}")
        impls = LAYER_CASES[layer]
        for name in maps:
            c, h, w = YOLOV8N_MAPS[name]
            for n in batches:
                spec = dict(layer=layer, shape=[n, c, h, w], device=device, dtype=dtype, threads=threads)
                measured = _isolated(dict(spec, impls=list(impls)))
                fast = measured[impls[-1]]
                ref = measured[impls[0]] if len(impls) > 1 else None
                row = dict(spec, ref=ref, fast=fast)
                cells = ["—"] * 6
                if ref is not None:
                    row.update(fwd_x=ref["fwd_ms"] / fast["fwd_ms"], fwdbwd_x=ref["fwdbwd_ms"] / fast["fwdbwd_ms"],
                               mem_div=ref["peak_mib"] / max(fast["peak_mib"], 1e-3))
                    cells = [f"{ref['fwd_ms']:.1f}", f"{row['fwd_x']:.2f}", f"{ref['fwdbwd_ms']:.1f}",
                             f"{row['fwdbwd_x']:.2f}", f"{ref['peak_mib']:.0f}", f"{row['mem_div']:.1f}"]
                rows.append(row)
                printer(f"| {layer} | {name} | ({n}, {c}, {h}, {w}) | {cells[0]} | {fast['fwd_ms']:.1f} | {cells[1]} | "
                        f"{cells[2]} | {fast['fwdbwd_ms']:.1f} | {cells[3]} | {cells[4]} | {fast['peak_mib']:.0f} | "
                        f"{cells[5]} |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--layers", default="bra,dat,conv3x3", help="comma-separated layers: " + ",".join(LAYER_CASES))
    parser.add_argument("--maps", default="P3,P4,P5", help="comma-separated YOLOv8n maps at 640: P3,P4,P5")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    rows = run_layer_benchmark(args.layers.split(","), args.maps.split(","), [int(b) for b in args.batches.split(",")],
                               args.device, args.dtype, args.threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
