"""Test helpers: run an optimizer eagerly and through optcapture on the same grads, and compare."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import optcapture

MakeOptimizer = Callable[[Any], torch.optim.Optimizer]


def make_model(device: str = "cpu", bias: bool = True, dtype: torch.dtype = torch.float32) -> nn.Module:
    """PyTorch's compiled-optimizer suite model: 2 x Linear(10, 10) (4 params with bias)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 10, bias=bias), nn.Linear(10, 10, bias=bias)).to(device=device, dtype=dtype)


@dataclasses.dataclass
class Pair:
    eager_model: nn.Module
    eager: torch.optim.Optimizer
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[], Any]
    eager_scheduler: Any = None
    scheduler: Any = None


def make_pair(make_opt: MakeOptimizer, device: str = "cpu", bias: bool = True, options: dict[str, Any] | None = None,
              scheduler: Callable[[torch.optim.Optimizer], Any] | None = None, model: nn.Module | None = None) -> Pair:
    eager_model = model if model is not None else make_model(device, bias)
    captured_model = copy.deepcopy(eager_model)
    eager, optimizer = make_opt(eager_model.parameters()), make_opt(captured_model.parameters())
    step = torch.compile(optimizer.step, backend="optcapture", options=options or {})
    pair = Pair(eager_model, eager, captured_model, optimizer, step)
    if scheduler is not None:
        pair.eager_scheduler, pair.scheduler = scheduler(eager), scheduler(optimizer)
    return pair


def set_grads(pair: Pair, seed: int, present: Callable[[int], bool] = lambda i: True) -> None:
    generator = torch.Generator().manual_seed(seed)
    for i, (p, q) in enumerate(zip(pair.eager_model.parameters(), pair.model.parameters(), strict=True)):
        if present(i):
            grad = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
            p.grad, q.grad = grad.clone(), grad.clone()
        else:
            p.grad, q.grad = None, None


def step_both(pair: Pair, seed: int, present: Callable[[int], bool] = lambda i: True) -> None:
    set_grads(pair, seed, present)
    pair.eager.step()
    pair.step()
    for scheduler in (pair.eager_scheduler, pair.scheduler):
        if scheduler is None:
            continue
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(1.0)
        else:
            scheduler.step()


def assert_matches_eager(pair: Pair, atol: float | None = None, rtol: float | None = None) -> None:
    """Params and the whole optimizer state equal eager's (float32 tolerances unless given)."""
    eager_params = list(pair.eager_model.parameters())
    params = list(pair.model.parameters())
    torch.testing.assert_close(params, eager_params, atol=atol, rtol=rtol)
    for p_eager, p in zip(eager_params, params, strict=True):
        state_eager, state = pair.eager.state.get(p_eager, {}), pair.optimizer.state.get(p, {})
        assert set(state) == set(state_eager), f"state keys {sorted(state)} != eager's {sorted(state_eager)}"
        for key, value in state_eager.items():
            other = state[key]
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(other.to(value.device, value.dtype), value, atol=atol, rtol=rtol,
                                           msg=lambda m, key=key: f"state[{key!r}]: {m}")
            else:
                assert other == value, f"state[{key!r}] = {other!r}, eager {value!r}"


def step_matching_eager(pair: Pair, steps: int, first_seed: int = 0) -> None:
    """Step ``pair`` ``steps`` times on fresh grads, its fallback warnings silenced; equal to eager after each."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for seed in range(first_seed, first_seed + steps):
            step_both(pair, seed)
            assert_matches_eager(pair)


def warmup_from_zero(pair: Pair, steps: int, device: str = "cpu") -> None:
    """Step ``pair`` (a model over tokens, e.g. an embedding: rows 0 and 4-9 get grads of 0 at every step) under its
    schedulers; finite and equal to eager after every step."""
    tokens = torch.tensor([1, 2, 3], device=device)
    for step in range(steps):
        for model in (pair.eager_model, pair.model):
            model(tokens).pow(2).sum().backward()
        pair.eager.step()
        pair.step()
        for optimizer, scheduler in ((pair.eager, pair.eager_scheduler), (pair.optimizer, pair.scheduler)):
            scheduler.step()
            optimizer.zero_grad()
        assert all(bool(p.isfinite().all()) for p in pair.model.parameters()), f"NaN at step {step}"
        assert_matches_eager(pair)


def paths(optimizer: torch.optim.Optimizer) -> list[str]:
    return [report.path for report in optcapture.explain(optimizer)]


class NormalizedSGD(torch.optim.Optimizer):
    """Divides each update by the tensor's norm: a per-tensor reduction (lane-local: bucketed in same-shape batches)."""

    def __init__(self, params: Any, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad / (p.grad.norm() + 1e-8), alpha=-group["lr"])


class GlobalNormSGD(torch.optim.Optimizer):
    """Divides every update by the norm of all grads together: a reduction across params (``torch.stack`` of one norm
    per param), batched in three phases (:mod:`optcapture.cross_lane`)."""

    def __init__(self, params: Any, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            grads = [p.grad for p in group["params"] if p.grad is not None]
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad / (total + 1e-8), alpha=-group["lr"])


class SummedNormSGD(torch.optim.Optimizer):
    """Divides every update by the sum of the grads' norms, added one by one (Python's ``sum``): each ``+`` mixes two
    params, which no analysis proves a cross-param op, so never bucketed."""

    def __init__(self, params: Any, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            total = sum(torch.linalg.vector_norm(p.grad) for p in group["params"] if p.grad is not None)
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad / (total + 1e-8), alpha=-group["lr"])


def squared_loss_closure(model: nn.Module, optimizer: torch.optim.Optimizer, data: torch.Tensor) -> Callable[[], Any]:
    """The closure users pass to ``step(closure)``: zero_grad, forward, backward, return the loss."""

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = model(data).square().mean()
        loss.backward()
        return loss

    return closure


# Every stock elementwise optimizer, in its foreach (True) or single-tensor (False) form.
STOCK = {
    "Adadelta": lambda p, fe: torch.optim.Adadelta(p, foreach=fe),
    "Adagrad": lambda p, fe: torch.optim.Adagrad(p, foreach=fe),
    "Adam": lambda p, fe: torch.optim.Adam(p, foreach=fe),
    "AdamW": lambda p, fe: torch.optim.AdamW(p, foreach=fe),
    "Adamax": lambda p, fe: torch.optim.Adamax(p, foreach=fe),
    "ASGD": lambda p, fe: torch.optim.ASGD(p, foreach=fe),
    "NAdam": lambda p, fe: torch.optim.NAdam(p, foreach=fe),
    "RAdam": lambda p, fe: torch.optim.RAdam(p, foreach=fe),
    "RMSprop": lambda p, fe: torch.optim.RMSprop(p, foreach=fe),
    "Rprop": lambda p, fe: torch.optim.Rprop(p, foreach=fe),
    "SGD": lambda p, fe: torch.optim.SGD(p, lr=0.1, foreach=fe),
}


def stock_variants() -> dict[str, MakeOptimizer]:
    """Every stock elementwise optimizer in its single-tensor ("Adam") and foreach ("Adam-foreach") forms."""
    return {f"{name}{'-foreach' if foreach else ''}": (lambda p, make=make, fe=foreach: make(p, fe))
            for name, make in STOCK.items() for foreach in (False, True)}


@dataclasses.dataclass
class BackendRun:
    """The params after :func:`run_backends`' steps under one backend, and the optimizer that stepped them."""

    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer


def run_backends(build: Callable[[], tuple[nn.Module, torch.optim.Optimizer]], steps: int,
                 device: str = "cpu") -> dict[str, BackendRun]:
    """Eager (``"eager-reference"``), stock ``torch.compile`` and optcapture, each stepping its own ``build()``
    ``steps`` times over the same random grads: for an optimizer that computes in low precision, where no two
    kernels agree to float32 tolerance and stock compile's own distance from eager is the bar."""
    runs = {}
    for backend in ("eager-reference", "inductor", "optcapture"):
        model, optimizer = build()
        step = optimizer.step if backend == "eager-reference" else torch.compile(optimizer.step, backend=backend)
        generator = torch.Generator(device=device).manual_seed(0)
        for _ in range(steps):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, device=device, generator=generator)
            step()
        runs[backend] = BackendRun([p.detach().clone() for p in model.parameters()], optimizer)
    return runs


def assert_as_close_to_eager_as_stock(runs: dict[str, BackendRun], slack: float) -> None:
    """optcapture's params lie within twice stock compile's distance from eager, plus ``slack``."""
    def distance(backend: str) -> float:
        return max(float((a - b).abs().max())
                   for a, b in zip(runs[backend].params, runs["eager-reference"].params, strict=True))

    assert distance("optcapture") <= 2 * distance("inductor") + slack, (distance("optcapture"), distance("inductor"))


def frame_reads_storage_offsets(*functions: Any) -> bool:
    """Whether a compiled frame of any of ``functions`` (and of what they wrap) passes tensors' storage offsets to
    its graph: Dynamo's bytecode calls ``call_storage_offset`` for each input it traced with a symbolic offset."""
    codes = set()
    for fn in functions:
        while fn is not None:
            codes.add(fn.__code__)
            fn = getattr(fn, "__wrapped__", None)
    entries = [e for code in codes for e in torch._C._dynamo.eval_frame._debug_get_cache_entry_list(code)]
    assert entries, "no frame of these functions was compiled"
    return any("call_storage_offset" in entry.code.co_names for entry in entries)
