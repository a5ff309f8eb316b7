"""Programs torch.compile computes wrong run as Dynamo traced them, with the reason; programs like them that it
computes right are not held back."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
import torch
from helpers import make_model, make_pair, step_matching_eager
from user_optimizers import ParamLoopOptimizer

import optcapture
from optcapture.compile_hazards import copied_then_updated, float64_scalar_updated


class SnapshotInPlaceSGD(ParamLoopOptimizer):
    """Copies each param into its state before updating it (Lookahead-style); ``snapshot_first=False``: after."""

    def __init__(self, params: Iterable[Any], snapshot_first: bool = True) -> None:
        super().__init__(params)
        self.snapshot_first = snapshot_first

    def update(self, p: torch.Tensor, state: dict[str, Any], lr: float) -> None:
        if not state:
            state["before"] = torch.zeros_like(p)
        if self.snapshot_first:
            state["before"].copy_(p)
        p.sub_(lr * (p.grad + 0.1 * state["before"]))
        if not self.snapshot_first:
            state["before"].copy_(p)


def test_a_param_copied_into_state_then_updated_runs_as_traced_and_matches_eager() -> None:
    pair = make_pair(lambda p: SnapshotInPlaceSGD(p))
    step_matching_eager(pair, 4)
    report = optcapture.explain(pair.optimizer)[-1]
    assert report.path == "eager"
    assert any(r.startswith("torch.compile would compute it wrong: it copies") for r in report.reasons), report.reasons


def test_a_param_copied_into_state_after_its_update_is_bucketed() -> None:
    # torch.optim.ASGD's order (``ax.copy_(param)`` after the update), which Inductor compiles right.
    pair = make_pair(lambda p: SnapshotInPlaceSGD(p, snapshot_first=False))
    step_matching_eager(pair, 4)
    assert optcapture.explain(pair.optimizer)[-1].path == "bucketed"


def _graph(body: str) -> torch.fx.GraphModule:
    namespace: dict[str, Any] = {}
    exec(f"def f(a, b, g):\n{body}", namespace)  # noqa: S102 - a literal test program
    return torch.fx.symbolic_trace(namespace["f"])


def test_the_hazard_is_named_by_its_nodes_and_only_a_later_update_makes_one() -> None:
    hazard = copied_then_updated(_graph("    a.copy_(b.view(-1).view(3))\n    b.sub_(g)\n"))
    assert hazard is not None and "copies b into another tensor (copy_) and then updates b in place (sub_)" in hazard
    assert copied_then_updated(_graph("    b.sub_(g)\n    a.copy_(b)\n")) is None
    assert copied_then_updated(_graph("    a.copy_(b * 2)\n    b.sub_(g)\n")) is None  # a value, not the input
    assert copied_then_updated(_graph("    a.copy_(b)\n    a.sub_(g)\n")) is None


class Float64BiasAdam(ParamLoopOptimizer):
    """Keeps its bias-correction product as a 0-dim tensor of its params' dtype, updated in place."""

    def update(self, p: torch.Tensor, state: dict[str, Any], lr: float) -> None:
        if not state:
            state["b1_power"] = torch.ones((), dtype=p.dtype)
        state["b1_power"].mul_(0.9)
        p.sub_(lr / (1 - state["b1_power"]) * p.grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_0_dim_float64_tensor_updated_in_place_runs_as_traced_and_matches_eager(dtype: torch.dtype) -> None:
    pair = make_pair(lambda p: Float64BiasAdam(p, lr=0.01), model=make_model(dtype=dtype))
    step_matching_eager(pair, 4)
    report = optcapture.explain(pair.optimizer)[-1]
    if dtype == torch.float64:
        assert report.path == "eager"
        assert any("a 0-dim float64 tensor on the CPU, in place" in r for r in report.reasons), report.reasons
    else:
        assert report.path == "bucketed"


def test_only_an_update_of_a_0_dim_float64_cpu_input_is_the_float64_hazard() -> None:
    def traced(example: torch.Tensor, body: str) -> torch.fx.GraphModule:
        gm = _graph(body)
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                node.meta["example_value"] = example if node.name == "a" else torch.zeros(3)
        return gm

    scalar64 = torch.ones((), dtype=torch.float64)
    assert float64_scalar_updated(traced(scalar64, "    a.mul_(0.9)\n")) is not None
    assert float64_scalar_updated(traced(scalar64, "    b.add_(a)\n")) is None  # read, not written
    assert float64_scalar_updated(traced(torch.ones(1, dtype=torch.float64), "    a.mul_(0.9)\n")) is None
    assert float64_scalar_updated(traced(torch.ones(()), "    a.mul_(0.9)\n")) is None
