"""Discovery: roles, buckets, and the lane proof that decides what may be flattened."""

from __future__ import annotations

from typing import Any

import torch
from helpers import GlobalNormSGD, NormalizedSGD, SummedNormSGD

from optcapture.discovery import StepGraph, discover


def _discovered(optimizer: torch.optim.Optimizer) -> list[StepGraph]:
    found: list[StepGraph] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        found.append(discover(gm, example_inputs))
        return gm.forward

    torch.compile(optimizer.step, backend=backend)()
    return found


def _discovered_in(fn: Any, *args: Any) -> list[StepGraph]:
    found: list[StepGraph] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        found.append(discover(gm, example_inputs))
        return gm.forward

    torch.compile(fn, backend=backend)(*args)
    return found


def _params(*shapes: tuple[int, ...], dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def test_adam_roles_and_one_bucket() -> None:
    (step,) = _discovered(torch.optim.Adam(_params((4, 4), (4,), (2, 4)), lr=0.1))
    kinds = sorted(r.kind for r in step.roles)
    assert kinds == ["grad"] * 3 + ["param"] * 3 + ["scalar_state"] * 3 + ["state"] * 6
    assert {(r.group, r.param_index) for r in step.roles if r.kind == "grad"} == {(0, 0), (0, 1), (0, 2)}
    assert {r.key for r in step.roles if r.kind == "state"} == {"exp_avg", "exp_avg_sq"}
    assert [(b.key.group, b.members, b.numel) for b in step.buckets] == [(0, (0, 1, 2), 28)]
    assert step.frame_is_step and step.blockers == []


def test_mixed_dtypes_and_groups_make_separate_buckets() -> None:
    groups = [{"params": _params((3,), (5,)) + _params((2,), dtype=torch.float64)}, {"params": _params((7,))}]
    (step,) = _discovered(torch.optim.SGD(groups, lr=0.1))
    keys = sorted((b.key.group, str(b.key.dtype), b.members) for b in step.buckets)
    assert keys == [(0, "torch.float32", (0, 1)), (0, "torch.float64", (2,)), (1, "torch.float32", (0,))]


def test_params_without_grad_are_not_bucketed() -> None:
    params = _params((3,), (3,), (3,))
    params[1].grad = None
    (step,) = _discovered(torch.optim.SGD(params, lr=0.1))
    assert step.buckets[0].members == (0, 2)


class ShapeDependentSGD(torch.optim.Optimizer):
    """Elementwise ops, but matrices get a different update than vectors."""

    def __init__(self, params: Any, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                scale = 2.0 if p.dim() > 1 else 1.0
                p.add_(p.grad * scale, alpha=-group["lr"])


def test_a_per_param_reduction_is_lane_local_not_elementwise() -> None:
    (step,) = _discovered(NormalizedSGD(_params((4, 4), (4,))))
    assert step.blockers == [] and step.update == "lane-local"
    assert step.lane_report is not None and "norm" in step.lane_report.reason


def test_a_reduction_across_params_through_stack_is_lane_local_with_its_cross_lane_op() -> None:
    (step,) = _discovered(GlobalNormSGD(_params((4, 4), (4,))))
    assert step.blockers == [] and step.update == "lane-local"
    assert step.lane_report is not None
    assert list(step.lane_report.cross_lanes.values()) == [((0, 0), (0, 1))]


def test_a_reduction_across_params_by_adding_is_not_bucketed() -> None:
    (step,) = _discovered(SummedNormSGD(_params((4, 4), (4,))))
    assert step.update is None
    assert any("not provably elementwise" in b and "mixes params" in b for b in step.blockers), step.blockers


def test_shape_dependent_programs_are_not_flattened() -> None:
    (step,) = _discovered(ShapeDependentSGD(_params((4, 4), (4,))))
    assert any("run different update programs" in b for b in step.blockers), step.blockers


def test_differentiable_and_complex_are_blocked() -> None:
    (step,) = _discovered(torch.optim.SGD(_params((3,), dtype=torch.complex64), lr=0.1))
    assert any("complex64" in b for b in step.blockers), step.blockers


def test_params_sharing_one_grad_tensor_are_not_bucketed() -> None:
    # Dynamo passes the shared tensor once, so the second param would have no grad input of its own.
    params = _params((4, 4), (4, 4))
    params[1].grad = params[0].grad
    (step,) = _discovered(torch.optim.AdamW(params, lr=0.1))
    assert step.blockers == ["param 1 of group 0 shares its grad tensor with param 0 of group 0"]


def test_a_failing_analysis_is_a_reason_not_a_crash(monkeypatch: Any) -> None:
    from optcapture import lanes

    def unforeseen(*args: Any) -> Any:
        raise KeyError((0, 0))

    monkeypatch.setattr(lanes, "analyze", unforeseen)
    (step,) = _discovered(torch.optim.Adam(_params((4,)), lr=0.1))
    assert step.blockers == ["the update is not provably elementwise: the analysis failed (KeyError: (0, 0))"]


def test_a_forward_and_grad_clipping_are_no_optimizer_graphs() -> None:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())

    def forward(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: torch.Tensor) -> torch.Tensor:
        return model(data).square().mean()  # reads the optimizer's params, returns the loss

    def clip(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)  # reads and scales grads only

    (forward_graph,) = _discovered_in(forward, model, optimizer, torch.randn(2, 4))
    forward(model, optimizer, torch.randn(2, 4)).backward()
    clip_graphs = _discovered_in(clip, model, optimizer)
    assert not forward_graph.is_optimizer_graph
    assert clip_graphs and not any(graph.is_optimizer_graph for graph in clip_graphs)
    assert "lazy state" not in " ".join(forward_graph.blockers)


def test_params_updated_with_no_optimizer_in_reach_are_an_optimizer_graph_that_says_why() -> None:
    # What Dynamo compiles when it gives up on a step's frame and compiles ``_single_tensor_sgd`` on its own.
    params = _params((3,), (2, 2))

    def manual_update(params: list[torch.nn.Parameter]) -> None:
        with torch.no_grad():
            for p in params:
                p.add_(p.grad, alpha=-0.1)

    (graph,) = _discovered_in(manual_update, params)
    assert graph.is_optimizer_graph
    expected = "no optimizer is in reach of the compiled frame 'manual_update'"
    assert graph.blockers[0].startswith(expected), graph.blockers


def test_a_grad_storage_offset_dynamo_passes_as_a_symbol_is_layout_and_the_step_is_bucketed() -> None:
    # Grads that view a larger buffer (FSDP2's reduce-scatter output, DDP's buckets) at an offset: Dynamo passes the
    # offset as a number no op reads. It says where the grad lies, which the captured step reads at every call.
    import optcapture

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    # torch.compile's step, not optcapture.capture's: capture traces such grads with static shapes until captured.
    captured = torch.optim.AdamW(params, lr=0.01)
    compiled = torch.compile(captured.step, backend="optcapture")
    eager = torch.optim.AdamW(twins, lr=0.01)
    for step in range(4):
        buffer = torch.randn(64, generator=torch.Generator().manual_seed(step))
        start = step % 3  # the offsets move from step to step
        for group in (params, twins):
            group[0].grad = buffer[start:start + 12].view(4, 3)
            group[1].grad = buffer[start + 20:start + 25]
        compiled()
        eager.step()
    (report,) = optcapture.explain(captured)
    assert report.path == "bucketed", report.reasons
    layout = [role for role in report.roles if role.kind == "layout"]
    assert layout and all(role.source is not None and role.source.endswith(".grad.storage_offset()")
                          for role in layout), report.roles
    for p, twin in zip(params, twins, strict=True):
        torch.testing.assert_close(p, twin)
