"""DDP and ZeroRedundancyOptimizer with a captured AdamW, on 2 CPU processes (gloo), against eager AdamW.

All scenarios run in one pair of processes (one spawn for the module: each costs a few compiles, and starting
processes costs seconds). Each trains an eager and a captured optimizer side by side on the same process group and
batches, then compares params and the whole optimizer state, rank by rank.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

import _launch
import pytest
import torch
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

import optcapture

STEPS = 5
ADAMW = {"lr": 1e-2, "weight_decay": 0.1}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + torch.distributed.get_rank())
    x, y = torch.randn(8, 16, generator=generator), torch.randn(8, 4, generator=generator)
    return nn.functional.mse_loss(model(x), y)


def _ddp(**options: Any) -> _launch.Outcome:
    base = _model()
    eager_model = DistributedDataParallel(copy.deepcopy(base), **options)
    model = DistributedDataParallel(copy.deepcopy(base), **options)
    eager = _launch.Side(eager_model, torch.optim.AdamW(eager_model.parameters(), **ADAMW))
    captured = _launch.Side(model, optcapture.capture(torch.optim.AdamW(model.parameters(), **ADAMW)))
    return _launch.train_side_by_side(eager, captured, _loss, STEPS)


def _zero(capture_local: bool, **options: Any) -> _launch.Outcome:
    base = _model()
    eager_model, model = DistributedDataParallel(copy.deepcopy(base)), DistributedDataParallel(copy.deepcopy(base))
    eager_zero = ZeroRedundancyOptimizer(eager_model.parameters(), optimizer_class=torch.optim.AdamW, **options,
                                         **ADAMW)
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, **options, **ADAMW)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if capture_local:
            optcapture.capture(zero.optim)
        else:
            assert optcapture.capture(zero) is zero
    outcome = _launch.train_side_by_side(_launch.Side(eager_model, eager_zero), _launch.Side(model, zero), _loss,
                                         STEPS, explained=zero.optim, eager_optimizer=eager_zero.optim)
    said_at_capture = tuple(f"{w.category.__name__}: {w.message}" for w in caught)
    return dataclasses.replace(outcome, warnings=said_at_capture + outcome.warnings)


def _zero_overlap_with_ddp() -> dict[str, str]:
    """What capturing a ZeroRedundancyOptimizer(overlap_with_ddp=True) does. It cannot be trained here: DDP's
    ``hook_with_zero_step`` refuses gloo ("Gloo backend using Overlapping DDP with ZeRO may meet hangs")."""
    model = DistributedDataParallel(_model())
    said: dict[str, str] = {}
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, overlap_with_ddp=True,
                                   **ADAMW)
    with pytest.warns(RuntimeWarning) as caught:
        said["returned same object"] = str(optcapture.capture(zero) is zero)
    said["warning"] = str(caught[0].message)
    try:
        optcapture.capture(zero, {"fallback": "raise"})
    except optcapture.UnsupportedStepError as error:
        said["raise"] = str(error)
    return said


def _worker(rank: int, world_size: int) -> dict[str, Any]:
    return _launch.run_scenarios({
        "ddp gradient_as_bucket_view": lambda: _ddp(gradient_as_bucket_view=True),
        "ddp static_graph": lambda: _ddp(static_graph=True),
        "zero": lambda: _zero(capture_local=False),
        "zero parameters_as_bucket_view, captured": lambda: _zero(capture_local=False, parameters_as_bucket_view=True),
        "zero parameters_as_bucket_view, local captured": lambda: _zero(capture_local=True,
                                                                        parameters_as_bucket_view=True),
        "zero overlap_with_ddp": _zero_overlap_with_ddp,
    })


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return _launch.spawn(_worker)


RANKS = [0, 1]


@pytest.mark.parametrize("rank", RANKS)
def test_ddp_gradient_as_bucket_view_matches_eager_and_compiles_no_more_once_warm(results: Any, rank: int) -> None:
    outcome = _launch.outcome_of(results, "ddp gradient_as_bucket_view", rank)
    _launch.assert_matches_eager(outcome)
    # DDP rebuilds its buckets after the first iteration, so the grads move once: one recompile in the warm-up.
    assert outcome.graphs_after_warmup == 0, outcome
    assert outcome.paths and set(outcome.paths) <= {"bucketed", "per-tensor"}, outcome.paths


@pytest.mark.parametrize("rank", RANKS)
def test_ddp_gradient_as_bucket_view_is_bucketed(results: Any, rank: int) -> None:
    # The grads view DDP's buckets: optcapture.capture has Dynamo trace them with static shapes (Dynamo would make
    # every size and offset of such a grad symbolic), so the step is bucketed and DDP's bucket rebuild after step 1,
    # which moves the grads, only rebinds them.
    outcome = _launch.outcome_of(results, "ddp gradient_as_bucket_view", rank)
    _launch.assert_matches_eager(outcome)
    assert outcome.paths == ("bucketed",), outcome
    assert outcome.graphs_after_warmup == 0, outcome


@pytest.mark.parametrize("rank", RANKS)
def test_ddp_static_graph_is_bucketed_once_and_matches_eager(results: Any, rank: int) -> None:
    outcome = _launch.outcome_of(results, "ddp static_graph", rank)
    _launch.assert_matches_eager(outcome)
    assert outcome.paths == ("bucketed",), outcome
    assert outcome.graphs_after_warmup == 0, outcome
    assert not outcome.warnings, outcome.warnings


@pytest.mark.parametrize("rank", RANKS)
def test_zero_redundancy_optimizer_captures_its_local_adamw(results: Any, rank: int) -> None:
    outcome = _launch.outcome_of(results, "zero", rank)
    _launch.assert_matches_eager(outcome)  # this rank's shard: params and state of the local optimizer
    assert outcome.paths == ("bucketed",), outcome
    assert outcome.graphs_after_warmup == 0, outcome
    assert not outcome.warnings, outcome.warnings


@pytest.mark.parametrize("rank", RANKS)
def test_zero_parameters_as_bucket_view_is_refused_and_steps_eagerly(results: Any, rank: int) -> None:
    outcome = _launch.outcome_of(results, "zero parameters_as_bucket_view, captured", rank)
    _launch.assert_matches_eager(outcome)
    assert outcome.paths == (), outcome
    assert any("parameters_as_bucket_view=True" in w for w in outcome.warnings), outcome.warnings


@pytest.mark.parametrize("rank", RANKS)
def test_zero_parameters_as_bucket_view_local_optimizer_captured_matches_eager(results: Any, rank: int) -> None:
    # Each param is a view of its ZeRO bucket, which ZeRO broadcasts after the step. A bucket of one param views all
    # of the param's storage: that param was once moved into flat storage, the bucket kept the old values, and every
    # rank trained on them (1e-2 from eager by step 2; stock torch.compile was right). It now stays in its bucket.
    _launch.assert_matches_eager(_launch.outcome_of(results, "zero parameters_as_bucket_view, local captured", rank))


@pytest.mark.parametrize("rank", RANKS)
def test_zero_overlap_with_ddp_is_refused_with_its_reason(results: Any, rank: int) -> None:
    said = _launch.outcome_of(results, "zero overlap_with_ddp", rank)
    assert said["returned same object"] == "True"
    for message in (said["warning"], said["raise"]):
        assert "overlap_with_ddp=True" in message and "nothing to capture" in message, said
