"""The methods the benchmark compares, and the optimizers it can run (Lion is a user-written one)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

METHODS = ("eager", "fused", "compile", "reduce-overhead", "optcapture", "optcapture-zero-grad")
HAS_FUSED = {"adamw", "adam", "sgd"}
# Bytes one step must move per param (fp32): reads of param, grad and state, writes of param and state.
# "adabelief" is pytorch_optimizer's AdaBelief (installed separately): a third-party optimizer that counts steps as a
# Python int in its param groups.
BYTES_PER_PARAM = {"adamw": 28, "adam": 28, "sgd": 20, "lion": 20, "adabelief": 28}
USER_WRITTEN = {"lion", "adabelief"}  # lr stays a Python number, as their users pass it


class Lion(torch.optim.Optimizer):  # type: ignore[misc]
    """Lion (Chen et al. 2023), written as a user would: a plain loop over ``group["params"]``."""

    def __init__(self, params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()  # type: ignore[untyped-decorator]
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = exp_avg * beta1 + p.grad * (1 - beta1)
                p.add_(torch.sign(update) * -group["lr"])
                exp_avg.mul_(beta2).add_(p.grad * (1 - beta2))


def make_optimizer(name: str, params: list[torch.Tensor], lr: Any, **kwargs: Any) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, **kwargs)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, **kwargs)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, **kwargs)
    if name == "lion":
        return Lion(params, lr=lr, weight_decay=0.01)
    if name == "adabelief":
        from pytorch_optimizer import AdaBelief

        return AdaBelief(params, lr=lr, weight_decay=0.01)  # type: ignore[no-any-return]
    raise ValueError(f"unknown optimizer {name!r}; choose adamw, adam, sgd, lion or adabelief")


@dataclasses.dataclass
class Setup:
    """One method ready to step: its optimizer, the step callable and how grads arrive."""

    optimizer: torch.optim.Optimizer
    step: Callable[[], Any]
    fresh_grads: bool = False


def setup(method: str, optimizer_name: str, params: list[torch.Tensor], device: torch.device) -> Setup | None:
    """Build ``method`` over ``params`` (which already carry grads); None if it does not apply."""
    lr = 1e-3
    if method == "eager":
        opt = make_optimizer(optimizer_name, params, lr)
        return Setup(opt, opt.step)
    if method == "fused":
        if optimizer_name not in HAS_FUSED:
            return None
        opt = make_optimizer(optimizer_name, params, lr, fused=True)
        return Setup(opt, opt.step)
    if method in ("compile", "reduce-overhead"):
        # PyTorch's recipe: a tensor lr (capturable on CUDA) so the scheduler does not recompile.
        extra: dict[str, Any] = ({"capturable": True} if device.type == "cuda" and optimizer_name != "sgd"
                                 and optimizer_name not in USER_WRITTEN else {})
        tensor_lr = optimizer_name not in USER_WRITTEN  # they pass lr as a Python number (alpha), like user code does
        opt = make_optimizer(optimizer_name, params, torch.tensor(lr) if tensor_lr else lr, **extra)
        mode = "reduce-overhead" if method == "reduce-overhead" else None
        return Setup(opt, torch.compile(opt.step, mode=mode))
    if method in ("optcapture", "optcapture-zero-grad"):
        opt = make_optimizer(optimizer_name, params, lr)
        return Setup(opt, torch.compile(opt.step, backend="optcapture"), fresh_grads=method.endswith("zero-grad"))
    raise ValueError(f"unknown method {method!r}")
