"""Speed and memory measurements of the yoloattn layers, each case in a fresh process."""

from .layers import LAYER_CASES, run_layer_benchmark
from .measure import measure_case

__all__ = ["LAYER_CASES", "measure_case", "run_layer_benchmark"]
