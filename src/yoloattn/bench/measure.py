"""Timing and memory measurement shared by every benchmark (layers, whole models, ``yoloattn ablate``).

Times are wall-clock medians. Implementations compared with each other are run interleaved (a, b, a, b,
...) in one process, so a drift of the machine's speed (a shared virtual machine changes by 30% within
seconds) cancels out of their ratios. Peak memory is what one call adds to the process at its peak: on
CUDA ``torch.cuda.max_memory_allocated``; on the CPU the peak resident set (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``) of a fresh process started with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed
blocks leave the resident set at once (:func:`run_worker` arranges it).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

__all__ = ["compared", "interleaved_rounds", "machine_info", "machine_line", "median_ms", "peak_memory_mib",
           "ratio_median", "run_worker", "table_cells"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_rounds(fns: dict[str, Callable[[], object]], device: torch.device | str = "cpu", rounds: int = 5,
                       reps: int = 3, budget_s: float | None = None, warmup: int = 1) -> dict[str, list[float]]:
    """Per-round median milliseconds of each function, the functions taking turns within every round.

    Args:
        fns: name -> function to time.
        device: where they run (CUDA is synchronised around each call).
        rounds: rounds; each times every function ``reps`` times back to back.
        reps: calls per function per round.
        budget_s: stop after this many seconds once 3 rounds are done (None: run all rounds).
        warmup: untimed calls of each function first.

    Returns:
        name -> one median per round, in round order.
    """
    device = torch.device(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
        _sync(device)
    out: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for r in range(rounds):
        for name, fn in fns.items():
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                _sync(device)
                samples.append((time.perf_counter() - t0) * 1e3)
            out[name].append(statistics.median(samples))
        if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
            break
    return out


def median_ms(fn: Callable[[], object], device: torch.device | str = "cpu", rounds: int = 5, reps: int = 3,
              budget_s: float | None = 2.0) -> float:
    """Median wall time of ``fn`` in milliseconds, after one warm-up call."""
    return statistics.median(interleaved_rounds({"fn": fn}, device, rounds, reps, budget_s)["fn"])


def ratio_median(rounds_a: list[float], rounds_b: list[float]) -> float:
    """Median over rounds of a / b: the ratio of two interleaved measurements, robust to the machine's drift."""
    return statistics.median(a / b for a, b in zip(rounds_a, rounds_b))


def compared(measured: dict, ref: dict | None) -> dict:
    """Median times of one implementation's rounds (``fwd_ms``, ``fwdbwd_ms``; None where it has no rounds) and,
    against ``ref`` (the reference's rounds), the speed-ups ``fwd_x``, ``fwdbwd_x`` (medians of per-round
    ratios) and the memory ratio ``mem_div`` where both peaks were measured."""
    row = {}
    for key, rounds in (("fwd", "fwd_rounds"), ("fwdbwd", "fwdbwd_rounds")):
        row[f"{key}_ms"] = statistics.median(measured[rounds]) if measured.get(rounds) else None
        if ref is not None and measured.get(rounds) and ref.get(rounds):
            row[f"{key}_x"] = ratio_median(ref[rounds], measured[rounds])
    row["peak_mib"] = measured.get("peak_mib")
    if ref is not None and ref.get("peak_mib") is not None and row["peak_mib"] is not None:
        row["mem_div"] = ref["peak_mib"] / max(row["peak_mib"], 1e-3)
    return row


def table_cells(row: dict, digits: int = 1) -> str:
    """The ``fwd ms | f+b ms | peak MiB | fwd × | f+b × | mem ÷`` cells of a :func:`compared` row."""
    def number(key, fmt):
        return format(row[key], fmt) if row.get(key) is not None else "—"

    return " | ".join([number("fwd_ms", f".{digits}f"), number("fwdbwd_ms", f".{digits}f"), number("peak_mib", ".0f"),
                       number("fwd_x", ".2f"), number("fwdbwd_x", ".2f"), number("mem_div", ".2f")])


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mib(step: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Memory that one call of ``step`` adds at its peak, in MiB (after one warm-up call)."""
    device = torch.device(device)
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current RSS
    base = _rss_kib("VmRSS")
    step()
    return (_rss_kib("VmHWM") - base) / 1024


def _cpu_model_and_isa() -> tuple[str, str]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "NEON" if "asimd" in flags
           else "SSE2" if "sse2" in flags else platform.machine())
    return model, isa


def machine_info(device: str = "cpu") -> dict:
    """Where a benchmark ran: CPU model and its widest vector ISA, cores, threads, versions, the kernel build."""
    from ..nn.functional import routed_attention_cpu as cpu

    model, isa = _cpu_model_and_isa()
    info = {"cpu": model, "isa": isa, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": device, "kernel": cpu.build_info(),
            # PyTorch's own CPU kernels: their ISA, and the caps of oneDNN (convolutions) and MKL (matrix
            # products: linear layers, bmm) where one is set (an AVX2-only CPU emulated)
            "torch_cpu": torch.backends.cpu.get_cpu_capability(), "onednn_max": os.environ.get("ONEDNN_MAX_CPU_ISA"),
            "mkl_max": os.environ.get("MKL_ENABLE_INSTRUCTIONS")}
    try:
        from importlib.metadata import version

        info["ultralytics"] = version("ultralytics")
    except Exception:  # noqa: BLE001
        info["ultralytics"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def machine_line(info: dict) -> str:
    """One line naming the machine for a table's header."""
    kernel = info["kernel"]
    build = (f"kernel -march={kernel['march']} ({kernel['isa']})" if kernel["available"]
             else "no CPU kernel")
    where = info.get("gpu") or f"{info['cpu']} ({info['isa']}, {info['cores']} cores)"
    torch_cpu = f"CPU kernels {info['torch_cpu']}" if info.get("torch_cpu") else ""
    if torch_cpu and info.get("onednn_max"):
        torch_cpu += f", oneDNN up to {info['onednn_max']}"
    if torch_cpu and info.get("mkl_max"):
        torch_cpu += f", MKL up to {info['mkl_max']}"
    elif torch_cpu and info.get("onednn_max"):
        # an emulation that caps oneDNN but not MKL runs every matrix product at the CPU's full width
        torch_cpu += ", MKL not capped (MKL_ENABLE_INSTRUCTIONS unset)"
    torch_line = f"torch {info['torch']}" + (f" ({torch_cpu})" if torch_cpu else "")
    return f"{where}, {info['threads']} threads, {torch_line}, ultralytics {info['ultralytics']}, {build}"


def run_worker(module: str, spec: dict, memory: bool = False) -> dict:
    """``python -m {module} --worker {spec}`` in a fresh process with ``spec['threads']`` threads; the JSON of its
    last output line. ``memory``: the process is set up for :func:`peak_memory_mib` and told so in
    ``spec['what']``. A worker that exits with 2 reports a user's mistake (its last stderr line, raised as
    ``ValueError``); any other failure raises ``RuntimeError`` with its traceback."""
    import json

    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    if memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed blocks leave the RSS at once
    proc = subprocess.run([sys.executable, "-m", module, "--worker",
                           json.dumps(dict(spec, what="memory" if memory else "time"))],
                          capture_output=True, text=True, env=env)
    if proc.returncode == 2 and proc.stderr.strip():
        raise ValueError(proc.stderr.strip().splitlines()[-1].removeprefix("error: "))
    if proc.returncode:
        raise RuntimeError(f"benchmark case {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
