"""Lane analysis on small hand-traced graphs: what it accepts as elementwise and what it refuses."""

from __future__ import annotations

import torch
from torch import fx

from optcapture import lanes


def _analyze(fn: object, roles: list[tuple[tuple[int, int] | None, str]]) -> lanes.LaneReport:
    gm = fx.symbolic_trace(fn)  # type: ignore[arg-type]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = dict(zip(placeholders, roles, strict=True))
    shapes = {lane: torch.Size([4]) for lane, _ in roles if lane is not None}
    return lanes.analyze(gm, inputs, shapes)


SGD_ROLES = [((0, 0), "param"), ((0, 0), "grad"), ((0, 1), "param"), ((0, 1), "grad"), (None, "hyper:lr")]


def test_the_same_elementwise_update_on_two_params_gives_two_equal_programs() -> None:
    def step(p0, g0, p1, g1, lr):  # type: ignore[no-untyped-def]
        p0.add_(g0 * lr)
        p1.add_(g1 * lr)

    report = _analyze(step, SGD_ROLES)
    assert report.elementwise, report.reason
    assert set(report.programs) == {(0, 0), (0, 1)}
    assert report.programs[(0, 0)] == report.programs[(0, 1)]


def test_different_updates_give_different_programs() -> None:
    def step(p0, g0, p1, g1, lr):  # type: ignore[no-untyped-def]
        p0.add_(g0 * lr)
        p1.sub_(g1 * lr)

    report = _analyze(step, SGD_ROLES)
    assert report.elementwise, report.reason
    assert report.programs[(0, 0)] != report.programs[(0, 1)]


def test_a_reduction_is_not_elementwise() -> None:
    def step(p0, g0, p1, g1, lr):  # type: ignore[no-untyped-def]
        p0.add_(g0 / g0.norm())
        p1.add_(g1 / g1.norm())

    report = _analyze(step, SGD_ROLES)
    assert not report.elementwise and "norm" in report.reason


def test_an_op_mixing_two_params_is_not_elementwise() -> None:
    def step(p0, g0, p1, g1, lr):  # type: ignore[no-untyped-def]
        p0.add_(g1 * lr)
        p1.add_(g0 * lr)

    report = _analyze(step, SGD_ROLES)
    assert not report.elementwise


def test_a_stack_of_one_value_per_param_is_a_cross_lane_op() -> None:
    def step(p0, g0, p1, g1, lr):  # type: ignore[no-untyped-def]
        total = torch.linalg.vector_norm(torch.stack([g1.norm(), g0.norm()]))
        p0.add_(g0 / total * lr)
        p1.add_(g1 / total * lr)

    report = _analyze(step, SGD_ROLES)
    assert not report.elementwise and report.lane_local, report.reason
    assert list(report.cross_lanes.values()) == [((0, 1), (0, 0))]  # the list's order
    assert {name for name in report.crossed if name not in report.cross_lanes}  # the norm of the stack
    assert report.programs[(0, 0)] == report.programs[(0, 1)]


def test_a_stack_holding_a_param_twice_is_refused() -> None:
    def step(p0, g0, p1, g1, lr):  # type: ignore[no-untyped-def]
        total = torch.stack([g0.norm(), g0.norm(), g1.norm()]).sum()
        p0.add_(g0 / total * lr)
        p1.add_(g1 / total * lr)

    report = _analyze(step, SGD_ROLES)
    assert not report.lane_local and "each once" in report.reason, report.reason


def test_an_out_argument_is_what_an_op_writes() -> None:
    # ``torch.div(lr, denom, out=denom)`` (pytorch_optimizer's AdaBound) writes the param's own value; the same op
    # writing into a value shared by all params accumulates every param's and is refused.
    def own(p0, g0, p1, g1, lr):  # type: ignore[no-untyped-def]
        d0, d1 = g0.abs() + 1.0, g1.abs() + 1.0
        torch.div(lr, d0, out=d0)
        torch.div(lr, d1, out=d1)
        p0.sub_(d0)
        p1.sub_(d1)

    report = _analyze(own, SGD_ROLES)
    assert report.elementwise, report.reason
    assert report.programs[(0, 0)] == report.programs[(0, 1)]

    def shared(p0, g0, p1, g1, lr):  # type: ignore[no-untyped-def]
        torch.add(lr, g0, out=lr)
        p0.sub_(lr)

    report = _analyze(shared, SGD_ROLES)
    assert not report.elementwise and "shared by all params" in report.reason, report.reason


def test_input_behind_follows_copies_and_views_and_in_place_results_only_when_asked() -> None:
    def f(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return a.clone().view(-1), a.mul_(2).view(-1), a * 2 + b

    gm = torch.fx.symbolic_trace(f)
    copied, written, computed = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert lanes.input_behind(copied).name == "a"
    assert lanes.input_behind(written) is None
    assert lanes.input_behind(written, through_in_place=True).name == "a"
    assert lanes.input_behind(computed, through_in_place=True) is None
