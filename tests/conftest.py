import os
import sys

import pytest
import torch

# Tests never touch the network; Ultralytics is kept offline by yoloattn itself as well.
os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))  # for seed_reference

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
