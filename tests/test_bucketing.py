"""Bucketing: runs over flat storage, device hyperparameters, and the equivalence proof."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_matches_eager, make_pair, paths, step_both

import optcapture


def test_one_run_per_bucket_and_lr_betas_become_device_tensors() -> None:
    pair = make_pair(lambda p: torch.optim.Adam(p, lr=0.01, foreach=False))
    step_both(pair, 0)
    (report,) = optcapture.explain(pair.optimizer)
    assert report.path == "bucketed" and report.runs == 1
    assert report.tensor_hyperparameters == ("group 0 betas", "group 0 eps", "group 0 lr")


def test_structural_hyperparameters_stay_floats() -> None:
    # SGD branches on `momentum != 0`: momentum cannot become a tensor; lr can.
    pair = make_pair(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1))
    for seed in range(3):
        step_both(pair, seed)
    report = optcapture.explain(pair.optimizer)[-1]
    assert report.path == "bucketed"
    assert report.tensor_hyperparameters == ("group 0 dampening", "group 0 lr")
    assert_matches_eager(pair)


def test_user_optimizer_lion_is_bucketed_and_exact() -> None:
    from optcapture.bench.methods import Lion

    pair = make_pair(lambda p: Lion(p, lr=1e-2, weight_decay=0.1))
    for seed in range(4):
        step_both(pair, seed)
    assert paths(pair.optimizer) == ["eager", "bucketed"]  # its state appears inside the first step
    assert_matches_eager(pair)


def test_grads_that_come_and_go_split_runs_and_stay_exact() -> None:
    pair = make_pair(lambda p: torch.optim.Adam(p, lr=0.01))
    schedule = [lambda i: True, lambda i: i != 1, lambda i: True, lambda i: i != 3, lambda i: True, lambda i: True]
    for seed, present in enumerate(schedule):
        step_both(pair, seed, present)
    assert_matches_eager(pair)
    steps = [pair.optimizer.state[p]["step"].item() for p in pair.model.parameters()]
    assert steps == [6.0, 5.0, 6.0, 5.0]
    assert max(r.runs for r in optcapture.explain(pair.optimizer)) >= 2


@pytest.mark.parametrize("options", [{"bucketing": False}])
def test_bucketing_off_takes_the_per_tensor_path(options: dict[str, bool]) -> None:
    pair = make_pair(lambda p: torch.optim.Adam(p, lr=0.01), options=options)
    for seed in range(2):
        step_both(pair, seed)
    assert paths(pair.optimizer) == ["per-tensor"]
    assert_matches_eager(pair)
