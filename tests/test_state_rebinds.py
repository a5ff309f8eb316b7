"""State a step assigns new tensors to (``state["m"] = beta * state["m"] + grad``): stored in place and bucketed,
or, where storing in place could change what the step computes or shares, left to the per-tensor graph with the
reason named."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from expecttest import assert_expected_inline
from helpers import assert_matches_eager, make_pair, step_both, step_matching_eager
from user_optimizers import ParamLoopOptimizer, RebindingAdam

import optcapture
from optcapture.discovery import discover


def test_rebound_state_is_bucketed_keeps_its_tensors_and_compiles_no_more_after_warm_up() -> None:
    pair = make_pair(lambda p: RebindingAdam(p))
    step_both(pair, 0)  # creates the state
    step_both(pair, 1)
    tensors = {(id(p), key): value for p, state in pair.optimizer.state.items() for key, value in state.items()}
    assert len(tensors) == 16
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for seed in range(2, 7):
        step_both(pair, seed)
        assert_matches_eager(pair)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    now = {(id(p), key): value for p, state in pair.optimizer.state.items() for key, value in state.items()}
    assert all(now[entry] is tensor for entry, tensor in tensors.items())
    report = optcapture.explain(pair.optimizer)[-1]
    assert (report.path, report.runs) == ("bucketed", 1)
    if torch.__version__.startswith("2.13."):  # the CPU goldens are torch 2.13's (CI), as in test_kernel_counts
        assert_expected_inline(str(report.kernels), """3""")


def test_a_reference_taken_before_the_step_sees_the_new_value() -> None:
    # The one observable that differs from eager, which would leave the old tensor as it was (README).
    pair = make_pair(lambda p: RebindingAdam(p))
    for seed in range(2):
        step_both(pair, seed)
    p = next(iter(pair.model.parameters()))
    held = pair.optimizer.state[p]["m"]
    step_both(pair, 2)
    assert pair.optimizer.state[p]["m"] is held
    assert_matches_eager(pair)


def test_state_replaced_by_load_state_dict_between_compiled_steps_is_stepped_not_its_old_tensors() -> None:
    pair = make_pair(lambda p: RebindingAdam(p))
    for seed in range(3):
        step_both(pair, seed)
    saved_eager, saved = copy.deepcopy(pair.eager.state_dict()), copy.deepcopy(pair.optimizer.state_dict())
    for seed in range(3, 5):
        step_both(pair, seed)
    pair.eager.load_state_dict(saved_eager)
    pair.optimizer.load_state_dict(saved)
    for seed in range(5, 8):
        step_both(pair, seed)
        assert_matches_eager(pair)
    assert optcapture.explain(pair.optimizer)[-1].path == "bucketed"


def test_the_graph_dynamo_hands_over_is_left_as_it_is() -> None:
    model = torch.nn.Linear(4, 3)
    opt = RebindingAdam(model.parameters())
    seen: list[tuple[torch.fx.GraphModule, Any]] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        before = gm.code
        step = discover(gm, example_inputs)
        assert gm.code == before
        seen.append((gm, step))
        return gm.forward

    step = torch.compile(opt.step, backend=backend)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        step()
    gm, discovered = seen[-1]
    assert discovered.graph is not gm
    assert sorted((r.param_index, r.key) for r in discovered.rebinds) == [
        (0, "b1_power"), (0, "m"), (0, "update"), (0, "v"), (1, "b1_power"), (1, "m"), (1, "update"), (1, "v")]
    copies = [n for n in discovered.graph.graph.nodes if n.op == "call_method" and n.target == "copy_"]
    assert len(copies) == 8
    assert not discovered.blockers


class SwappingMomentum(ParamLoopOptimizer):
    """Keeps the last momentum tensor under another key: storing the new one in place would change the old one."""

    def update(self, p: torch.Tensor, state: dict[str, Any], lr: float) -> None:
        if not state:
            state["m"], state["previous"] = torch.zeros_like(p), torch.zeros_like(p)
        state["previous"], state["m"] = state["m"], 0.9 * state["m"] + p.grad
        p.sub_(lr * (state["m"] - 0.5 * state["previous"]))


class GradKeepingSGD(ParamLoopOptimizer):
    """Keeps a view of the grad as state: a copy would no longer follow the grad."""

    def update(self, p: torch.Tensor, state: dict[str, Any], lr: float) -> None:
        if not state:
            state["last_grad"] = torch.zeros_like(p)
        p.sub_(lr * (p.grad + 0.5 * state["last_grad"]))
        state["last_grad"] = p.grad.view_as(p)


class WideningMomentum(ParamLoopOptimizer):
    """Assigns its float32 momentum a float64 tensor (at its second step): a copy into the old tensor would round
    it."""

    def update(self, p: torch.Tensor, state: dict[str, Any], lr: float) -> None:
        if not state:
            state["m"] = torch.zeros_like(p)
            p.sub_(lr * p.grad)
            return
        state["m"] = (0.9 * state["m"] + p.grad).double()
        p.sub_(lr * state["m"].float())


class SharedViewMomentum(ParamLoopOptimizer):
    """Keeps its new momentum and a flat view of it under two keys (from its second step): two copies would no
    longer share storage."""

    def update(self, p: torch.Tensor, state: dict[str, Any], lr: float) -> None:
        if not state:
            state["m"], state["flat"] = torch.zeros_like(p), torch.zeros(p.numel())
            p.sub_(lr * p.grad)
            return
        state["m"] = 0.9 * state["m"] + p.grad + 0.01 * state["flat"].view_as(p)
        state["flat"] = state["m"].view(-1)
        state["flat"].mul_(0.5)  # through the view: halves the momentum too
        p.sub_(lr * state["m"])


class LastUpdateSGD(ParamLoopOptimizer):
    """Keeps its last update under a key it never reads: a graph holding that tensor would keep writing it after
    the entry is replaced (``load_state_dict``)."""

    def update(self, p: torch.Tensor, state: dict[str, Any], lr: float) -> None:
        state["update"] = lr * p.grad
        p.sub_(state["update"])


class SnapshotSGD(ParamLoopOptimizer):
    """Keeps a copy of the param taken before the update (Lookahead-style)."""

    def update(self, p: torch.Tensor, state: dict[str, Any], lr: float) -> None:
        if not state:
            state["before"] = torch.zeros_like(p)
        moved = p - state["before"]
        state["before"] = p.clone()
        p.sub_(lr * (p.grad + 0.5 * moved))


@pytest.mark.parametrize(("cls", "reason"), [
    (LastUpdateSGD, "state 'update' of param 0 of group 0 is assigned a tensor the graph creates, and the graph does "
                    "not read its old tensor"),
    (SnapshotSGD, "state 'before' of param 0 of group 0 is assigned a new tensor that is a copy of the input"),
    (SharedViewMomentum, "is assigned a new tensor that shares its storage with the new tensor of another entry"),
    (SwappingMomentum, "state 'previous' of param 0 of group 0 is assigned another tensor the step reads"),
    (GradKeepingSGD, "state 'last_grad' of param 0 of group 0 is assigned a new tensor that is a view of the input"),
    (WideningMomentum, "state 'm' of param 0 of group 0 is assigned a new tensor of another shape, dtype or device"),
], ids=lambda value: value.__name__ if isinstance(value, type) else "")
def test_a_rebind_that_a_copy_would_change_runs_per_tensor_with_its_reason(cls: type, reason: str) -> None:
    pair = make_pair(lambda p: cls(p))
    step_matching_eager(pair, 4)
    # Each refusal is at the second step, the first to rebind: WideningMomentum's momentum is float64 from then on
    # and SharedViewMomentum's two entries share storage, each refused another way.
    refused = [report for report in optcapture.explain(pair.optimizer) if any(reason in r for r in report.reasons)]
    assert refused and {report.path for report in refused} == {"per-tensor"}, optcapture.explain(pair.optimizer)
    if cls is GradKeepingSGD:
        p = next(iter(pair.model.parameters()))
        assert pair.optimizer.state[p]["last_grad"].data_ptr() == p.grad.data_ptr()  # still the grad, as in eager


def test_a_record_of_dynamos_that_cannot_be_read_is_a_reason_never_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreadable(tracer: Any) -> Any:
        raise AttributeError("no side effects here")

    monkeypatch.setattr(optcapture._compat, "dict_entry_stores", unreadable)
    pair = make_pair(lambda p: RebindingAdam(p))
    step_matching_eager(pair, 3)
    report = optcapture.explain(pair.optimizer)[-1]
    assert report.path == "per-tensor"
    assert any("its stores could not be read (AttributeError: no side effects here)" in r for r in report.reasons)
