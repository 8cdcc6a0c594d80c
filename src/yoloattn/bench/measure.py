"""Median time and peak memory of one layer case, measured in the current process.

Peak memory is what one forward+backward adds on top of the model, its input and one warm-up
step: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the peak resident set (Linux
``VmHWM``, reset through ``/proc/self/clear_refs``). On the CPU, run it in a fresh process
started with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed blocks go back to the system and the
resident set follows the live tensors (:func:`yoloattn.bench.layers` does); time in another one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["measure_case", "median_ms", "interleaved_median_ms"]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, budget_s: float = 2.0, min_reps: int = 3,
              max_reps: int = 20) -> float:
    """Median wall time of ``fn`` in milliseconds after one warm-up call."""
    fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def interleaved_median_ms(fns: dict[str, Callable[[], object]], device: torch.device, budget_s: float = 4.0,
                          min_reps: int = 5, max_reps: int = 30) -> dict[str, float]:
    """Median wall time of each function in milliseconds, calling them in turn (a, b, a, b, ...).

    Interleaving makes their ratio robust to the machine's speed drifting during the run (a shared
    virtual machine can change by 30% within seconds); each gets one warm-up call first.
    """
    for fn in fns.values():
        fn()
        _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    while len(times[next(iter(fns))]) < min_reps or (
            len(times[next(iter(fns))]) < max_reps and time.perf_counter() - start < budget_s):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def peak_memory_mib(step: Callable[[], object], device: torch.device) -> float:
    """Memory that one call of ``step`` adds at its peak, in MiB (after one warm-up call)."""
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


def measure_case(build: Callable[[], torch.nn.Module], shape: tuple[int, ...], device: str = "cpu",
                 dtype: str = "float32", backends: tuple[str, ...] = ("auto",), what: str = "time") -> dict:
    """Forward and forward+backward median times of each backend, or the peak memory of forward+backward.

    Args:
        build: returns the layer (built on the CPU in fp32; moved here).
        shape: input shape (N, C, H, W).
        device: ``'cpu'`` or a CUDA device.
        dtype: ``'float32'``, or ``'bfloat16'``/``'float16'`` for autocast.
        backends: yoloattn backends to compare on the same layer and input; times are interleaved.
        what: ``'time'`` ({backend: {``fwd_ms``, ``fwdbwd_ms``}}) or ``'memory'`` ({backend: {``peak_mib``}},
            one backend: run each in a fresh process, so that one's peak does not hide the other's).
    """
    from ..nn.backend import use_backend

    dev = torch.device(device)
    layer = build().to(dev)
    x = torch.randn(shape, device=dev, requires_grad=True)
    amp = dtype != "float32"
    amp_dtype = getattr(torch, dtype)

    def forward(backend):
        with use_backend(backend), torch.autocast(dev.type, dtype=amp_dtype, enabled=amp):
            out = layer(x)
        return out[0] if isinstance(out, tuple) else out

    def forward_backward(backend):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        forward(backend).float().sum().backward()

    if what == "memory":
        if len(backends) != 1:
            raise ValueError(f"measure the memory of one backend per process, got {backends}")
        return {backends[0]: {"peak_mib": peak_memory_mib(lambda: forward_backward(backends[0]), dev)}}
    with torch.no_grad():
        fwd = interleaved_median_ms({b: (lambda b=b: forward(b)) for b in backends}, dev)
    fwdbwd = interleaved_median_ms({b: (lambda b=b: forward_backward(b)) for b in backends}, dev)
    return {b: {"fwd_ms": fwd[b], "fwdbwd_ms": fwdbwd[b]} for b in backends}
