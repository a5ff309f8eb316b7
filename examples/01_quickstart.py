"""Quickstart: capture an AdamW step with one line, under an LR scheduler, in a default training loop.

``torch.compile(opt.step, backend="optcapture")`` needs no import of optcapture: the backend is found
through its entry point. The loop below is the one users write (zero_grad(), backward(), step(),
scheduler.step()); the captured step is checked against eager torch.optim before anything is timed.
"""

# %% Imports and model
from __future__ import annotations

import copy
import time

import torch
from torch import nn


def make_model(device: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10)).to(device)


def train(model: nn.Module, step_fn_for: object, steps: int, device: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=max(steps, 2))
    step = step_fn_for(optimizer)  # type: ignore[operator]
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 64, generator=generator).to(device)
        y = torch.randint(0, 10, (32,), generator=generator).to(device)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        step()
        scheduler.step()
    return model, optimizer


# %% Capture, check against eager, report
def main(steps: int = 20, device: str | None = None) -> float:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    eager_model, captured_model = make_model(device), make_model(device)
    captured_model.load_state_dict(copy.deepcopy(eager_model.state_dict()))

    train(eager_model, lambda opt: opt.step, steps, device)
    begin = time.perf_counter()
    _, optimizer = train(captured_model, lambda opt: torch.compile(opt.step, backend="optcapture"), steps, device)
    seconds = time.perf_counter() - begin

    difference = max((a - b).abs().max().item()
                     for a, b in zip(eager_model.parameters(), captured_model.parameters(), strict=True))
    import optcapture  # only for the report; capturing needed no import

    for report in optcapture.explain(optimizer):
        print(report.describe())
    print(f"{steps} steps on {device} in {seconds:.1f} s (first call compiles); "
          f"max |param - eager param| = {difference:.2e}; stats {optcapture.stats()}")
    if difference > 1e-4:
        raise SystemExit(f"captured step diverged from eager by {difference}")
    return difference


if __name__ == "__main__":
    main()
