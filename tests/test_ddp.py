"""Multi-process training: two processes with DistributedDataParallel (gloo on the CPU) train YOLO models with
BRA and with DAT; the all-reduced gradients equal the average of single-process gradients on each rank's share,
the weights stay identical across ranks, and no parameter is unused (find_unused_parameters=False works)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.parametrize("model", ["yolov8n-bra.yaml", pytest.param("yolov8n-dat.yaml", marks=pytest.mark.slow)])
def test_ddp_gradients_equal_the_single_process_average(tmp_path, model):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    rendezvous = tmp_path / "rendezvous"
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(rank), "2", model, str(tmp_path), str(rendezvous)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(err[-3000:] for _, err in outputs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for step, (r0, r1) in enumerate(zip(*ranks)):
        assert r0["unused"] == []  # every parameter receives a gradient
        for name, expected in r0["expected"].items():
            scale = max(1.0, expected.abs().max().item())
            torch.testing.assert_close(r0["grads"][name], expected, atol=2e-5 * scale, rtol=1e-4, msg=f"{step} {name}")
            torch.testing.assert_close(r1["grads"][name], r0["grads"][name], atol=0, rtol=0)
        for name in r0["weights"]:
            assert torch.equal(r0["weights"][name], r1["weights"][name]), f"step {step}: {name} differs across ranks"
