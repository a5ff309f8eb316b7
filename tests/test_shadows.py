"""The shadow step: runs over flat storage, device hyperparameters, and the equivalence proof."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from helpers import assert_matches_eager, make_pair, paths, step_both

import optcapture
from optcapture import discovery, hyper_probe, input_roles, preparation, registry, shadows
from optcapture.config import parse_options
from optcapture.discovery import StepGraph


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
    assert paths(pair.optimizer) == ["first-step", "bucketed"]  # its state appears inside the first step
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


class _WithScalarParam(torch.nn.Module):
    """Two linears and a learned 0-dim scale, like CLIP's ``logit_scale``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = torch.nn.Linear(10, 10), torch.nn.Linear(10, 10)
        self.scale = torch.nn.Parameter(torch.tensor(2.0))


ELEMENTWISE = {
    "Adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "Adam-foreach": lambda p: torch.optim.Adam(p, lr=0.01, foreach=True),
    "AdamW-amsgrad": lambda p: torch.optim.AdamW(p, lr=0.01, amsgrad=True),
    "SGD-momentum-foreach": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, foreach=True),
    "RMSprop-centered": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
    "Adamax": lambda p: torch.optim.Adamax(p, lr=0.01),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=0.01),
    "Rprop": lambda p: torch.optim.Rprop(p, lr=0.01),
}


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_a_0_dim_param_is_bucketed_with_the_others(name: str) -> None:
    # Its per-element state (exp_avg, ...) is 0-dim like a step counter; it once sent the whole bucket per tensor.
    pair = make_pair(ELEMENTWISE[name], model=_WithScalarParam())
    for seed in range(4):
        step_both(pair, seed)
    taken = paths(pair.optimizer)
    assert taken[-1] == "bucketed" and taken.count("bucketed") == 1, taken
    assert len(optcapture.explain(pair.optimizer)[-1].buckets) == 1
    assert_matches_eager(pair)


def test_a_0_dim_param_alone_in_its_group_is_bucketed() -> None:
    def make(params: object) -> torch.optim.Optimizer:
        *matrices, scale = list(params)  # type: ignore[call-overload]
        return torch.optim.AdamW([{"params": matrices}, {"params": [scale], "weight_decay": 0.0}], lr=0.01)

    pair = make_pair(make, model=_WithScalarParam())
    for seed in range(4):
        step_both(pair, seed)
    assert paths(pair.optimizer)[-1] == "bucketed"
    assert len(optcapture.explain(pair.optimizer)[-1].buckets) == 2
    assert_matches_eager(pair)


@pytest.mark.parametrize("options", [{"bucketing": False}])
def test_bucketing_off_takes_the_per_tensor_path(options: dict[str, bool]) -> None:
    pair = make_pair(lambda p: torch.optim.Adam(p, lr=0.01), options=options)
    for seed in range(2):
        step_both(pair, seed)
    assert paths(pair.optimizer) == ["per-tensor"]
    assert_matches_eager(pair)


def _adamw_with_one_group_per_param(params: object, amsgrad_every: int = 0) -> torch.optim.Optimizer:
    groups = [{"params": [p], "lr": 1e-2 * (i + 1), "weight_decay": 0.0 if i % 2 else 0.1,
               "amsgrad": bool(amsgrad_every) and i % amsgrad_every == 0}
              for i, p in enumerate(params)]  # type: ignore[call-overload]
    return torch.optim.AdamW(groups)


def test_groups_of_two_kinds_probe_correctly_and_match_eager() -> None:
    # Layer-wise learning rates: one group per param, weight decay on every other one, amsgrad on two of four
    # (two kinds of group, probed on one group each and confirmed on all).
    pair = make_pair(lambda p: _adamw_with_one_group_per_param(p, amsgrad_every=2),
                     scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.5))
    for seed in range(4):
        step_both(pair, seed)
    assert_matches_eager(pair)
    assert paths(pair.optimizer) == ["bucketed"]
    (report,) = optcapture.explain(pair.optimizer)
    assert {hyper for hyper in report.tensor_hyperparameters if hyper.endswith(" lr")} == {
        f"group {g} lr" for g in range(4)}


def test_probing_hyperparameters_does_not_grow_with_the_number_of_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each probe traces the shadow; probing per group and key made a 30-group AdamW's first call take minutes.
    traces = []
    real = hyper_probe.trace_only
    for count in (2, 12):
        calls = [0]

        def counted(fn: object, *args: object, calls: list[int] = calls) -> object:
            calls[0] += 1
            return real(fn, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(hyper_probe, "trace_only", counted)
        params = [torch.nn.Parameter(torch.randn(3, 3)) for _ in range(count)]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = _adamw_with_one_group_per_param(params)
        torch.compile(optimizer.step, backend="optcapture")()
        assert paths(optimizer) == ["bucketed"]
        traces.append(calls[0])
        torch._dynamo.reset()
    assert traces[0] == traces[1], traces


def _traced_adamw() -> tuple[torch.optim.Optimizer, StepGraph, input_roles.InputMap]:
    """A stepped AdamW (its state exists), discovery's graph of its next step, and :func:`input_roles.map_inputs` of
    that graph (inside the backend, like discovery: Dynamo drops the inputs' sources after it)."""
    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, foreach=False)
    optimizer.step()
    traced: list[tuple[StepGraph, input_roles.InputMap]] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        mapped = input_roles.map_inputs(gm, input_roles.input_values(gm, example_inputs), optimizer)
        traced.append((discovery.discover(gm, example_inputs), mapped))
        return gm.forward

    torch.compile(optimizer.step, backend=backend)()
    ((step, mapped),) = traced
    return optimizer, step, mapped


def _proof_shadow(optimizer: torch.optim.Optimizer, step: StepGraph, values: dict[tuple[int, str], Any] | None = None
                  ) -> tuple[shadows.ShadowStep, hyper_probe.TracedGraph]:
    """The shadow the proof builds for ``step`` (holding ``values`` in its groups), and its traced graph."""
    prepared = registry.prepared_for(optimizer, parse_options())
    flats = preparation.prepare(step, prepared)
    runs = shadows.plan_runs(step, flats)
    shadow = shadows.build_shadow(optimizer, prepared, runs, flats, set(), execution=False, values=values)
    traced = hyper_probe.trace_only(shadow.call)
    assert traced is not None
    return shadow, traced


def test_the_proof_passes_the_traced_values_and_refuses_a_run_with_another_program() -> None:
    optimizer, step, _ = _traced_adamw()
    assert not step.blockers and step.update == "elementwise"
    assert step.traced_floats[(0, "weight_decay")] == 0.1
    shadow, traced = _proof_shadow(optimizer, step, step.traced_floats)
    assert shadows.prove_equivalent(step, traced, shadow.shadow) is None
    # Another weight decay: the shadow's `param.mul_(1 - lr * weight_decay)` multiplies by another constant.
    shadow, traced = _proof_shadow(optimizer, step, {**step.traced_floats, (0, "weight_decay"): 0.2})
    mismatch = shadows.prove_equivalent(step, traced, shadow.shadow)
    assert mismatch is not None and mismatch.startswith("a run of bucket") and "members' program" in mismatch


def test_discover_and_the_proof_map_inputs_by_the_same_roles() -> None:
    optimizer, step, mapped = _traced_adamw()
    assert mapped.roles == step.roles
    kinds = Counter(role.kind for role in mapped.roles)
    assert (kinds["param"], kinds["grad"], kinds["state"], kinds["scalar_state"]) == (3, 3, 6, 3), kinds
    assert mapped.present == {0: [0, 1, 2]}
    # The proof maps the shadow graph to the shadow: one run (equal step counts), so one param, grad, exp_avg,
    # exp_avg_sq and step.
    shadow, (shadow_gm, shadow_inputs) = _proof_shadow(optimizer, step)
    assert len(shadow.runs) == 1
    shadow_map = input_roles.map_inputs(shadow_gm, input_roles.input_values(shadow_gm, shadow_inputs), shadow.shadow)
    shadow_kinds = Counter(role.kind for role in shadow_map.roles)
    assert (shadow_kinds["param"], shadow_kinds["grad"], shadow_kinds["state"], shadow_kinds["scalar_state"]) == (
        1, 1, 2, 1), shadow_kinds
    assert {role.key for role in shadow_map.roles if role.kind == "state"} == {"exp_avg", "exp_avg_sq"}
    assert shadow_map.present == {0: [0]}
