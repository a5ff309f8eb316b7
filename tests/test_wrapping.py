"""optcapture.capture(optimizer): the compiled step behind the optimizer's own ``step``, for frameworks."""

from __future__ import annotations

import copy
import gc
import io
import warnings
import weakref
from typing import Any

import pytest
import torch
from helpers import assert_matches_eager, frame_reads_storage_offsets, make_model, paths
from user_optimizers import ModuleFunctionSGD

import optcapture
from optcapture.wrapping import evaluates_closure_first


class _Pair:
    def __init__(self, make: Any, capture_after_scheduler: bool = False, **options: Any) -> None:
        self.eager_model = make_model()
        self.model = copy.deepcopy(self.eager_model)
        self.eager, self.optimizer = make(self.eager_model.parameters()), make(self.model.parameters())
        if not capture_after_scheduler:
            optcapture.capture(self.optimizer, options or None)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, 2, gamma=0.5)
        self.eager_scheduler = torch.optim.lr_scheduler.StepLR(self.eager, 2, gamma=0.5)
        if capture_after_scheduler:
            optcapture.capture(self.optimizer, options or None)
        self.data = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))

    def closures(self) -> list[Any]:
        def closure_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
            def closure() -> torch.Tensor:
                optimizer.zero_grad()
                loss = model(self.data).square().mean()
                loss.backward()
                return loss
            return closure
        return [closure_of(self.eager_model, self.eager), closure_of(self.model, self.optimizer)]


@pytest.mark.parametrize("capture_after_scheduler", [False, True])
def test_the_same_optimizer_steps_compiled_under_a_scheduler_with_a_closure(capture_after_scheduler: bool) -> None:
    # Lightning calls opt.step(closure=...); the scheduler wraps opt.step when it is built (before the capture:
    # its wrapper is pointed at the captured class; after it: it wraps the captured step).
    pair = _Pair(lambda p: torch.optim.AdamW(p, lr=1e-2), capture_after_scheduler)
    assert isinstance(pair.optimizer, torch.optim.AdamW) and type(pair.optimizer).__name__ == "AdamW"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback warning
        warnings.filterwarnings("error", message=".*(overridden|before `optimizer.step\\(\\)`).*")
        for _ in range(5):
            eager_closure, closure = pair.closures()
            loss_eager, loss = pair.eager.step(eager_closure), pair.optimizer.step(closure)
            torch.testing.assert_close(loss, loss_eager)
            pair.eager_scheduler.step()
            pair.scheduler.step()
    assert_matches_eager(pair)  # type: ignore[arg-type]
    assert paths(pair.optimizer) == ["bucketed"]
    assert optcapture.stats()["steps"] == 5
    assert pair.optimizer.param_groups[0]["lr"] == pair.eager.param_groups[0]["lr"] == pytest.approx(2.5e-3)


def test_grad_scaler_steps_the_captured_optimizer() -> None:
    pair = _Pair(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**4), torch.amp.GradScaler("cpu", init_scale=2.0**4)]
    for _ in range(4):
        for model, optimizer, scaler in ((pair.eager_model, pair.eager, scalers[0]),
                                         (pair.model, pair.optimizer, scalers[1])):
            optimizer.zero_grad()
            scaler.scale(model(pair.data).square().mean()).backward()
            scaler.step(optimizer)
            scaler.update()
    assert_matches_eager(pair)  # type: ignore[arg-type]
    assert paths(pair.optimizer) == ["first-step", "bucketed"]


def test_state_dict_and_deepcopy_of_a_captured_optimizer() -> None:
    pair = _Pair(lambda p: torch.optim.Adam(p, lr=1e-2))
    for _ in range(2):
        for optimizer, closure in zip((pair.eager, pair.optimizer), pair.closures(), strict=True):
            optimizer.step(closure)
    fresh = torch.optim.Adam(make_model().parameters(), lr=1e-2)
    fresh.load_state_dict(pair.optimizer.state_dict())
    torch.testing.assert_close(fresh.state_dict()["state"], pair.eager.state_dict()["state"])
    twin = copy.deepcopy(pair.optimizer)
    assert isinstance(twin, torch.optim.Adam)
    torch.testing.assert_close(twin.state_dict()["state"], pair.eager.state_dict()["state"])


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
def test_a_captured_optimizer_saved_whole_or_copied_stays_captured_and_steps_like_eager(how: str) -> None:
    # torch.save(opt) pickles the class by name; the subclass capture() made has its base's name, under which
    # pickle found the base, not it ("it's not the same object as torch.optim.adam.Adam").
    pair = _Pair(lambda p: torch.optim.Adam(p, lr=1e-2), fallback="raise")
    for _ in range(2):
        for optimizer, closure in zip((pair.eager, pair.optimizer), pair.closures(), strict=True):
            optimizer.step(closure)
    if how == "torch.save":
        buffer = io.BytesIO()
        torch.save({"model": pair.model, "optimizer": pair.optimizer}, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    else:
        loaded = copy.deepcopy({"model": pair.model, "optimizer": pair.optimizer})
    model, optimizer = loaded["model"], loaded["optimizer"]
    assert type(optimizer) is type(pair.optimizer) and type(optimizer) is not torch.optim.Adam
    assert isinstance(optimizer, torch.optim.Adam)
    assert [p is q for p, q in zip(optimizer.param_groups[0]["params"], model.parameters(), strict=True)] == [True] * 4
    for _ in range(2):
        for m, o in ((pair.eager_model, pair.eager), (model, optimizer)):
            o.zero_grad()
            m(pair.data).square().mean().backward()
            o.step()
    for p, q in zip(pair.eager_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, p)
    torch.testing.assert_close(optimizer.state_dict()["state"], pair.eager.state_dict()["state"])
    assert paths(optimizer)[-1] == "bucketed"


def test_a_step_that_uses_its_closure_later_runs_uncompiled_and_says_so() -> None:
    class TwoLook(torch.optim.SGD):
        """Evaluates the closure twice (as SAM does): evaluating it once before the step would change it."""

        def step(self, closure: Any = None) -> Any:  # type: ignore[override]
            loss = closure()
            with torch.no_grad():
                for p in self.param_groups[0]["params"]:
                    p.mul_(0.5)
            closure()
            super().step()
            return loss

    assert not evaluates_closure_first(TwoLook.step)
    pair = _Pair(lambda p: TwoLook(p, lr=0.1))
    eager_closure, closure = pair.closures()
    pair.eager.step(eager_closure)
    with pytest.warns(RuntimeWarning, match="TwoLook.step uses its closure beyond evaluating it first"):
        pair.optimizer.step(closure)
    assert_matches_eager(pair)  # type: ignore[arg-type]


def test_stock_closures_are_evaluated_first_except_lbfgs() -> None:
    for cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad):
        assert evaluates_closure_first(cls.step), cls
    assert not evaluates_closure_first(torch.optim.LBFGS.step)
    with pytest.raises(optcapture.UnsupportedStepError, match="LBFGS"):
        optcapture.capture(torch.optim.LBFGS(make_model().parameters()))


def test_options_are_checked_at_capture_and_a_second_capture_must_agree() -> None:
    optimizer = torch.optim.SGD(make_model().parameters(), lr=0.1)
    with pytest.raises(optcapture.OptionError, match="fallbak"):
        optcapture.capture(optimizer, {"fallbak": "raise"})
    assert type(optimizer) is torch.optim.SGD  # nothing changed
    assert optcapture.capture(optimizer, {"fallback": "raise"}) is optimizer
    assert optcapture.capture(optimizer, optcapture.CaptureConfig(fallback="raise")) is optimizer
    with pytest.raises(optcapture.OptionError, match="captured with other options"):
        optcapture.capture(optimizer)


def test_a_captured_optimizer_is_freed() -> None:
    pair = _Pair(lambda p: torch.optim.Adam(p, lr=1e-2))
    for optimizer, closure in zip((pair.eager, pair.optimizer), pair.closures(), strict=True):
        optimizer.step(closure)
    ref = weakref.ref(pair.optimizer)
    del pair, optimizer, closure
    gc.collect()
    assert ref() is None


def test_a_step_dynamo_never_hands_over_is_said_and_fused_is_said_at_capture() -> None:
    # Adafactor breaks its graph at step_t.item() (torch 2.13): no backend sees its step, which ran uncompiled.
    p = torch.nn.Parameter(torch.ones(4, 4))
    p.grad = torch.ones(4, 4)
    adafactor = optcapture.capture(torch.optim.Adafactor([p], lr=0.01))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adafactor.step()
    said = [w for w in caught if "Dynamo hands optcapture no graph of the step of Adafactor" in str(w.message)]
    # Said exactly when optcapture saw nothing of it, and then reported (torch 2.13 breaks the graph; other versions
    # may differ).
    reports = optcapture.explain(adafactor)
    assert len(said) == (1 if [r.path for r in reports] == ["uncompiled"] else 0), reports
    if torch.__version__.startswith("2.13"):
        assert len(said) == 1
    fused = [torch.nn.Parameter(torch.ones(3))]
    with pytest.warns(RuntimeWarning, match=r"param group\(s\) \[0\] of AdamW use fused=True"):
        optcapture.capture(torch.optim.AdamW(fused, fused=True))
    with pytest.raises(optcapture.UnsupportedStepError, match="fused=True"):
        optcapture.capture(torch.optim.AdamW(fused, fused=True), {"fallback": "raise"})


def test_a_captured_step_traces_bucket_view_grads_with_static_shapes() -> None:
    # Grads that view one bucket (DDP's gradient_as_bucket_view=True; FSDP2's reduce-scatter output, tested in
    # tests/test_compat.py) are traced like their params until the step is captured: the steady step's frame reads
    # no storage offsets, and the real views, new ones every step, step bucketed and exact.
    model = make_model()
    reference = copy.deepcopy(model)
    opts = [ModuleFunctionSGD(m.parameters()) for m in (reference, model)]
    optcapture.capture(opts[1])
    for seed in range(4):
        for m in (reference, model):
            params = list(m.parameters())
            bucket = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(seed))
            offsets = [0]
            for p in params:
                offsets.append(offsets[-1] + p.numel())
            for p, start, end in zip(params, offsets, offsets[1:], strict=False):
                p.grad = bucket[start:end].view_as(p)
            assert all(p.grad is not None and p.grad._is_view() for p in params)
        opts[0].step()
        opts[1].step()
    torch.testing.assert_close(list(model.parameters()), list(reference.parameters()))
    assert paths(opts[1])[-1] == "bucketed"
    assert not frame_reads_storage_offsets(ModuleFunctionSGD.step)
