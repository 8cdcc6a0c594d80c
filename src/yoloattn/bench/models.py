"""Whole-model benchmark: inference latency and training-step time of YOLO models side by side.

``python -m yoloattn.bench.models`` (or ``yoloattn bench``): YOLOv8n with and without the attention layers,

- inference: batch 1 at ``imgsz`` (640), fused, eval mode;
- training step: a real Ultralytics step at ``--train-batch`` and ``--train-imgsz`` (8 at 320, and 4 at 640):
  train-mode forward, Ultralytics' detection loss on fixed synthetic boxes, backward, SGD step.

Every round times each model back to back; the ratio to the first model is the median of the per-round
ratios, so the machine's drift cancels out of it. The header names the CPU, its ISA, the thread count and
the CPU kernel build (``--build x86-64-v3`` runs BRA's AVX2 kernel, ``x86-64`` the SSE2 one).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import sys

import torch

from .measure import interleaved_rounds, machine_info, machine_line, ratio_median

__all__ = ["DEFAULT_MODELS", "MODES", "parse_modes", "parse_train_shapes", "run_model_benchmark"]

DEFAULT_MODELS = ("yolov8n.yaml", "yolov8n-bra.yaml", "yolov8n-dat.yaml")


def _inference_model(name: str, device: torch.device):
    from ..yolo.model import YOLO

    model = YOLO(name).model.to(device).float().eval()
    return model.fuse(verbose=False)


def _training_step(name: str, device: torch.device, batch: int, imgsz: int):
    """One Ultralytics training step of model ``name`` on fixed synthetic images and boxes."""
    from ultralytics.cfg import get_cfg
    from ultralytics.utils import DEFAULT_CFG

    from ..yolo.model import YOLO

    model = YOLO(name).model.to(device).float().train()
    model.args = get_cfg(DEFAULT_CFG)  # the loss reads its gains from here
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    boxes = 6 * batch
    data = {"img": torch.rand(batch, 3, imgsz, imgsz, generator=g).to(device),
            "batch_idx": torch.arange(batch).repeat_interleave(6).float().to(device),
            "cls": torch.randint(0, 80, (boxes, 1), generator=g).float().to(device),
            "bboxes": torch.cat([torch.rand(boxes, 2, generator=g) * 0.6 + 0.2,
                                 torch.rand(boxes, 2, generator=g) * 0.2 + 0.05], 1).to(device)}

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss, _ = model.loss(data)
        loss.sum().backward()
        optimizer.step()

    return model, step


def run_model_benchmark(models=DEFAULT_MODELS, imgsz: int = 640, device: str = "cpu", threads: int = 2,
                        rounds: int = 15, reps: int = 3, modes=("inference", "train"),
                        train_shapes=((8, 320), (4, 640)), build: str | None = None, printer=print) -> list[dict]:
    """Measure each model's inference latency and training-step time; print tables with ratios to the first.

    Returns:
        one dict per (model, mode, shape): ``model``, ``mode``, ``batch``, ``imgsz``, ``ms``, ``ratio``, ``params``,
        ``gflops`` (at ``imgsz``).

    Raises:
        ValueError: ``modes`` is not ``"both"`` or made of ``"inference"`` and ``"train"``.
    """
    from ultralytics.utils.torch_utils import get_flops

    from ..nn.functional import routed_attention_cpu as cpu

    modes = parse_modes(modes if isinstance(modes, str) else ",".join(modes))
    torch.set_num_threads(threads)
    dev = torch.device(device)
    rows = []
    with cpu.use_build(build) if build else contextlib.nullcontext():
        printer(f"whole models on {machine_line(machine_info(device))}")
        if "inference" in modes:
            nets = {name: _inference_model(name, dev) for name in models}
            x = torch.zeros(1, 3, imgsz, imgsz, device=dev)
            with torch.no_grad():
                times = interleaved_rounds({n: (lambda net=net: net(x)) for n, net in nets.items()}, dev, rounds, reps)
            for name, net in nets.items():
                rows.append({"model": name, "mode": "inference", "batch": 1, "imgsz": imgsz,
                             "ms": statistics.median(times[name]), "ratio": ratio_median(times[name], times[models[0]]),
                             "params": sum(p.numel() for p in net.parameters()), "gflops": get_flops(net, imgsz)})
            del nets
        if "train" in modes:
            for batch, size in train_shapes:
                steps = {name: _training_step(name, dev, batch, size)[1] for name in models}
                times = interleaved_rounds(steps, dev, max(3, rounds // 3), 1, warmup=2)
                for name in models:
                    rows.append({"model": name, "mode": "train", "batch": batch, "imgsz": size,
                                 "ms": statistics.median(times[name]),
                                 "ratio": ratio_median(times[name], times[models[0]])})
                del steps
    printer("| model | mode | batch × imgsz | params (M) | GFLOPs @640 | ms | ratio to the first (per-round median) |")
    printer("|---|---|---|---|---|---|---|")
    for row in rows:
        params = f"{row['params'] / 1e6:.3f}" if "params" in row else ""
        gflops = f"{row['gflops']:.2f}" if "gflops" in row else ""
        printer(f"| {row['model']} | {row['mode']} | {row['batch']} × {row['imgsz']} | {params} | {gflops} | "
                f"{row['ms']:.1f} | {row['ratio']:.3f} |")
    return rows


MODES = ("inference", "train")


def parse_modes(text: str) -> tuple[str, ...]:
    """``"inference"``, ``"train"``, ``"inference,train"`` or ``"both"`` as a tuple of modes; anything else raises."""
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    modes = MODES if names == ["both"] else tuple(dict.fromkeys(names))
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"modes {text!r}: expected inference, train, both or a comma-separated list of "
                         f"{', '.join(MODES)}")
    return modes


def parse_train_shapes(text: str) -> list[tuple[int, int]]:
    """``"8x320,4x640"`` as ``[(8, 320), (4, 640)]``; a malformed or non-positive entry raises."""
    shapes = []
    for spec in (s.strip() for s in text.split(",")):
        match = re.fullmatch(r"(\d+)[xX](\d+)", spec)
        if not match or min(int(match[1]), int(match[2])) < 1:
            raise ValueError(f"training shapes {text!r}: expected BATCHxIMGSZ entries such as 8x320,4x640, got {spec!r}")
        shapes.append((int(match[1]), int(match[2])))
    return shapes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model YAMLs or weights")
    parser.add_argument("--imgsz", type=int, default=640, help="inference image size (batch 1)")
    parser.add_argument("--modes", default="inference,train",
                        help="inference, train, or both (the default)")
    parser.add_argument("--train", default="8x320,4x640", help="training steps as BATCHxIMGSZ, comma-separated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--build", default=None, help="CPU kernel -march target, e.g. x86-64-v3 (AVX2), x86-64 (SSE2)")
    args = parser.parse_args(argv)
    try:
        modes = parse_modes(args.modes)
        train_shapes = parse_train_shapes(args.train) if "train" in modes else []
    except ValueError as e:
        parser.error(str(e))
    run_model_benchmark(args.models.split(","), args.imgsz, args.device, args.threads, args.rounds,
                        modes=modes, train_shapes=train_shapes, build=args.build)
    return 0


if __name__ == "__main__":
    sys.exit(main())
