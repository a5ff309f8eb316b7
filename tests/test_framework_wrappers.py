"""Optimizers that wrap another one (Accelerate's ``AcceleratedOptimizer``) captured by ``optcapture.capture``."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from helpers import make_model

import optcapture


class Delegating(torch.optim.Optimizer):
    """An optimizer that holds another and steps it from Python, as Accelerate's ``AcceleratedOptimizer`` does (its
    step reads Python state, then calls ``self.optimizer.step()``)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.calls: list[int] = []
        self.defaults = optimizer.defaults

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.optimizer.state

    def step(self, closure: Any = None) -> Any:
        self.calls.append(len(self.calls))
        print(f"step {len(self.calls)}")  # Python Dynamo breaks its graph at: the inner step is a frame of its own
        return self.optimizer.step(closure)


def _train(optimizer: torch.optim.Optimizer, model: torch.nn.Module, steps: int) -> None:
    for step in range(steps):
        generator = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()


def test_a_wrapper_captured_around_its_optimizer_steps_it_compiled_and_says_nothing() -> None:
    eager_model = make_model()
    model = copy.deepcopy(eager_model)
    eager = torch.optim.AdamW(eager_model.parameters(), lr=1e-2)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    wrapper = optcapture.capture(Delegating(inner))
    _train(eager, eager_model, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(wrapper, model, 3)
    assert not [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert wrapper.calls == [0, 1, 2]  # the wrapper's own Python ran at every step
    assert optcapture.explain(wrapper) == []
    assert [r.path for r in optcapture.explain(inner)] == ["bucketed"]
    assert optcapture.stats().steps == 3
    torch.testing.assert_close(list(model.parameters()), list(eager_model.parameters()))
    for p, q in zip(eager_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(inner.state[q], eager.state[p])


def test_a_wrapper_whose_inner_step_is_not_captured_either_is_said() -> None:
    # Adafactor's step is never handed to a backend on torch 2.13 (.item()): the wrapper captured nothing, said once.
    if not torch.__version__.startswith("2.13"):
        pytest.skip("Adafactor's graph break at .item() is what torch 2.13 does")
    p = torch.nn.Parameter(torch.ones(4, 4))
    p.grad = torch.ones(4, 4)
    wrapper = optcapture.capture(Delegating(torch.optim.Adafactor([p], lr=0.01)))
    with pytest.warns(RuntimeWarning, match="Dynamo hands optcapture no graph of the step of Delegating"):
        wrapper.step()


def test_accelerated_optimizer_captured_after_prepare_steps_its_optimizer_compiled() -> None:
    accelerate = pytest.importorskip("accelerate")
    eager_model = make_model()
    model = copy.deepcopy(eager_model)
    eager = torch.optim.AdamW(eager_model.parameters(), lr=1e-2)
    accelerator = accelerate.Accelerator(cpu=True)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, prepared = accelerator.prepare(model, inner)
    optcapture.capture(prepared)
    _train(eager, eager_model, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(prepared, model, 3)
    assert not [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert [r.path for r in optcapture.explain(inner)] == ["bucketed"]
    torch.testing.assert_close(list(model.parameters()), list(eager_model.parameters()))
