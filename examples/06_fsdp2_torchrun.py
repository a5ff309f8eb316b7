"""FSDP2 (``fully_shard``) with a captured AdamW, launched with torchrun.

    torchrun --nproc-per-node 2 examples/06_fsdp2_torchrun.py       # gloo on CPU, NCCL on CUDA

Shard each layer, then the root, *then* build the optimizer over ``model.parameters()`` (DTensors sharded on dim 0)
and capture it: ``optcapture.capture(torch.optim.AdamW(model.parameters()))``. ``clip_grad_norm_`` works on the
sharded grads as usual (it all-reduces the norm). The step is bucketed over each rank's local shards: flat storage
holds them, and FSDP2's own sharded data views the same memory, so each forward all-gathers the updated values;
``optcapture.explain(opt)`` says so. It is exact: each rank's shard of the params and of AdamW's state is
checked against an eager FSDP2 model trained beside it on the same batches; the script exits non-zero otherwise.
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
from torch.distributed.fsdp import fully_shard

import optcapture


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8, bias=False))


def shard(model: nn.Module, device: torch.device) -> nn.Module:
    model.to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)  # each layer all-gathers its params in its own forward
    fully_shard(model)
    return model


# %% Training: the captured optimizer, and an eager one to check it against
def train(steps: int, device: torch.device) -> float:
    rank = dist.get_rank()
    base = make_model()
    eager_model, model = shard(copy.deepcopy(base), device), shard(copy.deepcopy(base), device)
    eager_optimizer = torch.optim.AdamW(eager_model.parameters(), lr=1e-2, weight_decay=0.01)
    optimizer = optcapture.capture(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01))

    for step in range(steps):
        generator = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(8, 16, generator=generator).to(device), torch.randn(8, 8, generator=generator).to(device)
        for m, o in ((eager_model, eager_optimizer), (model, optimizer)):
            nn.functional.mse_loss(m(x), y).backward()  # FSDP2 reduce-scatters the grads here
            nn.utils.clip_grad_norm_(m.parameters(), max_norm=0.5)
            o.step()
            o.zero_grad()

    # Each rank holds its shard of every param and of AdamW's state: compare those.
    difference = torch.stack([
        (a.to_local() - b.to_local()).abs().max()
        for p, q in zip(eager_model.parameters(), model.parameters(), strict=True)
        for a, b in [(p, q), *((eager_optimizer.state[p][k], optimizer.state[q][k]) for k in ("exp_avg", "exp_avg_sq"))]
    ]).max().item()  # torch's max propagates NaN
    worst = torch.tensor([difference if difference == difference else math.inf], device=device)  # NaN: inf
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if rank == 0:
        for report in optcapture.explain(optimizer):
            print(report.describe())
        print(f"{steps} steps on {dist.get_world_size()} ranks ({device.type}); max |captured - eager| over local "
              f"shards of params and state, all ranks: {worst.item():.2e}")
    return worst.item()


def main(steps: int = 4) -> float:
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
    parser.add_argument("--steps", type=int, default=4)
    difference = main(parser.parse_args().steps)
    if not difference <= 1e-5:  # NaN included
        raise SystemExit(f"captured step diverged from eager by {difference}")
