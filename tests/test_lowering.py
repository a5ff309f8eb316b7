"""Lowering on CPU: the shadow step is compiled when it is captured, and the capture's own trace never steps."""

from __future__ import annotations

import torch
from helpers import make_pair, step_both

import optcapture
from optcapture import lowering


def test_capture_compiles_without_stepping(monkeypatch: object) -> None:
    lowered: list[lowering.LoweredShadow] = []
    original = lowering.lower_shadow

    def spy(*args: object, **kwargs: object) -> lowering.LoweredShadow:
        before = [p.detach().clone() for p in pair.model.parameters()]
        result = original(*args, **kwargs)  # type: ignore[arg-type]
        # The trace and compile ran; the params did not move.
        for p, b in zip(pair.model.parameters(), before, strict=True):
            assert torch.equal(p, b)
        lowered.append(result)
        return result

    import pytest

    patcher = pytest.MonkeyPatch()
    patcher.setattr(lowering, "lower_shadow", spy)
    try:
        pair = make_pair(lambda p: torch.optim.Adam(p, lr=0.1))
        for seed in range(3):
            step_both(pair, seed)
    finally:
        patcher.undo()
    assert len(lowered) == 1
    assert lowered[0].kernels == 3  # Adam on CPU: update, step increment (and bias corrections), step broadcast
    (report,) = [r for r in optcapture.explain(pair.optimizer) if r.path == "bucketed"]
    assert report.kernels == 3 and report.grads == "copied"


STEPS_TAKEN: list[str] = []


class CountingSGD(torch.optim.Optimizer):
    """Elementwise, but its step also records itself in a list: a side effect Dynamo replays after the graph."""

    def __init__(self, params: object, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: object = None) -> None:
        STEPS_TAKEN.append("step")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


def test_a_shadow_with_python_side_effects_is_compiled_by_its_first_real_step() -> None:
    STEPS_TAKEN.clear()
    pair = make_pair(lambda p: CountingSGD(p))
    for seed in range(4):
        step_both(pair, seed)
    torch.testing.assert_close(list(pair.model.parameters()), list(pair.eager_model.parameters()))
    # The user's side effect happens once per step, as eagerly: 4 eager steps and 4 captured ones; neither the
    # capture's trace nor the shadow adds one.
    # (Dynamo guards the list's length, so each step recompiles; every compile is bucketed.)
    assert {r.path for r in optcapture.explain(pair.optimizer)} == {"bucketed"}
    assert len(STEPS_TAKEN) == 4 + 4, STEPS_TAKEN


class FakeFrame:
    """Stands in for the shadow's Dynamo frame: reports what it called to the runner, as the gate does."""

    def __init__(self, shadow: torch.optim.Optimizer) -> None:
        self.runner: lowering._ShadowRunner | None = None
        self.calls = 0
        self.args: tuple[object, ...] = (torch.zeros(2),)
        self.pure = True
        self.graph_calls = 0

        def graph(*args: object) -> None:
            self.graph_calls += 1

        self.graph = graph

    def __call__(self) -> None:
        self.calls += 1
        assert self.runner is not None
        self.runner.record(self.graph, self.args, self.pure)
        self.graph(*self.args)


def fake_runner(may_skip: bool = True) -> tuple[lowering._ShadowRunner, FakeFrame, torch.optim.Optimizer]:
    shadow = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    frame = FakeFrame(shadow)
    frame.runner = lowering._ShadowRunner(frame, shadow, may_skip)
    return frame.runner, frame, shadow


def test_runner_calls_the_graph_directly_once_two_steps_agree() -> None:
    runner, frame, _ = fake_runner()
    for _ in range(5):
        runner()
    assert frame.calls == 2 and frame.graph_calls == 5
    assert runner.direct is not None


def test_runner_stays_in_dynamo_when_python_state_changes_between_steps() -> None:
    runner, frame, shadow = fake_runner()
    for i in range(5):
        shadow.param_groups[0]["lr"] = 0.1 * (i + 1)  # what the replay stage does with a followed value
        runner()
    assert frame.calls == 5 and runner.direct is None


def test_runner_stays_in_dynamo_when_the_frame_changes_python_state() -> None:
    runner, frame, shadow = fake_runner()
    original = frame.graph

    def counting(*args: object) -> None:
        original(*args)
        shadow.param_groups[0]["steps"] = frame.graph_calls

    frame.graph = counting
    for _ in range(5):
        runner()
    assert frame.calls == 5 and runner.direct is None


def test_runner_stays_in_dynamo_for_new_inputs_side_effects_or_when_told() -> None:
    runner, frame, _ = fake_runner()
    for _ in range(4):
        frame.args = (torch.zeros(2),)
        runner()
    assert frame.calls == 4 and runner.direct is None

    runner, frame, _ = fake_runner()
    frame.pure = False
    for _ in range(4):
        runner()
    assert frame.calls == 4 and runner.direct is None

    runner, frame, _ = fake_runner(may_skip=False)
    for _ in range(4):
        runner()
    assert frame.calls == 4 and runner.direct is None


def lowered_runners(make_opt: object, steps: int, **pair_args: object) -> tuple[list[object], object]:
    import pytest

    lowered: list[lowering.LoweredShadow] = []
    original = lowering.lower_shadow

    def spy(*args: object, **kwargs: object) -> lowering.LoweredShadow:
        result = original(*args, **kwargs)  # type: ignore[arg-type]
        lowered.append(result)
        return result

    patcher = pytest.MonkeyPatch()
    patcher.setattr(lowering, "lower_shadow", spy)
    try:
        pair = make_pair(make_opt, **pair_args)  # type: ignore[arg-type]
        for seed in range(steps):
            step_both(pair, seed)
            if pair.scheduler is not None:
                pair.scheduler.step()
                pair.eager_scheduler.step()
    finally:
        patcher.undo()
    torch.testing.assert_close(list(pair.model.parameters()), list(pair.eager_model.parameters()))
    torch.testing.assert_close(pair.optimizer.state_dict()["state"], pair.eager.state_dict()["state"])
    return [result.call for result in lowered], pair


def test_stock_steps_skip_the_shadow_frame_and_match_eager() -> None:
    # SGD re-stores its momentum buffers in Python after the graph: the same objects, so still skippable.
    for make_opt in (lambda p: torch.optim.Adam(p, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)):
        calls, _ = lowered_runners(make_opt, steps=5)
        assert len(calls) >= 1
        assert isinstance(calls[-1], lowering._ShadowRunner) and calls[-1].direct is not None


def test_a_followed_hyperparameter_keeps_every_step_in_dynamo() -> None:
    def cycled(optimizer: torch.optim.Optimizer) -> object:
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=20)

    calls, _ = lowered_runners(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), steps=6, scheduler=cycled)
    last = calls[-1]
    assert isinstance(last, lowering._ShadowRunner) and last.direct is None


def test_priming_traces_with_values_nudged_towards_zero_and_restores_them() -> None:
    group = {"momentum": 0.9, "dampening": -0.5, "zero": 0.0}
    seen: list[dict[str, float]] = []
    specialized = lowering._prime_followed(lambda: seen.append(dict(group)),
                                           [(group, "momentum"), (group, "dampening"), (group, "zero")], lambda: 1)
    # Once nudged (Dynamo makes them inputs), once nudged further (no new compile: they are inputs).
    assert len(seen) == 2 and specialized == ()
    for traced in seen:
        assert 0.9 - 1e-5 < traced["momentum"] < 0.9  # towards zero: a check like ``momentum < 1`` still holds
        assert -0.5 < traced["dampening"] < -0.5 + 1e-5
        assert traced["zero"] == 0.0  # any other value could take another branch (``if momentum != 0``)
    assert seen[1]["momentum"] < seen[0]["momentum"]
    assert group == {"momentum": 0.9, "dampening": -0.5, "zero": 0.0}


def test_priming_names_the_floats_whose_second_nudge_compiles_again() -> None:
    # A float Dynamo can only specialize (``alpha=momentum``) compiles again at every new value.
    group = {"momentum": 0.9, "step": 3}
    compiles: list[None] = []
    assert lowering._prime_followed(lambda: compiles.append(None), [(group, "momentum"), (group, "step")],
                                    lambda: len(compiles)) == ("momentum",)
    assert group == {"momentum": 0.9, "step": 3}


def test_priming_is_best_effort_and_restores_the_values_when_the_trace_fails() -> None:
    group = {"momentum": 0.9}
    seen: list[float] = []

    def failing() -> None:
        seen.append(group["momentum"])
        raise RuntimeError("simulated")

    # A failed priming costs a recompile, not the capture.
    assert lowering._prime_followed(failing, [(group, "momentum")], lambda: 0) == ()
    assert len(seen) == 1 and seen[0] < 0.9
    assert group == {"momentum": 0.9}


def test_priming_skips_the_trace_when_every_followed_value_is_zero() -> None:
    calls: list[None] = []
    assert lowering._prime_followed(lambda: calls.append(None), [({"momentum": 0.0}, "momentum")], lambda: 0) == ()
    assert calls == []


def test_the_batched_step_runs_its_three_passes_as_one_post_grad_pass_on_every_device() -> None:
    from optcapture.rewrites import scalars_once

    patches = lowering._batched_step_passes()
    assert set(patches) == {"post_grad_custom_post_pass"}  # Inductor's own realize_reads_threshold
    # Not the elementwise step's pass alone: the state-write and matmul-operand passes run too (an H100 measured them).
    assert patches["post_grad_custom_post_pass"].uuid() != scalars_once.inductor_pass().uuid()
