"""Where BRA's time goes: a torch.profiler breakdown of one layer's forward+backward, by kind of work.

    python -m yoloattn.bench.profile --shape 8,64,40,40            # the P3 map of a training step at 320, batch 8
    python -m yoloattn.bench.profile --shape 1,64,80,80 --build x86-64-v3 --backend sdpa

Categories (self CPU time of the ops, summed over the profiled steps, per step): the attention (the CPU
kernel's forward and backward ops, or SDPA and the window gathers), the q/kv/output projections and their
gradients, the LePE depthwise convolution, the window router (means, logits, top-k), copies (pad, crops,
layout changes, concatenations of gradients) and the rest (autograd bookkeeping, element-wise ops).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import defaultdict

import torch

from ..nn.functional import routed_attention_cpu as cpu
from .measure import machine_info, machine_line

__all__ = ["CATEGORIES", "profile_bra"]

# op name -> category; first match wins
CATEGORIES = [
    # a custom op with autograd runs its forward inside an autograd function named GeneratedBackwardFor_<op>
    ("attention (kernel backward)", ("yoloattn::routed_attention_backward", "yoloattn::routed_attention_qkv_backward")),
    ("attention (kernel forward)", ("yoloattn::routed_attention", "GeneratedBackwardFor_yoloattn_routed_attention")),
    ("attention (sdpa, gathers)", ("scaled_dot_product", "_flash_attention", "index_select", "index_add", "gather",
                                   "_efficient_attention", "softmax_backward")),
    ("projections (qkv, wo) and grads", ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul")),
    ("LePE depthwise conv and grads", ("convolution", "conv2d", "conv_depthwise")),
    ("router (window means, logits, top-k)", ("aten::topk", "aten::bmm", "aten::_softmax", "aten::sort")),
    ("copies (pad, crop, layout, cat)", ("aten::copy_", "aten::cat", "constant_pad_nd", "aten::clone", "aten::contiguous",
                                         "aten::fill_", "aten::zero_", "aten::zeros", "aten::new_zeros")),
]


def _category(name: str) -> str:
    for category, keys in CATEGORIES:
        if any(name == k or name.startswith(k) if k.startswith(("yoloattn::", "Generated")) else k in name
               for k in keys):
            return category
    return "other (element-wise, reductions, autograd)"


def profile_bra(shape=(8, 64, 40, 40), backend: str = "auto", build: str | None = None, steps: int = 5,
                threads: int = 2) -> dict[str, float]:
    """Milliseconds per forward+backward of BRA (BiFormer's defaults at ``shape[1]`` channels) by category."""
    from torch.profiler import ProfilerActivity, profile

    from ..nn import BiLevelRoutingAttention, use_backend
    from ..nn.functional import routed_attention_cpu as cpu

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(shape[1])
    x = torch.randn(shape, requires_grad=True)
    with use_backend(routed_attention=backend), cpu.use_build(build) if build else contextlib.nullcontext():
        for _ in range(2):
            layer(x).sum().backward()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                layer(x).sum().backward()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        totals[_category(event.key)] += event.self_cpu_time_total / 1e3 / steps
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8,64,40,40", help="N,C,H,W")
    parser.add_argument("--backend", default="auto", help="routed_attention backend: auto, cpu, dense, sdpa, reference")
    parser.add_argument("--build", default=None, help="CPU kernel -march target (x86-64-v3: AVX2, x86-64: SSE2)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    totals = profile_bra(shape, args.backend, args.build, args.steps, args.threads)
    total = sum(totals.values())
    with cpu.use_build(args.build) if args.build else contextlib.nullcontext():
        machine = machine_line(machine_info())
    print(f"BRA forward+backward at {shape}, backend {args.backend}, on {machine}: {total:.1f} ms per step (profiled)")
    print("| category | ms | share |\n|---|---|---|")
    for category, ms in totals.items():
        print(f"| {category} | {ms:.1f} | {ms / total:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
