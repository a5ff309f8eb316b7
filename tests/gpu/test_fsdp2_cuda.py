"""FSDP2 on CUDA over NCCL at world size 1 (the DTensor path is the one N ranks take): the loop's tail
(``clip_grad_norm_``, whose global norm all-reduces over the mesh, ``step()``, ``zero_grad()``) compiled with the
backend matches the same tail run eagerly, reads FSDP2's grads (views into its reduce-scatter output, new each step)
in place through grad tables, never syncs with the host once warm, and compiles nothing after warm-up."""

from __future__ import annotations

import copy
import datetime
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import optcapture

pytestmark = pytest.mark.gpu

STEPS, WARMUP = 7, 3


@pytest.fixture(scope="module")
def nccl() -> Iterator[None]:
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("NCCL is not available")
    with tempfile.TemporaryDirectory(prefix="optcapture-nccl-") as folder:
        store = dist.FileStore(str(Path(folder) / "store"), 1)
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
        try:
            yield
        finally:
            dist.destroy_process_group()


def _sharded(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _tail(model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> Callable[[], torch.Tensor]:
    def tail() -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad()
        return norm

    return tail


def _local(tensor: Any) -> Any:
    """A DTensor's local shard, on the CPU (eager AdamW keeps its step counters there, a capture on the device)."""
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).detach().cpu()


@pytest.mark.parametrize("max_norm", [0.05, 1e6], ids=["clip-active", "clip-inactive"])
def test_an_fsdp2_tail_with_clipping_reads_grads_in_place_with_no_host_sync(nccl: None, max_norm: float) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)).cuda()
    sides = []
    for compiled in (False, True):
        model = _sharded(copy.deepcopy(base))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
        tail = _tail(model, optimizer, max_norm)
        sides.append((model, optimizer, scheduler, torch.compile(tail, backend="optcapture") if compiled else tail))
    graphs_at_warmup = 0
    norms: list[tuple[float, float]] = []
    for step in range(STEPS):
        if step == WARMUP:
            graphs_at_warmup = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        generator = torch.Generator(device="cuda").manual_seed(step)
        x = torch.randn(16, 32, device="cuda", generator=generator)
        pair = []
        for model, _, scheduler, tail in sides:
            model(x).pow(2).mean().backward()
            if step >= WARMUP:
                torch.cuda.set_sync_debug_mode("error")
            try:
                norm = tail()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            pair.append(float(_local(norm)))
            scheduler.step()
        norms.append((pair[0], pair[1]))
    (_, eager, _, _), (_, captured, _, _) = sides
    assert int(torch._dynamo.utils.counters["stats"]["unique_graphs"]) == graphs_at_warmup
    reports = optcapture.explain(captured)
    assert reports and reports[-1].path == "bucketed" and reports[-1].grads == "in place", reports
    for eager_norm, captured_norm in norms:
        assert captured_norm == pytest.approx(eager_norm, rel=1e-5), norms
    eager_params = [p for g in eager.param_groups for p in g["params"]]
    captured_params = [p for g in captured.param_groups for p in g["params"]]
    for p_eager, p_captured in zip(eager_params, captured_params, strict=True):
        torch.testing.assert_close(_local(p_captured), _local(p_eager), rtol=1e-5, atol=1e-6)
        for key, value in eager.state[p_eager].items():
            torch.testing.assert_close(_local(captured.state[p_captured][key]), _local(value), rtol=1e-5, atol=1e-6)
