"""``DistributedOptimizer`` over RPC with a captured local optimizer, on 2 CPU processes, against eager AdamW.

``DistributedOptimizer(cls, param_rrefs)`` builds ``cls(local_params)`` on each worker that owns params and steps it
from an RPC thread, with the grads of a distributed autograd context assigned to ``param.grad`` (``_LocalOptimizer``;
``torch.optim.AdamW`` itself is swapped for TorchScript's functional AdamW, which has nothing to capture). A subclass
that captures itself in ``__init__`` is the way in. Worker 0 drives: one weight lives on each worker, the forward
runs through both, and an eager and a captured ``DistributedOptimizer`` train copies of the same weights.
"""

from __future__ import annotations

from typing import Any

import _launch
import pytest
import torch
import torch.distributed.autograd as dist_autograd
from torch.distributed import rpc
from torch.distributed.optim import DistributedOptimizer

import optcapture

STEPS = 5
WARMUP = 2
ADAMW = {"lr": 1e-2, "weight_decay": 0.1}


class EagerAdamW(torch.optim.AdamW):
    """torch.optim.AdamW stepped by ``_LocalOptimizer``, as the captured one is (not TorchScript's functional one)."""


class CapturedAdamW(torch.optim.AdamW):
    """AdamW whose step is captured: what ``DistributedOptimizer`` is given to build on each worker."""

    def __init__(self, params: Any, **options: Any) -> None:
        super().__init__(params, **options)
        optcapture.capture(self)


def _weight(seed: int, shape: tuple[int, int]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def _remote_layer(weight: rpc.RRef, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ weight.local_value())


def _local_optimizer(optimizer: rpc.RRef) -> torch.optim.Optimizer:
    local: torch.optim.Optimizer = optimizer.local_value().optim
    return local


def _report(eager: rpc.RRef, captured: rpc.RRef, graphs_at_warmup: int) -> _launch.Outcome:
    captured_local = _local_optimizer(captured)
    return _launch.Outcome(eager=_launch.snapshot(_local_optimizer(eager)), captured=_launch.snapshot(captured_local),
                           paths=tuple(r.path for r in optcapture.explain(captured_local)),
                           graphs_after_warmup=_launch.graphs_compiled() - graphs_at_warmup, warnings=())


def _train(optimizer: DistributedOptimizer, weights: list[rpc.RRef], step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(4, 8, generator=generator)
    with dist_autograd.context() as context:
        hidden = torch.tanh(x @ weights[0].local_value())
        out = rpc.rpc_sync("worker1", _remote_layer, args=(weights[1], hidden))
        dist_autograd.backward(context, [out.square().mean()])
        optimizer.step(context)


def _worker(rank: int, world_size: int) -> dict[str, Any]:
    if rank != 0:
        return {}  # serves RPCs until rpc.shutdown()
    optimizers, weights = {}, {}
    for name, cls in (("eager", EagerAdamW), ("captured", CapturedAdamW)):
        weights[name] = [rpc.RRef(_weight(0, (8, 16))), rpc.remote("worker1", _weight, args=(1, (16, 4)))]
        optimizers[name] = DistributedOptimizer(cls, weights[name], **ADAMW)
    graphs_at_warmup = {}
    for step in range(STEPS):
        if step == WARMUP:
            graphs_at_warmup = {w: rpc.rpc_sync(w, _launch.graphs_compiled) for w in ("worker0", "worker1")}
        for name in ("eager", "captured"):
            _train(optimizers[name], weights[name], step)
    outcomes = {}
    for eager, captured in zip(optimizers["eager"].remote_optimizers, optimizers["captured"].remote_optimizers,
                               strict=True):
        owner = captured.owner().name
        outcomes[owner] = rpc.rpc_sync(owner, _report, args=(eager, captured, graphs_at_warmup[owner]))
    return outcomes


@pytest.fixture(scope="module")
def outcomes() -> dict[str, _launch.Outcome]:
    result: dict[str, _launch.Outcome] = _launch.spawn(_worker, rpc=True)[0]
    return result


@pytest.mark.parametrize("worker", ["worker0", "worker1"])
def test_distributed_optimizer_local_optimizers_are_captured_and_match_eager(
        outcomes: dict[str, _launch.Outcome], worker: str) -> None:
    outcome = outcomes[worker]
    _launch.assert_matches_eager(outcome)
    assert outcome.paths == ("bucketed",), outcome  # compiled in the worker's RPC thread
    assert outcome.graphs_after_warmup == 0, outcome
