"""Hugging Face Accelerate with a captured AdamW.

Capture the optimizer *before* ``accelerator.prepare``: Accelerate wraps it in an ``AcceleratedOptimizer`` whose
``step()`` calls the wrapped optimizer's ``step()`` (skipping it while grads accumulate, and going through the
``GradScaler`` under fp16), so the captured step is what runs::

    optimizer = optcapture.capture(torch.optim.AdamW(model.parameters(), lr=3e-4))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)      # before or after the capture
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

The loop below uses gradient accumulation (``accelerator.accumulate``) and ``accelerator.clip_grad_norm_``, and is
checked against the same loop with an eager optimizer. Single process here; launched with ``accelerate launch`` or
``torchrun``, ``prepare`` wraps the model in DDP, which ``examples/05_ddp_torchrun.py`` covers.
"""

# %% Imports and model
from __future__ import annotations

import copy

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import optcapture

ACCUMULATION_STEPS = 2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 8))


def make_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(64, 32, generator=generator), torch.randn(64, 8, generator=generator))
    return DataLoader(data, batch_size=8, shuffle=False)


# %% Training with Accelerate
def train(model: nn.Module, capture: bool) -> tuple[torch.optim.Optimizer, int]:
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=ACCUMULATION_STEPS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    if capture:
        optimizer = optcapture.capture(optimizer)  # before prepare(): the AcceleratedOptimizer wraps this one
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))
    model, prepared_optimizer, loader, scheduler = accelerator.prepare(model, optimizer, make_loader(), scheduler)
    steps = 0
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.mse_loss(model(x), y))
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
                steps += 1
            prepared_optimizer.step()  # a no-op until ACCUMULATION_STEPS batches accumulated
            scheduler.step()
            prepared_optimizer.zero_grad()
    return optimizer, steps


def max_difference(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> float:
    """Largest |a - b| over the params and AdamW's state tensors."""
    pairs = []
    for p, q in zip(a.param_groups[0]["params"], b.param_groups[0]["params"], strict=True):
        pairs += [(p, q), *((a.state[p][k], b.state[q][k]) for k in ("exp_avg", "exp_avg_sq"))]
    return torch.stack([(x - y).abs().max() for x, y in pairs]).max().item()  # NaN propagates


# %% Capture, check against eager, report
def main() -> float:
    base = make_model()
    eager_optimizer, _ = train(copy.deepcopy(base), capture=False)
    optimizer, steps = train(copy.deepcopy(base), capture=True)
    difference = max_difference(eager_optimizer, optimizer)
    for report in optcapture.explain(optimizer):
        print(report.describe())
    print(f"{steps} optimizer steps (accumulating {ACCUMULATION_STEPS} batches each); max |captured - eager| over "
          f"params and state = {difference:.2e}; stats {optcapture.stats()}")
    if not difference <= 1e-5:  # NaN included
        raise SystemExit(f"captured step diverged from eager by {difference}")
    return difference


if __name__ == "__main__":
    main()
