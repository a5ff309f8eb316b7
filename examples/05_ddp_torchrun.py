"""DistributedDataParallel with a captured AdamW, launched with torchrun.

    torchrun --nproc-per-node 2 examples/05_ddp_torchrun.py        # gloo on CPU, NCCL on CUDA

DDP all-reduces the grads during ``backward()``; the optimizer then steps each rank's full copy of the params, so
the step is captured exactly as on one process: ``optcapture.capture(opt)`` (or ``torch.compile(opt.step,
backend="optcapture")``). With DDP's default options the step is bucketed and compiles once. With
``gradient_as_bucket_view=True`` the grads are views into DDP's buckets and the step runs as Inductor's per-tensor
graph (it recompiles once, when DDP rebuilds its buckets after the first iteration): still exact, not bucketed.

Each rank trains an eager copy beside the captured one on the same batches and checks that params and AdamW's state
agree; the script exits non-zero if any rank differs.
"""

# %% Imports and model
from __future__ import annotations

import argparse
import copy
import math
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import optcapture


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial params on every rank (DDP also broadcasts rank 0's)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))


def batch(step: int, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own shard of the data
    return torch.randn(16, 32, generator=generator).to(device), torch.randn(16, 8, generator=generator).to(device)


# %% Training: the captured optimizer, and an eager one to check it against
def train(steps: int, device: torch.device) -> float:
    rank = dist.get_rank()
    device_ids = [device.index] if device.type == "cuda" else None
    eager_model = DistributedDataParallel(make_model().to(device), device_ids=device_ids)
    model = DistributedDataParallel(copy.deepcopy(eager_model.module), device_ids=device_ids)

    eager_optimizer = torch.optim.AdamW(eager_model.parameters(), lr=1e-3, weight_decay=0.01)
    optimizer = optcapture.capture(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01))
    schedulers = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-3, total_steps=steps)
                  for o in (eager_optimizer, optimizer)]

    for step in range(steps):
        x, y = batch(step, rank, device)
        for m, o, s in zip((eager_model, model), (eager_optimizer, optimizer), schedulers, strict=True):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()  # DDP all-reduces the grads here
            o.step()
            s.step()

    difference = torch.stack([
        (a - b).abs().max()
        for p, q in zip(eager_model.parameters(), model.parameters(), strict=True)
        for a, b in [(p, q), *((eager_optimizer.state[p][k], optimizer.state[q][k]) for k in ("exp_avg", "exp_avg_sq"))]
    ]).max().item()  # torch's max propagates NaN
    worst = torch.tensor([difference if difference == difference else math.inf], device=device)  # NaN: inf
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # every rank checks every rank
    if rank == 0:
        for report in optcapture.explain(optimizer):
            print(report.describe())
        print(f"{steps} steps on {dist.get_world_size()} ranks ({device.type}); max |captured - eager| over params "
              f"and state, all ranks: {worst.item():.2e}")
    return worst.item()


def main(steps: int = 6) -> float:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    try:
        if backend == "nccl":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        return train(steps, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    difference = main(parser.parse_args().steps)
    if not difference <= 1e-5:  # NaN included
        raise SystemExit(f"captured step diverged from eager by {difference}")
