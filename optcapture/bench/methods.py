"""The methods the benchmark compares, built from one optimizer, and the optimizers it can run (Lion is user-written).

Invariant: a method is built from an optimizer that no method has stepped yet, over params no other method holds, and
changes only how the step runs (fused kernel, tensor lr for stock compile, a backend), never the hyperparameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

METHODS = ("eager", "fused", "compile", "reduce-overhead", "optcapture", "optcapture-zero-grad")
"""Methods of the optimizer-step presets and of :func:`optcapture.bench.compare`."""
TRAIN_METHODS = ("eager", "fused", "compile", "optcapture", "optcapture-tail")
"""Methods of the training presets: how the loop's tail (clip, step, zero_grad) runs."""
SCALING_METHODS = ("eager", "fused", "compile", "optcapture")
"""Methods of the scaling preset, all in the default ``zero_grad()`` loop (new grads every step)."""
FSDP2_METHODS = ("eager", "fused", "compile", "optcapture")
"""Methods of the fsdp2 preset (eager: AdamW foreach, FSDP2's default), all given new grads before every step."""
HAS_FUSED = {"adamw", "adam", "sgd"}
# Bytes one step must move per param (fp32): reads of param, grad and state, writes of param and state.
# "adabelief" is pytorch_optimizer's AdaBelief (installed separately): a third-party optimizer that counts steps as a
# Python int in its param groups.
# "lamb" and "muon" are lane-local (per-param norms; per-matrix Newton-Schulz): bucketed as same-shape batches. Muon's
# matmuls make it compute-bound: its "floor" is the memory traffic alone. "muon" steps the 2-D shapes only.
BYTES_PER_PARAM = {"adamw": 28, "adam": 28, "sgd": 20, "lion": 20, "adabelief": 28, "lamb": 28, "muon": 20}
USER_WRITTEN = {"lion", "adabelief", "lamb"}  # lr stays a Python number, as their users pass it
MATRICES_ONLY = {"muon"}
# Max |param - eager's| allowed of an optimizer that computes in bfloat16 inside its step, by class name: Muon's
# Newton-Schulz iteration runs in bf16 (torch/optim/_muon.py), so any other order of its matmuls' sums (a batched
# matmul, Inductor's fusion; stock compile too: 8.7e-5 after 20 steps on GPT-2's matrices, H100) moves the params by
# bf16 rounding, well above fp32's 1e-4.
TOLERANCE_BY_CLASS = {"Muon": 5e-4}


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


class Lamb(torch.optim.Optimizer):  # type: ignore[misc]
    """LAMB (You et al. 2019) written as a user would: Adam's update scaled by ||p|| / ||update|| of each param."""

    def __init__(self, params: Any, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()  # type: ignore[untyped-decorator]
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                corrected_avg = state["exp_avg"] / (1 - beta1 ** state["step"])
                corrected_sq = state["exp_avg_sq"] / (1 - beta2 ** state["step"])
                update = corrected_avg / (corrected_sq.sqrt() + group["eps"])
                update.add_(p, alpha=group["weight_decay"])
                weight_norm, update_norm = p.norm(), update.norm()
                trust = torch.where((weight_norm > 0) & (update_norm > 0), weight_norm / update_norm,
                                    torch.ones_like(weight_norm))
                p.add_(update * trust, alpha=-group["lr"])


def make_optimizer(name: str, params: Any, lr: float = 1e-3, **options: Any) -> torch.optim.Optimizer:
    """The benchmark's ``name`` optimizer over ``params``; ``options`` go to its constructor (``foreach=True``)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, **options)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, **options)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, **options)
    if name == "lion":
        return Lion(params, lr=lr, weight_decay=0.01, **options)
    if name == "adabelief":
        from pytorch_optimizer import AdaBelief

        return AdaBelief(params, lr=lr, weight_decay=0.01, **options)  # type: ignore[no-any-return]
    if name == "lamb":
        return Lamb(params, lr=lr, weight_decay=0.01, **options)
    if name == "muon":
        return torch.optim.Muon(params, lr=lr, **options)
    raise ValueError(f"unknown optimizer {name!r}; choose {', '.join(sorted(BYTES_PER_PARAM))}")


@dataclasses.dataclass
class Setup:
    """One method ready to step: its optimizer, the step callable and how grads arrive."""

    optimizer: torch.optim.Optimizer
    step: Callable[[], Any]
    fresh_grads: bool = False
    """As after ``zero_grad()`` + ``backward()``: new grad tensors before every step."""


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A method that does not apply to this optimizer, and why."""

    reason: str


def rebuild(optimizer: torch.optim.Optimizer, overrides: dict[str, Any],
            tensor_lr: bool = False) -> torch.optim.Optimizer:
    """The same class over the same params and groups, with ``overrides`` in the constructor and in every group (a
    group's own keys win over constructor arguments in ``add_param_group``); ``tensor_lr``: each group's lr in a
    0-dim tensor."""
    if optimizer.state:
        raise ValueError("the optimizer has state already; build the methods from one that has not stepped")
    groups = [{**group, **overrides} for group in optimizer.param_groups]
    constructor = dict(overrides)
    if tensor_lr:
        for group in groups:
            group["lr"] = torch.tensor(float(group["lr"]))
        constructor["lr"] = groups[0]["lr"]  # the constructor checks a tensor lr against foreach and capturable
    return type(optimizer)(groups, **constructor)


def with_fused(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer | Skipped:
    name = type(optimizer).__name__
    if "fused" not in optimizer.defaults:
        return Skipped(f"{name} has no fused=True")
    try:
        return rebuild(optimizer, {"fused": True, "foreach": None})
    except (TypeError, ValueError, RuntimeError) as error:
        return Skipped(f"{name}(fused=True) failed: {error}")


def with_tensor_lr(optimizer: torch.optim.Optimizer, device: torch.device) -> torch.optim.Optimizer:
    """PyTorch's recipe for compiling a step under a scheduler: lr in a tensor, so a new lr is no recompile; capturable
    where foreach needs it. Only ``torch.optim`` classes: others take lr as a Python number, as their users pass it."""
    if not type(optimizer).__module__.startswith("torch.optim") or not optimizer.param_groups:
        return optimizer
    if any(isinstance(group["lr"], torch.Tensor) for group in optimizer.param_groups):
        return optimizer
    overrides: dict[str, Any] = {}
    if "capturable" in optimizer.defaults and (device.type == "cuda"
                                               or any(g.get("foreach") for g in optimizer.param_groups)):
        overrides["capturable"] = True
    try:
        return rebuild(optimizer, overrides, tensor_lr=True)
    except (TypeError, ValueError, RuntimeError):
        return optimizer


def _eager(optimizer: torch.optim.Optimizer, device: torch.device) -> Setup | Skipped:
    return Setup(optimizer, optimizer.step)


def _fused(optimizer: torch.optim.Optimizer, device: torch.device) -> Setup | Skipped:
    fused = with_fused(optimizer)
    return fused if isinstance(fused, Skipped) else Setup(fused, fused.step)


def _stock(mode: str | None) -> Callable[[torch.optim.Optimizer, torch.device], Setup | Skipped]:
    def build(optimizer: torch.optim.Optimizer, device: torch.device) -> Setup | Skipped:
        opt = with_tensor_lr(optimizer, device)
        return Setup(opt, torch.compile(opt.step, mode=mode))

    return build


def _optcapture(fresh_grads: bool) -> Callable[[torch.optim.Optimizer, torch.device], Setup | Skipped]:
    def build(optimizer: torch.optim.Optimizer, device: torch.device) -> Setup | Skipped:
        return Setup(optimizer, torch.compile(optimizer.step, backend="optcapture"), fresh_grads=fresh_grads)

    return build


Variant = Callable[[torch.optim.Optimizer, torch.device], Setup | Skipped]
VARIANTS: dict[str, Variant] = {
    "eager": _eager,
    "fused": _fused,
    "compile": _stock(None),
    "reduce-overhead": _stock("reduce-overhead"),
    "optcapture": _optcapture(fresh_grads=False),
    "optcapture-zero-grad": _optcapture(fresh_grads=True),
}
"""How each step method is built from an optimizer over its own params (tests add recording methods here)."""


def setup(method: str, optimizer: torch.optim.Optimizer, device: torch.device) -> Setup | Skipped:
    """Build ``method`` from ``optimizer`` (eager form, over params that already carry grads)."""
    if method not in VARIANTS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(VARIANTS)}")
    return VARIANTS[method](optimizer, device)
