"""FSDP2 (``fully_shard`` per layer and at the root) with a captured AdamW, on 2 CPU processes, against eager AdamW.

Params, grads and AdamW's state are DTensors sharded on dim 0; what is compared is each rank's local shard. Every
scenario has a layer used on even steps only, so its grads come and go (FSDP2 leaves them ``None`` when the layer's
forward did not run). The step is bucketed over the local shards (FSDP2's padded shard, which each forward
all-gathers, views the same flat storage); FSDP2's grads are views into its reduce-scatter output, whose storage
offsets Dynamo passes as symbols that describe only where the grads lie. All
scenarios run in one pair of processes (one spawn for the module: a compile of a DTensor step takes tens of seconds
on a small CPU).
"""

from __future__ import annotations

import copy
from typing import Any

import _launch
import pytest
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

import optcapture

STEPS = 6
# Warm once every combination was compiled: step 0 (lr 0.01, all grads), step 1 (the first lr change: the per-tensor
# graph reads lr as a constant and recompiles once, as stock torch.compile does; the layer's grads absent), step 2.
WARMUP = 3
ADAMW = {"lr": 1e-2, "weight_decay": 0.1}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(8, 16)
        self.sometimes = nn.Linear(16, 16, bias=False)  # used on even steps only: its grads come and go
        self.head = nn.Linear(16, 3, bias=False)  # 3 rows on 2 ranks: rank 1's shard is padded by FSDP2

    def forward(self, x: torch.Tensor, use_sometimes: bool) -> torch.Tensor:
        hidden = torch.relu(self.inner(x))
        if use_sometimes:
            hidden = hidden + torch.tanh(self.sometimes(hidden))
        return self.head(hidden)


def _sharded(model: Net) -> Net:
    for layer in (model.inner, model.sometimes, model.head):
        fully_shard(layer)
    fully_shard(model)
    return model


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + torch.distributed.get_rank())
    x, y = torch.randn(8, 8, generator=generator), torch.randn(8, 3, generator=generator)
    return nn.functional.mse_loss(model(x, use_sometimes=step % 2 == 0), y)


def _fsdp2(clip: float | None, scheduled: bool) -> _launch.Outcome:
    torch.manual_seed(0)
    base = Net()
    sides = []
    for captured in (False, True):
        model = _sharded(copy.deepcopy(base))
        optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
        if captured:
            optcapture.capture(optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s)) if scheduled else None
        sides.append(_launch.Side(model, optimizer, scheduler))
    return _launch.train_side_by_side(sides[0], sides[1], _loss, STEPS, warmup=WARMUP, clip=clip)


def _dtensor_params_with_fresh_grads() -> _launch.Outcome:
    """DTensor params without FSDP (as tensor parallelism shards them), given new DTensor grads each step."""
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    values = [torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    eager = torch.optim.AdamW([nn.Parameter(distribute_tensor(v, mesh, [Shard(0)])) for v in values], **ADAMW)
    captured = optcapture.capture(
        torch.optim.AdamW([nn.Parameter(distribute_tensor(v, mesh, [Shard(0)])) for v in values], **ADAMW))
    for step in range(3):
        grads = [torch.randn(8, 4, generator=torch.Generator().manual_seed(10 * step + i)) for i in range(2)]
        for optimizer in (eager, captured):
            for p, grad in zip(optimizer.param_groups[0]["params"], grads, strict=True):
                p.grad = distribute_tensor(grad, mesh, [Shard(0)])
            optimizer.step()
    return _launch.Outcome(eager=_launch.snapshot(eager), captured=_launch.snapshot(captured),
                           paths=tuple(r.path for r in optcapture.explain(captured)), graphs_after_warmup=0,
                           warnings=())


def _worker(rank: int, world_size: int) -> dict[str, Any]:
    return _launch.run_scenarios({
        "plain": lambda: _fsdp2(clip=None, scheduled=False),
        "clip_grad_norm_ and LambdaLR": lambda: _fsdp2(clip=0.5, scheduled=True),
        "dtensor params, fresh grads": _dtensor_params_with_fresh_grads,
    })


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return _launch.spawn(_worker, timeout=300)


RANKS = [0, 1]
SCENARIOS = ["plain", "clip_grad_norm_ and LambdaLR"]


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fsdp2_local_shards_match_eager_with_no_recompile_once_warm(results: Any, scenario: str, rank: int) -> None:
    outcome = _launch.outcome_of(results, scenario, rank)
    _launch.assert_matches_eager(outcome)  # params and exp_avg, exp_avg_sq, step: this rank's shards
    assert outcome.graphs_after_warmup == 0, outcome  # see WARMUP
    assert outcome.paths and set(outcome.paths) <= {"bucketed", "per-tensor"}, outcome.paths


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fsdp2_step_is_bucketed(results: Any, scenario: str, rank: int) -> None:
    assert set(_launch.outcome_of(results, scenario, rank).paths) == {"bucketed"}


@pytest.mark.parametrize("rank", RANKS)
def test_dtensor_params_with_fresh_grads_match_eager(results: Any, rank: int) -> None:
    # DTensor params given new (non-view) DTensor grads: moving them into flat storage once raised into the training
    # loop ('aten.copy_.default got mixed torch.Tensor and DTensor'); their local shards are bucketed, and each step
    # copies the local tensors of the grads.
    outcome = _launch.outcome_of(results, "dtensor params, fresh grads", rank)
    _launch.assert_matches_eager(outcome)
    assert "bucketed" in outcome.paths and set(outcome.paths) <= {"bucketed", "first-step"}, outcome.paths
