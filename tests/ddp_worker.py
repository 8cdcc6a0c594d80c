"""Worker of the multi-process training test: one rank of a 2-process DistributedDataParallel run (gloo, CPU).

Every rank builds the same YOLO model (the seed), trains ``STEPS`` steps with Ultralytics' detection loss on its
own share of a fixed synthetic batch, and writes, per step, the gradients DDP all-reduced and the weights after
the optimizer step. Rank 0 also computes the reference without DDP: for every rank's share, the gradients of a
fresh copy of the model in one process (so BatchNorm statistics are per share, as under DDP), averaged.
"""

import os
import sys

import torch

STEPS = 2
PER_RANK = 2
IMGSZ = 64


def _batch(rank: int, step: int) -> dict:
    g = torch.Generator().manual_seed(1000 * step + rank)
    boxes = 3 * PER_RANK
    return {"img": torch.rand(PER_RANK, 3, IMGSZ, IMGSZ, generator=g),
            "batch_idx": torch.arange(PER_RANK).repeat_interleave(3).float(),
            "cls": torch.randint(0, 4, (boxes, 1), generator=g).float(),
            "bboxes": torch.cat([torch.rand(boxes, 2, generator=g) * 0.6 + 0.2,
                                 torch.rand(boxes, 2, generator=g) * 0.2 + 0.1], 1)}


def _model(name: str):
    from ultralytics.cfg import get_cfg
    from ultralytics.utils import DEFAULT_CFG

    from yoloattn import YOLO

    torch.manual_seed(0)
    model = YOLO(name).model.float().train()
    model.args = get_cfg(DEFAULT_CFG)
    return model


def _loss(model, batch):
    loss, _ = model(batch)  # an Ultralytics model's forward on a batch dict is its loss (also through DDP)
    return loss.sum()


def run(rank: int, world: int, name: str, out_dir: str, rendezvous: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        model = _model(name)
        reference = _model(name) if rank == 0 else None
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
        records = []
        for step in range(STEPS):
            expected = None
            if rank == 0:  # the single-process gradients of every share, from the same weights, averaged
                shares = []
                for r in range(world):
                    reference.load_state_dict(model.state_dict())
                    reference.zero_grad(set_to_none=True)
                    _loss(reference, _batch(r, step)).backward()
                    trained = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]  # not DFL's
                    unused = [n for n, p in trained if p.grad is None]
                    shares.append({n: p.grad.clone() for n, p in trained if p.grad is not None})
                expected = {n: sum(s[n] for s in shares) / world for n in shares[0]}
            optimizer.zero_grad(set_to_none=True)
            _loss(ddp, _batch(rank, step)).backward()  # DDP averages the gradients over the ranks
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            optimizer.step()
            records.append({"grads": grads, "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
                            "expected": expected, "unused": unused if rank == 0 else None})
        torch.save(records, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
