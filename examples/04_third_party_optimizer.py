"""A third-party optimizer: pytorch_optimizer's AdaBelief, captured like a stock one.

``torch.compile(opt.step, backend="optcapture")`` takes any ``torch.optim.Optimizer`` subclass: optcapture traces the
class's own ``step`` and proves each param's update elementwise before it buckets anything. AdaBelief is written as
many third-party optimizers are: it counts steps as a Python int in its param groups (``group["step"] += 1``) and
computes its bias corrections from it in Python (``1.0 - math.pow(beta, step)``), and it creates its state
(``exp_avg``, ``exp_avg_var``) inside its first step, which therefore runs as traced (path ``first-step``); the
step is captured from the second call on.

The run below trains the same model with eager AdaBelief and with the captured step, compares params, state tensors
and the groups' step counts, and prints what optcapture made of the step (``optcapture.explain(opt)[-1]``) and how
many captures the run took: a step that compiles once shows two (``first-step``, then ``bucketed``).

Needs ``pip install pytorch-optimizer``.
"""

# %% Imports and model
from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from collections.abc import Callable

import torch
from torch import nn


def make_model(device: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10)).to(device)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    try:
        from pytorch_optimizer import AdaBelief
    except ImportError as error:
        raise ImportError("this example needs pytorch_optimizer: pip install pytorch-optimizer") from error
    optimizer: torch.optim.Optimizer = AdaBelief(model.parameters(), lr=1e-3, weight_decay=0.01)
    return optimizer


def train(
    model: nn.Module, step_fn_for: Callable[[torch.optim.Optimizer], Callable[[], object]], steps: int, device: str
) -> torch.optim.Optimizer:
    optimizer = make_optimizer(model)
    step = step_fn_for(optimizer)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 64, generator=generator).to(device)
        y = torch.randint(0, 10, (32,), generator=generator).to(device)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        step()
    return optimizer


def max_difference(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> float:
    """Largest |a - b| over the params and every state tensor; the groups' Python step counts must be equal."""
    pairs = []
    for group_a, group_b in zip(a.param_groups, b.param_groups, strict=True):
        assert group_a.get("step") == group_b.get("step"), (group_a.get("step"), group_b.get("step"))
        for p, q in zip(group_a["params"], group_b["params"], strict=True):
            pairs.append((p, q))
            state_a, state_b = a.state[p], b.state[q]
            assert state_a.keys() == state_b.keys(), (state_a.keys(), state_b.keys())
            pairs += [(state_a[k], state_b[k]) for k in state_a if isinstance(state_a[k], torch.Tensor)]
    return max((x.detach().double() - y.detach().double()).abs().max().item() for x, y in pairs)


@dataclasses.dataclass
class Result:
    difference: float
    """Largest |captured - eager| over params and optimizer state."""
    optimizer: torch.optim.Optimizer
    """The captured run's optimizer (for ``optcapture.explain``)."""
    captures: int
    """How many times optcapture captured this optimizer's step during the run."""


# %% Capture, check against eager, report
def main(steps: int = 3, device: str = "cpu") -> Result:
    eager_model, captured_model = make_model(device), make_model(device)
    captured_model.load_state_dict(copy.deepcopy(eager_model.state_dict()))

    eager_optimizer = train(eager_model, lambda opt: opt.step, steps, device)
    begin = time.perf_counter()
    optimizer = train(captured_model, lambda opt: torch.compile(opt.step, backend="optcapture"), steps, device)
    seconds = time.perf_counter() - begin

    difference = max_difference(eager_optimizer, optimizer)
    import optcapture  # only for the report; capturing needed no import

    reports = optcapture.explain(optimizer)
    print(f"{steps} steps of {type(optimizer).__name__} on {device} in {seconds:.1f} s (compiles included); "
          f"captures of its step: {len(reports)} ({', '.join(report.path for report in reports)}); "
          f"max |captured - eager| over params and state = {difference:.2e}; stats {optcapture.stats()}")
    print(reports[-1])  # what optcapture made of the step, last capture
    if difference > 1e-4:
        raise SystemExit(f"captured step diverged from eager by {difference}")
    return Result(difference, optimizer, len(reports))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    arguments = parser.parse_args()
    main(arguments.steps, arguments.device)
