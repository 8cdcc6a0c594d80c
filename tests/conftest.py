import os
import sys

import pytest
import torch

# Tests never touch the network; Ultralytics is kept offline by yoloattn itself as well.
os.environ.setdefault("YOLO_OFFLINE", "1")
# 'auto' takes the CPU kernel wherever it can run, without timing it against SDPA first: tests check
# results, and the autotuner has tests of its own
os.environ.setdefault("YOLOATTN_AUTOTUNE", "0")
sys.path.insert(0, os.path.dirname(__file__))  # for the test-only reference implementations

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
