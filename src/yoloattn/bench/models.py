"""Model-level benchmark: latency, params and GFLOPs of whole YOLO models side by side.

``python benchmarks/yolo.py`` (or ``yoloattn bench``): YOLOv8n with and without the attention layers at
imgsz 640, batch 1, fused, on the CPU with 2 threads unless told otherwise. Every round times each model
back to back; latency is the median over all rounds, and the ratio to the first model is the median of
the per-round ratios, so a drift of the machine's speed (a shared VM changes by 30% within seconds)
cancels out of it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

__all__ = ["run_model_benchmark"]

DEFAULT_MODELS = ("yolov8n.yaml", "yolov8n-bra.yaml", "yolov8n-dat.yaml")


def _build(name: str, device: torch.device):
    from ..yolo.model import YOLO

    model = YOLO(name).model.to(device).float().eval()
    return model.fuse(verbose=False)


def run_model_benchmark(models=DEFAULT_MODELS, imgsz: int = 640, device: str = "cpu", threads: int = 2,
                        rounds: int = 15, reps: int = 3, printer=print) -> list[dict]:
    """Measure each model's batch-1 latency, params and GFLOPs at ``imgsz``; print a table with ratios.

    Returns:
        one dict per model: ``model``, ``latency_ms``, ``params``, ``gflops``, ``ratio`` (median per-round
        latency / first model's).
    """
    from ultralytics.utils.torch_utils import get_flops

    torch.set_num_threads(threads)
    dev = torch.device(device)
    nets = {name: _build(name, dev) for name in models}
    x = torch.zeros(1, 3, imgsz, imgsz, device=dev)
    samples = {name: [] for name in models}  # rounds × reps, in order
    with torch.no_grad():
        for net in nets.values():  # warm-up
            net(x)
        for _ in range(rounds):
            for name, net in nets.items():
                for _ in range(reps):
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    t0 = time.perf_counter()
                    net(x)
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    samples[name].append((time.perf_counter() - t0) * 1e3)

    def per_round(name: str) -> list[float]:
        return [statistics.median(samples[name][r * reps:(r + 1) * reps]) for r in range(rounds)]

    base = per_round(models[0])
    rows = []
    for name, net in nets.items():
        ratios = [t / b for t, b in zip(per_round(name), base)]
        rows.append({"model": name, "latency_ms": statistics.median(samples[name]),
                     "params": sum(p.numel() for p in net.parameters()), "gflops": get_flops(net, imgsz),
                     "ratio": statistics.median(ratios)})
    printer(f"imgsz={imgsz} batch=1 device={device} threads={threads} torch={torch.__version__} (fused, eval)")
    printer("| model | params (M) | GFLOPs | latency ms | latency / first (per-round median) |")
    printer("|---|---|---|---|---|")
    for row in rows:
        printer(f"| {row['model']} | {row['params'] / 1e6:.3f} | {row['gflops']:.2f} | {row['latency_ms']:.1f} | "
                f"{row['ratio']:.3f} |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model YAMLs or weights")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    from ..yolo.register import register

    register()

    run_model_benchmark(args.models.split(","), args.imgsz, args.device, args.threads, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
