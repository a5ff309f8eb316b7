"""PyTorch Lightning with a captured AdamW: capture it in ``configure_optimizers``.

Lightning steps the optimizer itself, as ``optimizer.step(closure=...)``: the closure runs ``training_step``,
``backward()`` and gradient clipping, and the step must evaluate it first. ``optcapture.capture`` keeps the
optimizer's own class and signature, evaluates the closure, then runs the compiled step::

    def configure_optimizers(self):
        optimizer = optcapture.capture(torch.optim.AdamW(self.parameters(), lr=1e-3))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)        # after the capture is fine
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

(``torch.compile(opt.step, ...)`` cannot be used here: Lightning calls ``opt.step`` itself.) The run below, with
``gradient_clip_val`` and a per-step scheduler, is checked against the same Trainer run with an eager optimizer.
Works with ``lightning`` or ``pytorch_lightning``.
"""

# %% Imports and module
from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import optcapture

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl  # type: ignore[no-redef]


class Regressor(pl.LightningModule):
    def __init__(self, net: nn.Module, capture: bool) -> None:
        super().__init__()
        self.net, self.capture = net, capture

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> dict[str, object]:
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)
        if self.capture:
            optimizer = optcapture.capture(optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))


def make_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(48, 32, generator=generator), torch.randn(48, 8, generator=generator))
    return DataLoader(data, batch_size=8)


# %% Training with the Lightning Trainer
def train(net: nn.Module, capture: bool, steps: int) -> torch.optim.Optimizer:
    module = Regressor(net, capture)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, gradient_clip_val=1.0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")  # a toy DataLoader, on purpose
        trainer.fit(module, make_loader())
    optimizer: torch.optim.Optimizer = trainer.optimizers[0]
    return optimizer


def max_difference(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> float:
    """Largest |a - b| over the params and AdamW's state tensors."""
    pairs = []
    for p, q in zip(a.param_groups[0]["params"], b.param_groups[0]["params"], strict=True):
        pairs += [(p, q), *((a.state[p][k], b.state[q][k]) for k in ("exp_avg", "exp_avg_sq"))]
    return torch.stack([(x - y).abs().max() for x, y in pairs]).max().item()  # NaN propagates


# %% Capture, check against eager, report
def main(steps: int = 5) -> float:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no banner about GPUs and TPUs
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    net = make_net()
    eager_optimizer = train(copy.deepcopy(net), capture=False, steps=steps)
    optimizer = train(copy.deepcopy(net), capture=True, steps=steps)
    difference = max_difference(eager_optimizer, optimizer)
    for report in optcapture.explain(optimizer):
        print(report.describe())
    print(f"{steps} Lightning steps (closure, gradient_clip_val, LambdaLR per step); max |captured - eager| over "
          f"params and state = {difference:.2e}; stats {optcapture.stats()}")
    if not difference <= 1e-5:  # NaN included
        raise SystemExit(f"captured step diverged from eager by {difference}")
    return difference


if __name__ == "__main__":
    main()
