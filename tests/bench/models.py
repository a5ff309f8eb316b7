"""Model factories for ``python -m optcapture.bench --model tests.bench.models:NAME`` in tests/test_bench.py."""

from __future__ import annotations

import torch
from torch import nn


def tiny_mlp() -> nn.Module:
    """A model alone: the benchmark builds its optimizer (AdamW by default)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def tiny_mlp_with_sgd() -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model and its own optimizer: SGD with momentum in two groups, which creates its state in its first step."""
    model = tiny_mlp()
    first, last = model[0], model[2]
    optimizer = torch.optim.SGD([{"params": first.parameters()}, {"params": last.parameters(), "lr": 5e-3}],
                                lr=1e-2, momentum=0.9)
    return model, optimizer
