"""The tail of a training iteration (what runs after ``backward()``: grad clipping, GradScaler, the step, an EMA of
the params, ``zero_grad``) compiled as one function with the backend, as users write it, against the same tail run
eagerly: params, the whole optimizer state and the EMA equal eager's, the optimizer step is bucketed, and nothing
compiles again after warm-up. torch.optim's step graph-breaks at its own entry (``_use_grad``), so Dynamo hands the
backend the clip and the step as separate graphs: each must be right on its own."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from helpers import Pair, assert_matches_eager, paths

import optcapture

STEPS = 7


@dataclass
class Loop:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    ema: list[torch.Tensor]
    tail: Callable[[], Any]


def _make(model: torch.nn.Module, clip: str, max_value: float, scaler: bool, ema: bool, set_to_none: bool) -> Loop:
    params = list(model.parameters())
    device = params[0].device.type
    optimizer = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3))
    grad_scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 8, growth_interval=2) if scaler else None
    averages = [p.detach().clone() for p in params]

    def tail() -> Any:
        if grad_scaler is not None:
            grad_scaler.unscale_(optimizer)
        norm = None
        if clip == "norm":
            norm = torch.nn.utils.clip_grad_norm_(params, max_value)
        elif clip == "value":
            torch.nn.utils.clip_grad_value_(params, max_value)
        if grad_scaler is not None:
            grad_scaler.step(optimizer)
            grad_scaler.update()
        else:
            optimizer.step()
        if ema:
            with torch.no_grad():
                torch._foreach_lerp_(averages, params, 0.1)
        optimizer.zero_grad(set_to_none=set_to_none)
        return norm

    return Loop(model, optimizer, scheduler, grad_scaler, averages, tail)


def _backward(loop: Loop, seed: int, nonfinite: bool) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 10, generator=generator).to(next(loop.model.parameters()).device)
    loss = loop.model(x).pow(2).mean() * 10
    if loop.scaler is not None:
        loss = loop.scaler.scale(loss)
    loss.backward()
    if nonfinite:
        next(loop.model.parameters()).grad[0, 0] = float("inf")


CASES: dict[str, dict[str, Any]] = {
    "clip-active": dict(clip="norm", max_value=0.05, scaler=False, ema=False, set_to_none=True),
    "clip-inactive": dict(clip="norm", max_value=1e6, scaler=False, ema=True, set_to_none=True),
    "clip-value": dict(clip="value", max_value=0.01, scaler=False, ema=False, set_to_none=False),
    "ema-zero-grad-keeps-grads": dict(clip="none", max_value=0.0, scaler=False, ema=True, set_to_none=False),
    "grad-scaler": dict(clip="norm", max_value=0.5, scaler=True, ema=True, set_to_none=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_compiled_training_tail_matches_the_eager_tail(case: str) -> None:
    _tail_matches_eager(case, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_compiled_training_tail_matches_the_eager_tail_and_replays_its_clip_cuda(case: str) -> None:
    # The graphs next to the step (the clip, the EMA, GradScaler's unscale) replay CUDA graphs recorded per set of
    # input addresses when the grads come back at addresses seen before; every norm returned stays what it was.
    optcapture.reset()
    norms = _tail_matches_eager(case, torch.device("cuda"), steps=12)
    stats = optcapture.stats()
    # This loop keeps every returned norm and interleaves the eager tail, so its grads do not settle on a few
    # addresses as a training loop's do: the calls that find them elsewhere replay the graph over copies of them.
    assert stats["address_graphs_recorded"] >= 1, stats
    assert stats["address_graph_replays"] >= 1, stats
    assert stats["address_graph_misses"] < stats["address_graph_replays"], stats  # first calls, a recompile's
    for mine, eager in norms:
        torch.testing.assert_close(mine, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["clip-active", "clip-inactive"])
def test_a_steady_training_loop_replays_its_tail_at_every_call_after_warm_up_cuda(case: str,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # A loop that keeps no norm gets its grads back at the addresses of the iteration before, so after warm-up every
    # call of the clip graph (and the EMA's) replays a recorded CUDA graph. Recording must not move them itself:
    # torch.cuda.graph empties the allocator's cache before it records, and the grads of the next iteration then
    # land elsewhere (a miss, a new recording, and so on at about every other call).
    optcapture.reset()
    emptied: list[None] = []
    empty_cache = torch.cuda.empty_cache
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: (emptied.append(None), empty_cache())[1])
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(6))).cuda()
    loop = _make(model, **CASES[case])
    tail = torch.compile(loop.tail, backend="optcapture")
    warm, steps = 8, 20  # the first steps (state made, then moved into flat storage) move the allocator's blocks
    for step in range(steps):
        if step == warm:
            before, emptied_before = dict(optcapture.stats()), len(emptied)
        x = torch.randn(32, 64, device="cuda")
        model(x).pow(2).mean().backward()
        tail()
        loop.scheduler.step()
    after = optcapture.stats()
    for moved in ("address_graph_misses", "address_graph_staged"):  # no call found its grads elsewhere
        assert after[moved] == before[moved], (before, after)
    assert after["address_graph_replays"] - before["address_graph_replays"] >= steps - warm, (before, after)
    assert len(emptied) == emptied_before, "the allocator's cache was emptied after warm-up"
    assert paths(loop.optimizer)[-1] == "bucketed"


def _tail_matches_eager(case: str, device: torch.device, steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Runs the case's tail eagerly and compiled; checks params, state, EMA, scale and grads at every step; returns
    the norms each returned, as returned."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(device)
    eager, captured = _make(copy.deepcopy(model), **CASES[case]), _make(copy.deepcopy(model), **CASES[case])
    tail = torch.compile(captured.tail, backend="optcapture")
    scaled = CASES[case]["scaler"]
    scales: list[float] = []
    norms: list[tuple[torch.Tensor, torch.Tensor]] = []
    warm = 4 if scaled else 2  # the scaler's skipped step (step 3) takes a branch not traced before
    frames = 0
    for step in range(steps):
        if step == warm:
            frames = torch._dynamo.utils.counters["frames"]["ok"]
        nonfinite = bool(scaled) and step == 3  # GradScaler skips this step and halves its scale
        for loop in (eager, captured):
            _backward(loop, step, nonfinite)
        eager_norm, norm = eager.tail(), tail()
        eager.scheduler.step()
        captured.scheduler.step()
        if eager_norm is not None:
            torch.testing.assert_close(norm, eager_norm)
            norms.append((norm, eager_norm))
        assert_matches_eager(Pair(eager.model, eager.optimizer, captured.model, captured.optimizer, tail))
        torch.testing.assert_close(captured.ema, eager.ema)
        if scaled:
            assert captured.scaler is not None and eager.scaler is not None
            assert captured.scaler.get_scale() == eager.scaler.get_scale()
            scales.append(eager.scaler.get_scale())
        for p, q in zip(eager.model.parameters(), captured.model.parameters(), strict=True):
            assert (p.grad is None) == (q.grad is None)
    assert paths(captured.optimizer)[-1] == "bucketed"
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames, "compiled again after warm-up"
    if scaled:  # the scale grew, and the step with an inf grad was skipped (the scale halved)
        assert scales[1] > scales[0] and scales[3] == scales[2] / 2, scales
    return norms
