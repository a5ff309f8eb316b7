"""Small optimizers written the ways third-party libraries write them (timm, pytorch_optimizer, lion-pytorch),
one pattern each, for the tests of optimizers users bring."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


class GroupStepAdam(torch.optim.Optimizer):
    """Adam counting steps as a Python int in its param groups (pytorch_optimizer, timm's Adan)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            group["step"] = group["step"] + 1 if "step" in group else 1
            b1, b2 = group["betas"]
            bc1, bc2 = self.bias_corrections(b1, b2, group["step"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if len(st) == 0:
                    st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
                st["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (st["v"].sqrt() / math.sqrt(bc2)).add_(group["eps"])
                p.addcdiv_(st["m"], denom, value=-group["lr"] / bc1)

    @staticmethod
    def bias_corrections(b1: float, b2: float, step: int) -> tuple[float, float]:
        return 1 - b1**step, 1 - b2**step


class MathPowAdam(GroupStepAdam):
    """GroupStepAdam computing its bias corrections with ``math.pow`` (pytorch_optimizer's ``debias``): Dynamo
    specializes the count at every value, so the step compiles again at every step, with any backend."""

    @staticmethod
    def bias_corrections(b1: float, b2: float, step: int) -> tuple[float, float]:
        return 1 - math.pow(b1, step), 1 - math.pow(b2, step)


class GlobalCounterSGD(torch.optim.Optimizer):
    """A step counter kept in ``optimizer.state`` under a string key (pytorch_optimizer's MADGRAD)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, momentum: float = 0.9) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if "k" not in self.state:
            self.state["k"] = torch.tensor([0], dtype=torch.long)
        scale = math.pow(self.state["k"].item() + 1, 0.5)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "buf" not in st:
                    st["buf"] = torch.zeros_like(p)
                st["buf"].mul_(group["momentum"]).add_(p.grad)
                p.add_(st["buf"], alpha=-group["lr"] / scale)
        self.state["k"].add_(1)


class GlobalTensorCounterSGD(torch.optim.Optimizer):
    """MADGRAD's counter as pytorch_optimizer keeps it (``self.state["k"]``), read as a tensor (no ``.item()``)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, momentum: float = 0.9) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if "k" not in self.state:
            self.state["k"] = torch.tensor([0], dtype=torch.long, device=self.param_groups[0]["params"][0].device)
        scale = torch.pow(self.state["k"] + 1, 0.5)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "buf" not in st:
                    st["buf"] = torch.zeros_like(p)
                st["buf"].mul_(group["momentum"]).add_(p.grad)
                p.sub_(st["buf"] * group["lr"] / scale)
        self.state["k"].add_(1)


class ConjAdam(torch.optim.Optimizer):
    """Adam squaring its grad with ``grad.conj()`` (timm's Adopt): a no-op on real tensors."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3) -> None:
        super().__init__(params, dict(lr=lr, betas=(0.9, 0.999), eps=1e-8))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if len(st) == 0:
                    st["step"] = torch.tensor(0.0)
                    st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
                st["step"] += 1
                st["m"].lerp_(p.grad, 1 - b1)
                st["v"].mul_(b2).addcmul_(p.grad, p.grad.conj(), value=1 - b2)
                p.addcdiv_(st["m"], st["v"].sqrt().add_(group["eps"]), value=-group["lr"])


class DataWritingLion(torch.optim.Optimizer):
    """Lion writing params through ``p.data`` (lion-pytorch)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.01) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if len(st) == 0:
                    st["exp_avg"] = torch.zeros_like(p)
                b1, b2 = group["betas"]
                p.data.mul_(1 - group["lr"] * group["weight_decay"])
                update = st["exp_avg"].clone().mul_(b1).add(p.grad, alpha=1 - b1).sign_()
                p.add_(update, alpha=-group["lr"])
                st["exp_avg"].mul_(b2).add_(p.grad, alpha=1 - b2)


def _module_level_update(p: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, lr: float, momentum: float) -> None:
    buf.mul_(momentum).add_(grad)
    p.add_(buf, alpha=-lr)


class ModuleFunctionSGD(torch.optim.Optimizer):
    """SGD whose update is a module-level function called per param (timm's NAdamW)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, momentum: float = 0.9) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "buf" not in st:
                    st["buf"] = torch.zeros_like(p)
                _module_level_update(p, p.grad, st["buf"], group["lr"], group["momentum"])


class FloatStateAdam(torch.optim.Optimizer):
    """Adam keeping a Python float in per-param state (pytorch_optimizer's LaProp): its step count."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3) -> None:
        super().__init__(params, dict(lr=lr, betas=(0.9, 0.999), eps=1e-8))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if len(st) == 0:
                    st["count"] = 0.0
                    st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
                st["count"] += 1.0
                st["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                bias = 1 - b2 ** st["count"]
                p.addcdiv_(st["m"], (st["v"] / bias).sqrt_().add_(group["eps"]), value=-group["lr"])


class ConstantBuildingAdam(torch.optim.Optimizer):
    """Adam building its constants with ``torch.tensor``/``torch.full`` (AdaBound, CAME)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3) -> None:
        super().__init__(params, dict(lr=lr, betas=(0.9, 0.999), eps=1e-8))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                lower = torch.tensor(1e-3, device=p.device)
                st = self.state[p]
                if len(st) == 0:
                    st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
                st["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                step_size = torch.full_like(p, group["lr"]).div_(st["v"].sqrt().add_(group["eps"])).clamp_(min=lower)
                p.add_(st["m"] * step_size, alpha=-1.0)


class OneElementStateAdam(torch.optim.Optimizer):
    """Adam keeping a per-param number as a tensor of shape ``(1,)``, written in place (pytorch_optimizer's QHAdam:
    ``beta1_weight``)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3) -> None:
        super().__init__(params, dict(lr=lr, betas=(0.9, 0.999), eps=1e-8))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if len(st) == 0:
                    st["weight"] = torch.zeros(1, device=p.device)
                    st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
                st["weight"].mul_(b1).add_(1.0)
                st["m"].lerp_(p.grad, st["weight"].reciprocal().reshape(()))
                st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                p.addcdiv_(st["m"], st["v"].sqrt().add_(group["eps"]), value=-group["lr"])


class OutDivAdaBound(torch.optim.Optimizer):
    """AdaBound's update as pytorch_optimizer writes it: the step size divided by each denominator into the
    denominator itself, ``torch.div(numerator, denom, out=denom)``, then clamped (``foreach_scalar_div_``)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3) -> None:
        super().__init__(params, dict(lr=lr, betas=(0.9, 0.999), eps=1e-8))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if len(st) == 0:
                    st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
                st["m"].lerp_(p.grad, 1 - b1)
                st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = st["v"].sqrt().add_(group["eps"])
                numerator = torch.full((), fill_value=group["lr"], dtype=p.dtype, device=p.device)
                torch.div(numerator, denom, out=denom)
                p.sub_(denom.clamp_(min=1e-4, max=1e-1).mul_(st["m"]))


class RebindingAdam(torch.optim.Optimizer):
    """Adam with its state updated out of place and assigned back (``state["m"] = beta * state["m"] + ...``), a
    0-dim bias-correction product among it (timm's LaProp keeps ``exp_avg_lr_2`` so), and the last update kept
    under a key it reads first (it adds a tenth of it to the next update)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.99),
                 eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
                    state["b1_power"] = torch.ones((), dtype=p.dtype, device=p.device)
                    state["update"] = torch.zeros_like(p)
                state["m"] = b1 * state["m"] + (1 - b1) * p.grad
                state["v"] = b2 * state["v"] + (1 - b2) * p.grad * p.grad
                state["b1_power"] = state["b1_power"] * b1
                step_size = group["lr"] / (1 - state["b1_power"])
                state["update"] = step_size * state["m"] / (state["v"].sqrt() + group["eps"]) + 0.1 * state["update"]
                p.sub_(state["update"])


USER_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    cls.__name__: cls for cls in (GroupStepAdam, GlobalCounterSGD, GlobalTensorCounterSGD, ConjAdam, DataWritingLion,
                                  ModuleFunctionSGD, FloatStateAdam, ConstantBuildingAdam,
                                  OneElementStateAdam, OutDivAdaBound, RebindingAdam)
}


class ParamLoopOptimizer(torch.optim.Optimizer):
    """The loop users write (every param with a grad, its state, its group), with each param's update in
    :meth:`update`: one pattern per subclass. Dynamo inlines the call, so the graph is the one a single loop makes."""

    def __init__(self, params: Iterable[Any], lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update(p, self.state[p], group["lr"])

    def update(self, p: torch.Tensor, state: dict[str, Any], lr: float) -> None:
        raise NotImplementedError


class BufferMomentum(ParamLoopOptimizer):
    """Momentum as users write it, its buffer made by :meth:`new_buffer` (``zeros_like(p)``: the param's strides and
    dtype) and updated in its own dtype; subclasses make it in another order or dtype."""

    def __init__(self, params: Any, lr: float = 0.01) -> None:
        super().__init__(params, lr)

    def new_buffer(self, p: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(p)

    def update(self, p: torch.Tensor, state: dict[str, Any], lr: float) -> None:
        if not state:
            state["buf"] = self.new_buffer(p)
        buf = state["buf"]
        buf.mul_(0.9).add_(p.grad.to(buf.dtype))
        p.add_(buf.to(p.dtype), alpha=-lr)
