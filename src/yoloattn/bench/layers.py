"""Layer benchmark: every backend of every layer side by side, at YOLOv8n's P3/P4/P5 maps.

For each (layer, map, batch) case one fresh process times all implementations interleaved on the same
layer and input (so the machine's drift cancels out of their ratios), and one fresh process per
implementation measures its peak memory. A row per implementation names its backend and, for the
compiled CPU kernel, the build (``cpu[avx512]``, ``cpu[avx2]``, ``cpu[sse2]``: every ``-march`` target
this machine can run). Ratios are against the layer's ``reference`` backend (the official math); Ultralytics'
3x3 ``Conv`` of the same width is a row for scale. "fwd" is inference (eval mode, no autograd: BatchNorms use
their running statistics and may fold); "f+b" and memory are a training step (train mode, forward and backward).

    python -m yoloattn.bench.layers --layers bra --maps P3 --batches 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys

import torch

from .measure import (compared, interleaved_rounds, machine_info, machine_line, peak_memory_mib, run_worker,
                      table_cells)

__all__ = ["LAYERS", "YOLOV8N_MAPS", "implementations", "run_layer_benchmark"]

# YOLOv8n feature maps at imgsz 640: P3, P4, P5
YOLOV8N_MAPS = {"P3": (64, 80, 80), "P4": (128, 40, 40), "P5": (256, 20, 20)}
# the -march targets of the CPU kernel besides 'native' that an x86-64 machine runs: AVX2 + FMA, and SSE2
X86_BUILDS = ("x86-64-v3", "x86-64")


def _yolo_layer(name: str):
    """The YOLO face of a layer (what a YAML row ``[-1, 1, name, []]`` builds), with its defaults."""

    def build(c):
        from ..yolo import layers

        return getattr(layers, name)(c)

    return build


def _conv(c):
    from ultralytics.nn.modules import Conv

    return Conv(c, c, 3)  # Ultralytics' Conv: 3x3 conv + BN + SiLU


class _LePE(torch.nn.Module):
    """BiFormer's LePE: a 5x5 depthwise conv on a channels-last map, as BRA runs it."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 5, padding=2, groups=c)

    def forward(self, x):
        from ..nn.functional.depthwise_conv import depthwise_conv_module

        return depthwise_conv_module(self.conv, x.contiguous(memory_format=torch.channels_last))


# layer name -> (builder taking the channel count, the op whose backends are compared, or None)
LAYERS = {
    "bra": (_yolo_layer("BiLevelRoutingAttention"), "routed_attention"),  # n_win 7, 8 heads, topk 4
    "dat": (_yolo_layer("DAttention"), "deformable_attention"),  # head dim 32, stride 8, table position bias
    "ema": (_yolo_layer("EMA"), "ema"),
    "cpca": (_yolo_layer("CPCA"), "cpca"),
    "msca": (_yolo_layer("MSCA"), "msca"),
    "polarized": (_yolo_layer("PolarizedSelfAttention"), "polarized_attention"),
    "sea": (_yolo_layer("SeaAttention"), "sea_attention"),
    "msda": (_yolo_layer("MSDA"), "msda"),
    "acmix": (_yolo_layer("ACmix"), "acmix"),
    "hab": (_yolo_layer("HAB"), "hab"),
    "dlka": (_yolo_layer("DLKA"), "deform_conv2d"),
    "lepe5x5": (_LePE, "depthwise_conv"),  # the compiled weight gradient against PyTorch's backward
    "conv3x3": (_conv, None),
}


def implementations(layer: str, device: str = "cpu") -> list[str]:
    """The implementations a row set compares: the op's backends, the CPU kernel once per build."""
    if layer not in LAYERS:
        raise ValueError(f"unknown layer {layer!r}; choose from {sorted(LAYERS)}")
    import yoloattn.nn  # noqa: F401  (registers every op and its backends)
    from ..nn.backends import ops

    op = LAYERS[layer][1]
    if op is None:
        return ["conv"]
    names = ["reference", *(n for n in ops()[op] if n != "reference")]  # the baseline first in the table
    out = []
    for name in names:
        if name == "cpu":
            if device != "cpu":
                continue
            out.append("cpu@native")
            if platform.machine() in ("x86_64", "AMD64"):
                out += [f"cpu@{march}" for march in X86_BUILDS]
        else:
            out.append(name)
    return out


def _context(op: str | None, impl: str):
    from ..nn.backends import use_backend
    from ..nn.functional import routed_attention_cpu as cpu

    if op is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    name, _, march = impl.partition("@")
    stack.enter_context(use_backend(**{op: name}))
    if march:
        stack.enter_context(cpu.use_build(march))
    return stack


def _label(impl: str, builds: dict) -> str:
    name, _, march = impl.partition("@")
    if not march:
        return name
    info = builds.get(march) or {}
    return f"cpu[{info.get('isa', march)}]" if info.get("available") else f"cpu[{march}: unavailable]"


def _worker(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    build, op = LAYERS[spec["layer"]]
    dev = torch.device(spec["device"])
    shape = tuple(spec["shape"])
    layer = build(shape[1]).to(dev)
    x = torch.randn(shape, device=dev, requires_grad=True)
    amp = spec["dtype"] != "float32"

    def forward(impl):
        with _context(op, impl), torch.autocast(dev.type, dtype=getattr(torch, spec["dtype"]), enabled=amp):
            out = layer(x)
        return out[0] if isinstance(out, tuple) else out

    def forward_backward(impl):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        forward(impl).float().sum().backward()

    impls = spec["impls"]
    if spec["what"] == "memory":
        return {impls[0]: {"peak_mib": peak_memory_mib(lambda: forward_backward(impls[0]), dev)}}
    # forward as in inference (eval mode: BatchNorms use running statistics and may fold), f+b as in training
    layer.eval()
    with torch.no_grad():
        fwd = interleaved_rounds({i: (lambda i=i: forward(i)) for i in impls}, dev, rounds=7, reps=3, budget_s=20)
    layer.train()
    fwdbwd = interleaved_rounds({i: (lambda i=i: forward_backward(i)) for i in impls}, dev, rounds=7, reps=2,
                                budget_s=40)
    return {i: {"fwd_rounds": fwd[i], "fwdbwd_rounds": fwdbwd[i]} for i in impls}


def _run_worker(spec: dict, memory: bool = False) -> dict:
    return run_worker("yoloattn.bench.layers", spec, memory)


def _builds() -> dict:
    from ..nn.functional import routed_attention_cpu as cpu

    out = {}
    for march in ("native", *(X86_BUILDS if platform.machine() in ("x86_64", "AMD64") else ())):
        with cpu.use_build(march):
            out[march] = cpu.build_info()
    return out


def run_layer_benchmark(layers=("bra",), maps=("P3", "P4", "P5"), batches=(1, 8), device="cpu", dtype="float32",
                        threads=2, memory=True, printer=print) -> list[dict]:
    """Measure every (layer, map, batch, implementation) and print a table; returns one dict per row."""
    torch.set_num_threads(threads)
    builds = _builds() if device == "cpu" else {}
    printer(f"layer benchmark on {machine_line(machine_info(device))}; dtype {dtype}; medians of interleaved rounds")
    header = ("| layer | map | input (N, C, H, W) | backend | fwd ms | f+b ms | peak MiB | fwd × ref | f+b × ref "
              "| mem ÷ ref |")
    printer(header)
    printer("|" + "---|" * (header.count("|") - 1))
    rows = []
    for layer in layers:
        impls = [i for i in implementations(layer, device)
                 if "@" not in i or builds.get(i.partition("@")[2], {}).get("available")]
        for name in maps:
            c, h, w = YOLOV8N_MAPS[name]
            for n in batches:
                spec = dict(layer=layer, shape=[n, c, h, w], device=device, dtype=dtype, threads=threads, impls=impls)
                measured = _run_worker(spec)
                if memory:
                    for impl in impls:
                        measured[impl].update(_run_worker(dict(spec, impls=[impl]), memory=True)[impl])
                ref = measured.get("reference")
                for impl in impls:
                    row = dict(layer=layer, map=name, shape=[n, c, h, w], device=device, dtype=dtype, threads=threads,
                               backend=_label(impl, builds), impl=impl, **compared(measured[impl], ref))
                    rows.append(row)
                    printer(f"| {layer} | {name} | ({n}, {c}, {h}, {w}) | {row['backend']} | {table_cells(row)} |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--layers", default="bra,dat,conv3x3", help="comma-separated layers: " + ",".join(LAYERS))
    parser.add_argument("--maps", default="P3,P4,P5", help="comma-separated YOLOv8n maps at 640: P3,P4,P5")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    rows = run_layer_benchmark(args.layers.split(","), args.maps.split(","), [int(b) for b in args.batches.split(",")],
                               args.device, args.dtype, args.threads, memory=not args.no_memory)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
