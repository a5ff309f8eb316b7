"""FSDP2 (``fully_shard`` per layer and at the root) with a captured AdamW, on 2 CPU processes, against eager AdamW.

Params, grads and AdamW's state are DTensors sharded on dim 0; what is compared is each rank's local shard. Every
scenario has a layer used on even steps only, so its grads come and go (FSDP2 leaves them ``None`` when the layer's
forward did not run). The step is bucketed over the local shards (FSDP2's padded shard, which each forward
all-gathers, views the same flat storage); FSDP2's grads are views into its reduce-scatter output, whose storage
offsets Dynamo passes as symbols that describe only where the grads lie. HSDP (``fully_shard`` on a 2-D
``("replicate", "shard")`` mesh) places each param ``(Replicate(), Shard(0))``: stepped the same way. A DCP
checkpoint (``torch.distributed.checkpoint``) saved mid-run is loaded into a fresh captured optimizer and back into
the live one, and training goes on; each is compared with an eager run that was never interrupted. The loop's tail
(``clip_grad_norm_``, whose global norm all-reduces across ranks, the step and ``zero_grad``) compiled as one function
with the backend is stepped the same way. All scenarios
run in one pair of processes (one spawn for the module: a compile of a DTensor step takes tens of seconds on a small
CPU).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import _launch
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

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


def _sharded(model: Net, mesh: DeviceMesh | None = None) -> Net:
    for layer in (model.inner, model.sometimes, model.head):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + torch.distributed.get_rank())
    x, y = torch.randn(8, 8, generator=generator), torch.randn(8, 3, generator=generator)
    return nn.functional.mse_loss(model(x, use_sometimes=step % 2 == 0), y)


def _compiled_tail(model: nn.Module, optimizer: torch.optim.Optimizer, clip: float | None) -> Callable[[], Any]:
    """The loop's tail as users compile it: clip (the global norm: an all-reduce across ranks), step, zero_grad."""

    def tail() -> Any:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip) if clip is not None else None
        optimizer.step()
        optimizer.zero_grad()
        return norm

    return torch.compile(tail, backend="optcapture")


def _fsdp2(clip: float | None, scheduled: bool, hsdp: bool = False, compiled_tail: bool = False) -> _launch.Outcome:
    # HSDP: replicate over the mesh's first dim, shard over its second (here of one rank: each shard is the whole
    # param, and FSDP2 all-reduces the grads over "replicate" after reduce-scattering them over "shard").
    mesh = init_device_mesh("cpu", (dist.get_world_size(), 1), mesh_dim_names=("replicate", "shard")) if hsdp else None
    torch.manual_seed(0)
    base = Net()
    sides = []
    for captured in (False, True):
        model = _sharded(copy.deepcopy(base), mesh)
        if hsdp:
            assert model.inner.weight.placements == (Replicate(), Shard(0)), model.inner.weight.placements
        optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
        if captured and not compiled_tail:
            optcapture.capture(optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s)) if scheduled else None
        tail = _compiled_tail(model, optimizer, clip) if captured and compiled_tail else None
        sides.append(_launch.Side(model, optimizer, scheduler, tail))
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


# DCP checkpoints: save after CHECKPOINT_AT steps, resume, train RESUMED_STEPS more

CHECKPOINT_AT = 4  # past WARMUP: the captures of both grad patterns have compiled and stepped
RESUMED_STEPS = 4
# Steps the live optimizer trains on before it is rewound to the checkpoint (other batches). The last has all grads,
# as the first resumed step (CHECKPOINT_AT, even): the capture that steps first after the resume stepped last, so
# only the versions of the step counters tell it they were rewound.
DETOUR = (101, 102)


@dataclasses.dataclass(frozen=True)
class Resumed:
    """A captured optimizer resumed from the checkpoint, after its RESUMED_STEPS, against the eager run."""

    outcome: _launch.Outcome
    """``paths``: every report of the optimizer; ``graphs_after_warmup``: Dynamo graphs compiled after the first two
    resumed steps (one per grad pattern)."""
    rebuilds: int
    """Captures optcapture rebuilt (storage replaced, no Dynamo compile) from the resume to the end."""
    new_captures: int
    """Reports of the optimizer from the resume to the end: Dynamo compiles of its step, and rebuilds."""


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    _loss(model, step).backward()
    optimizer.step()
    optimizer.zero_grad()


@contextlib.contextmanager
def _folder_of_rank_0() -> Iterator[str]:
    """A temporary folder rank 0 makes, its path broadcast to every rank (DCP writes a file per rank into it)."""
    made = [tempfile.mkdtemp(prefix="optcapture-dcp-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(made, src=0)
    assert made[0] is not None
    try:
        yield made[0]
        dist.barrier()  # every rank has read the checkpoint before rank 0 removes it
    finally:
        if dist.get_rank() == 0:
            shutil.rmtree(made[0], ignore_errors=True)


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, full: bool) -> dict[str, Any]:
    """Sharded state dicts (DTensors: the model's params and the optimizer's own state tensors, which ``dcp.load``
    writes into in place), or full ones (plain tensors of the whole params, gathered on every rank)."""
    options = StateDictOptions(full_state_dict=full)
    return {"model": get_model_state_dict(model, options=options),
            "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}


def _resume(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer, full: bool) -> None:
    # A full state dict is set by distributing each tensor anew (torch/distributed/_state_dict_utils.py,
    # _distribute_state_dict): the optimizer's state becomes new DTensors, which the old captures must not step.
    state = _state_dicts(model, optimizer, full)
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(model, state["model"], options=StateDictOptions(full_state_dict=full))
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=full))


def _resume_model_first(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    # The model loaded and set before the optimizer's state dict is taken: get_optimizer_state_dict then creates the
    # fresh optimizer's state by one step at lr 0.0 with grads of 0 (_init_optim_state) over the loaded params, where
    # Adam's capturable form writes NaN (pytorch#126514).
    model_state = {"model": get_model_state_dict(model)}
    dcp.load(model_state, checkpoint_id=folder)
    set_model_state_dict(model, model_state["model"])
    optimizer_state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(optimizer_state, checkpoint_id=folder)
    set_optimizer_state_dict(model, optimizer, optimizer_state["optimizer"])


def _resumed(model: nn.Module, optimizer: torch.optim.Optimizer, eager: list[dict[str, Any]],
             resume: Callable[[], None]) -> Resumed:
    rebuilds, reports = optcapture.stats().rebuilds, len(optcapture.explain(optimizer))
    resume()
    graphs_at_warmup = 0
    for step in range(CHECKPOINT_AT, CHECKPOINT_AT + RESUMED_STEPS):
        if step == CHECKPOINT_AT + 2:
            graphs_at_warmup = _launch.graphs_compiled()
        _train_step(model, optimizer, step)
    outcome = _launch.Outcome(eager=eager, captured=_launch.snapshot(optimizer),
                              paths=tuple(r.path for r in optcapture.explain(optimizer)),
                              graphs_after_warmup=_launch.graphs_compiled() - graphs_at_warmup, warnings=())
    return Resumed(outcome, optcapture.stats().rebuilds - rebuilds, len(outcome.paths) - reports)


def _dcp_resumes() -> dict[str, Resumed]:
    torch.manual_seed(0)
    base = Net()
    eager_model, live_model = _sharded(copy.deepcopy(base)), _sharded(copy.deepcopy(base))
    eager = torch.optim.AdamW(eager_model.parameters(), **ADAMW)
    live = optcapture.capture(torch.optim.AdamW(live_model.parameters(), **ADAMW))
    with _folder_of_rank_0() as folder:
        for step in range(CHECKPOINT_AT):
            _train_step(eager_model, eager, step)
            _train_step(live_model, live, step)
        dcp.save(_state_dicts(live_model, live, full=False), checkpoint_id=folder)
        for step in range(CHECKPOINT_AT, CHECKPOINT_AT + RESUMED_STEPS):
            _train_step(eager_model, eager, step)
        uninterrupted = _launch.snapshot(eager)
        torch.manual_seed(1)  # other initial params than base's: only the checkpoint makes them equal
        fresh_model = _sharded(Net())
        fresh = optcapture.capture(torch.optim.AdamW(fresh_model.parameters(), **ADAMW))
        resumed = {"fresh optimizer": _resumed(fresh_model, fresh, uninterrupted,
                                               functools.partial(_resume, folder, fresh_model, fresh, False))}
        torch.manual_seed(2)
        other_model = _sharded(Net())
        other = optcapture.capture(torch.optim.AdamW(other_model.parameters(), **ADAMW))
        resumed["fresh optimizer, model set first"] = _resumed(
            other_model, other, uninterrupted, functools.partial(_resume_model_first, folder, other_model, other))
        for name, full in (("live optimizer, sharded state dict", False), ("live optimizer, full state dict", True)):
            for step in DETOUR:  # the live optimizer moves on; the resume must rewind it
                _train_step(live_model, live, step)
            resumed[name] = _resumed(live_model, live, uninterrupted,
                                     functools.partial(_resume, folder, live_model, live, full))
    return resumed


def _worker(rank: int, world_size: int) -> dict[str, Any]:
    return _launch.run_scenarios({
        "plain": lambda: _fsdp2(clip=None, scheduled=False),
        "clip_grad_norm_ and LambdaLR": lambda: _fsdp2(clip=0.5, scheduled=True),
        "hsdp 2x1": lambda: _fsdp2(clip=None, scheduled=False, hsdp=True),
        "compiled tail: clip_grad_norm_, step, zero_grad": lambda: _fsdp2(clip=0.05, scheduled=True,
                                                                          compiled_tail=True),
        "dtensor params, fresh grads": _dtensor_params_with_fresh_grads,
        "dcp resumes": _dcp_resumes,
    })


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return _launch.spawn(_worker, timeout=300)


RANKS = [0, 1]
SCENARIOS = ["plain", "clip_grad_norm_ and LambdaLR", "hsdp 2x1", "compiled tail: clip_grad_norm_, step, zero_grad"]


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


RESUMES = ["fresh optimizer", "fresh optimizer, model set first", "live optimizer, sharded state dict",
           "live optimizer, full state dict"]


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("resume", RESUMES)
def test_dcp_resume_matches_an_uninterrupted_eager_run(results: Any, resume: str, rank: int) -> None:
    # Params and AdamW's whole state (this rank's shards) after resuming from the checkpoint equal eager AdamW's
    # trained straight through: the fresh optimizer starts from other params, and the live one has trained past the
    # checkpoint (DETOUR) before it is rewound.
    resumed = _launch.outcome_of(results, "dcp resumes", rank)[resume]
    _launch.assert_matches_eager(resumed.outcome)
    assert set(resumed.outcome.paths) == {"bucketed"}, resumed.outcome.paths  # a failed rebuild would say "eager"
    assert resumed.outcome.graphs_after_warmup == 0, resumed.outcome


@pytest.mark.parametrize("rank", RANKS)
def test_a_sharded_resume_keeps_the_live_capture_and_a_full_one_captures_anew(results: Any, rank: int) -> None:
    outcomes = _launch.outcome_of(results, "dcp resumes", rank)
    # dcp.load writes into the optimizer's own state tensors (sharded state dicts hold them): flat storage stays,
    # the rewound step counters are read back (their versions changed), and nothing is compiled or rebuilt.
    in_place = outcomes["live optimizer, sharded state dict"]
    assert (in_place.rebuilds, in_place.new_captures) == (0, 0), in_place
    # A full state dict is set as new DTensors, which the captures of the old ones must not step. Dynamo guards a
    # DTensor in optimizer.state by identity (ID_MATCH; plain tensors by metadata): it compiles the step again, once
    # per grad pattern, and each compile is a new capture over the new tensors.
    assert outcomes["live optimizer, full state dict"].new_captures > 0, outcomes["live optimizer, full state dict"]
