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
    assert lowered[0].kernels == 3  # Adam on CPU: update, step increment, step broadcast
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
