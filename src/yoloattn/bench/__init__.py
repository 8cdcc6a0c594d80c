"""Speed and memory measurement of the yoloattn layers and of whole models (``yoloattn bench``)."""

from .layers import LAYERS, run_layer_benchmark
from .models import run_model_benchmark

__all__ = ["LAYERS", "run_layer_benchmark", "run_model_benchmark"]
