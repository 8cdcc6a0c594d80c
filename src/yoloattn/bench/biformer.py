"""BiFormer network benchmark: the official math (every op on its ``reference`` backend) against yoloattn's
automatic choice, forward (eval, no grad) and forward+backward (train mode), with peak memory.

    python -m yoloattn.bench.biformer                    # BiFormer-T at 224 (batch 1 and 16), dense at 640
    python benchmarks/biformer.py --cases tiny@224x16 --threads 2

Cases are ``<variant>@<imgsz>x<batch>``: ``tiny``/``small``/``base`` are the classifiers (n_win 7),
``dense-tiny`` etc. the detection backbone (n_win 16, padding to whole windows, 4 stage outputs).
``checkpoint`` rows are the automatic choice with per-stage gradient checkpointing, ``checkpoint-mlp`` with only
each block's MLP branch recomputed (``set_grad_checkpointing(granularity='mlp')``). Each timing is the
median of interleaved rounds; ratios are medians of per-round ratios; memory is measured in a fresh process
per row (peak RSS added by one step after a warm-up).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch

from .measure import (compared, interleaved_rounds, machine_info, machine_line, peak_memory_mib, run_worker,
                      table_cells)

__all__ = ["DEFAULT_CASES", "run_biformer_benchmark"]

DEFAULT_CASES = ("tiny@224x1", "tiny@224x16", "dense-tiny@640x1")
IMPLS = ("reference", "auto", "checkpoint-mlp", "checkpoint")


def _parse_case(case: str) -> tuple[str, int, int]:
    try:
        variant, _, size = case.partition("@")
        imgsz, _, batch = size.partition("x")
        parsed = variant, int(imgsz), int(batch)
    except ValueError:
        parsed = None
    if parsed is None or parsed[0].removeprefix("dense-") not in ("tiny", "small", "base") or min(parsed[1:]) < 1:
        raise ValueError(f"case {case!r} is not <variant>@<imgsz>x<batch> with variant tiny, small, base or "
                         f"dense-tiny, dense-small, dense-base (e.g. tiny@224x16)")
    return parsed


def _network(variant: str):
    from ..models import biformer as models

    if variant.startswith("dense-"):
        return models.biformer_dense(variant.removeprefix("dense-"))
    return getattr(models, f"biformer_{variant}")()


def _context(impl: str):
    from ..nn.backends import use_backend

    return use_backend("reference") if impl == "reference" else contextlib.nullcontext()


def _worker(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    variant, imgsz, batch = _parse_case(spec["case"])
    net = _network(variant)
    x = torch.randn(batch, 3, imgsz, imgsz)

    def forward(impl):
        with _context(impl):
            out = net(x)
        return sum(o.float().sum() for o in out) if isinstance(out, (list, tuple)) else out.float().sum()

    def forward_backward(impl):
        net.set_grad_checkpointing(False, granularity="stage")
        net.set_grad_checkpointing(False, granularity="mlp")
        if impl.startswith("checkpoint"):
            net.set_grad_checkpointing(True, granularity="mlp" if impl == "checkpoint-mlp" else "stage")
        net.zero_grad(set_to_none=True)
        forward(impl).backward()

    impls = spec["impls"]
    if spec["what"] == "memory":
        net.train()
        return {impls[0]: {"peak_mib": peak_memory_mib(lambda: forward_backward(impls[0]))}}
    net.eval()
    with torch.no_grad():
        # checkpointing changes nothing without autograd: no forward rows of their own
        inference = {i: (lambda i=i: forward(i)) for i in impls if not i.startswith("checkpoint")}
        fwd = interleaved_rounds(inference, rounds=5, reps=2, budget_s=30)
    net.train()
    fwdbwd = interleaved_rounds({i: (lambda i=i: forward_backward(i)) for i in impls}, rounds=5, reps=1, budget_s=60)
    return {i: {"fwd_rounds": fwd.get(i), "fwdbwd_rounds": fwdbwd[i]} for i in impls}


def _run_worker(spec: dict, memory: bool = False) -> dict:
    return run_worker("yoloattn.bench.biformer", spec, memory)


def run_biformer_benchmark(cases=DEFAULT_CASES, threads: int = 2, memory: bool = True, printer=print) -> list[dict]:
    """Measure every (case, implementation) and print a table; returns one dict per row."""
    for case in cases:
        _parse_case(case)
    torch.set_num_threads(threads)
    printer(f"BiFormer benchmark on {machine_line(machine_info('cpu'))}; float32; medians of interleaved rounds")
    header = ("| network | input (N, 3, H, W) | path | fwd ms | f+b ms | peak MiB | fwd × ref | f+b × ref "
              "| mem ÷ ref |")
    printer(header)
    printer("|" + "---|" * (header.count("|") - 1))
    rows = []
    for case in cases:
        variant, imgsz, batch = _parse_case(case)
        spec = dict(case=case, threads=threads, impls=list(IMPLS))
        measured = _run_worker(spec)
        if memory:
            for impl in IMPLS:
                measured[impl].update(_run_worker(dict(spec, impls=[impl]), memory=True)[impl])
        ref = measured["reference"]
        for impl in IMPLS:
            row = dict(case=case, variant=variant, imgsz=imgsz, batch=batch, threads=threads, impl=impl,
                       **compared(measured[impl], ref))
            rows.append(row)
            printer(f"| BiFormer-{variant} | ({batch}, 3, {imgsz}, {imgsz}) | {impl} | {table_cells(row, 0)} |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help="comma-separated <variant>@<imgsz>x<batch>")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.worker:
        try:
            print(json.dumps(_worker(json.loads(args.worker))))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        cases = [c.strip() for c in args.cases.split(",") if c.strip()]
        rows = run_biformer_benchmark(cases, threads=args.threads, memory=not args.no_memory)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
