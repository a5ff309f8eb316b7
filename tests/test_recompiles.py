"""Float lr under every LR scheduler of PyTorch's suite: exactly one compile; structural changes: one more."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import assert_matches_eager, make_pair, paths, set_grads, step_both
from torch.optim import lr_scheduler

import optcapture

# PyTorch's test_compiled_optimizers.py LR_SCHEDULER_TO_KWARGS (values deliberately unusual).
SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "LambdaLR": (lr_scheduler.LambdaLR, {"lr_lambda": lambda _: 10}),
    "MultiplicativeLR": (lr_scheduler.MultiplicativeLR, {"lr_lambda": lambda _: 10}),
    "StepLR": (lr_scheduler.StepLR, {"step_size": 1, "gamma": 100}),
    "MultiStepLR": (lr_scheduler.MultiStepLR, {"milestones": [1, 2], "gamma": 100}),
    "ExponentialLR": (lr_scheduler.ExponentialLR, {"gamma": 100}),
    "CosineAnnealingLR": (lr_scheduler.CosineAnnealingLR, {"T_max": 7}),
    "CyclicLR": (lr_scheduler.CyclicLR, {"base_lr": 0.001, "max_lr": 0.02, "cycle_momentum": False}),
    "CosineAnnealingWarmRestarts": (lr_scheduler.CosineAnnealingWarmRestarts, {"T_0": 1}),
    "OneCycleLR": (lr_scheduler.OneCycleLR, {"max_lr": 0.02, "cycle_momentum": False, "steps_per_epoch": 1,
                                             "epochs": 10}),
    "ConstantLR": (lr_scheduler.ConstantLR, {"factor": 0.001}),
    "LinearLR": (lr_scheduler.LinearLR, {}),
    "ReduceLROnPlateau": (lr_scheduler.ReduceLROnPlateau, {"factor": 0.99, "patience": 1}),
    "PolynomialLR": (lr_scheduler.PolynomialLR, {}),
}
OPTIMIZERS = {
    "Adam": (lambda p: torch.optim.Adam(p, lr=0.01), ["bucketed"]),
    "AdamW": (lambda p: torch.optim.AdamW(p, lr=0.01), ["bucketed"]),
    # SGD creates its momentum buffers inside the first step: that step runs as traced, then one capture.
    "SGD-momentum": (lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), ["first-step", "bucketed"]),
}


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_float_lr_scheduler_compiles_once(optimizer: str, scheduler: str) -> None:
    make, expected = OPTIMIZERS[optimizer]
    cls, kwargs = SCHEDULERS[scheduler]
    pair = make_pair(make, scheduler=lambda o: cls(o, **kwargs))
    for seed in range(3):  # PyTorch's suite steps twice: its gamma=100 schedulers reach lr 1e4 at step 3
        step_both(pair, seed)
    assert paths(pair.optimizer) == expected
    # Eager does its lr arithmetic in Python doubles; the captured step reads lr from a float32 tensor (as
    # PyTorch's own tensor-lr path does). With lr up to 1e4 the measured max relative difference is
    # 4.5e-5 (MultiStepLR, params of magnitude ~8), hence 1e-4.
    assert_matches_eager(pair, rtol=1e-4, atol=1e-5)


def test_lr_actually_changes_under_the_matrix_schedulers() -> None:
    # Guards the matrix above against testing nothing: most schedulers change lr every step.
    pair = make_pair(lambda p: torch.optim.Adam(p, lr=0.01), scheduler=lambda o: lr_scheduler.StepLR(o, 1, 100))
    seen = set()
    for seed in range(4):
        step_both(pair, seed)
        seen.add(pair.optimizer.param_groups[0]["lr"])
    assert len(seen) == 4 and paths(pair.optimizer) == ["bucketed"]


def test_onecycle_cycling_adam_betas_does_not_recompile() -> None:
    pair = make_pair(lambda p: torch.optim.Adam(p, lr=0.01, foreach=False),
                     scheduler=lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.02, total_steps=20))
    betas = set()
    for seed in range(6):
        step_both(pair, seed)
        betas.add(pair.optimizer.param_groups[0]["betas"][0])
    assert len(betas) == 6
    assert paths(pair.optimizer) == ["bucketed"]
    assert_matches_eager(pair)


@pytest.mark.parametrize("name", ["SGD", "RMSprop"])
@pytest.mark.parametrize("schedule", ["OneCycleLR", "CyclicLR"])
def test_cycling_momentum_never_recompiles(name: str, schedule: str) -> None:
    # momentum steers control flow (``if momentum != 0``), so it cannot be a device tensor. Stock torch.compile
    # recompiles the step at its first change (Dynamo then makes it an input); optcapture has Dynamo read it as an
    # input from the first trace, and the capture follows the live value. More changes than Dynamo's recompile
    # limit (8): the shadow once recompiled at every value and then failed the step under fullgraph=True.
    make_scheduler = {
        "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.02, total_steps=40),
        "CyclicLR": lambda o: lr_scheduler.CyclicLR(o, base_lr=0.001, max_lr=0.02, step_size_up=20),
    }[schedule]
    pair = make_pair(lambda p: getattr(torch.optim, name)(p, lr=0.01, momentum=0.9), scheduler=make_scheduler)
    momenta = set()
    for seed in range(16):
        step_both(pair, seed)
        momenta.add(pair.optimizer.param_groups[0]["momentum"])
        if seed == 1:
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert len(momenta) == 16
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "a Dynamo frame recompiled"
    # The step's frame reached the backend this often. SGD creates its momentum buffers in its first step, which
    # changes the frame's guards: its second step compiles the frame again, a structural change. RMSprop creates
    # its state before tracing.
    assert optcapture.stats()["captures"] == {"SGD": 2, "RMSprop": 1}[name]
    assert paths(pair.optimizer) == {"SGD": ["first-step", "bucketed"], "RMSprop": ["bucketed"]}[name]
    assert optcapture.stats()["rebuilds"] == 0
    assert_matches_eager(pair)


def test_nesterov_with_a_cycled_momentum_steps_eagerly_from_its_capture_and_never_recompiles() -> None:
    # Nesterov passes momentum as ``alpha=``, which Dynamo can only specialize in the shadow's single-tensor step;
    # Inductor's cache then handed every later value the first value's compile (pytorch#194976): 1.2e-2 off eager
    # after 8 steps, with stock torch.compile as well. Later, each value compiled as itself, a second or more each,
    # until Dynamo's recompile limit failed the step with "FailOnRecompileLimitHit ... fullgraph=True". Now the
    # capture sees the shadow specialize momentum and steps eagerly from then on, saying why, with no recompile.
    pair = make_pair(lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True),
                     scheduler=lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.02, total_steps=40))
    with pytest.warns(RuntimeWarning, match=r"momentum .*nesterov=True passes momentum as alpha=.*OneCycleLR or "
                      r"CyclicLR \(cycle_momentum=True\).*runs eagerly, with no recompile") as said:
        for seed in range(14):
            step_both(pair, seed)
            assert_matches_eager(pair)
            if seed == 2:
                graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "a Dynamo frame recompiled"
    assert not [w for w in said if "FailOnRecompileLimitHit" in str(w.message)]
    assert paths(pair.optimizer) == ["first-step", "eager"]


def test_nesterov_with_a_cycled_momentum_and_fallback_raise_raises_before_stepping() -> None:
    pair = make_pair(lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True),
                     scheduler=lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.02, total_steps=40),
                     options={"fallback": "raise"})
    step_both(pair, 0)  # creates the momentum buffers, as traced
    set_grads(pair, 1)
    before = [p.detach().clone() for p in pair.model.parameters()]
    with pytest.raises(optcapture.UnsupportedStepError, match="nesterov=True passes momentum as alpha="):
        pair.step()
    assert all(torch.equal(a, p) for a, p in zip(before, pair.model.parameters(), strict=True))


def test_momentum_cycled_by_hand_recompiles_once_as_in_stock_torch_compile() -> None:
    # Without a scheduler's marks in the group nothing says momentum will change: it stays a constant (no frame
    # of the captured step is kept in Dynamo for it) until Dynamo sees it change and makes it an input.
    pair = make_pair(lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9))
    for seed in range(8):
        for optimizer in (pair.optimizer, pair.eager):
            optimizer.param_groups[0]["momentum"] = 0.9 - 0.01 * seed
        step_both(pair, seed)
    assert optcapture.stats()["captures"] == 2
    assert optcapture.stats()["rebuilds"] == 0
    assert_matches_eager(pair)


def test_state_cleared_recompiles_exactly_once() -> None:
    pair = make_pair(lambda p: torch.optim.Adam(p, lr=0.01))
    for seed in range(4):
        step_both(pair, seed)
    pair.optimizer.state.clear()
    pair.eager.state.clear()
    for seed in range(4, 7):
        step_both(pair, seed)
    assert paths(pair.optimizer) == ["bucketed", "bucketed"]
    assert_matches_eager(pair)


def test_replaced_state_tensor_recompiles_exactly_once() -> None:
    pair = make_pair(lambda p: torch.optim.Adam(p, lr=0.01))
    for seed in range(4):
        step_both(pair, seed)
    for opt, p in ((pair.optimizer, next(pair.model.parameters())), (pair.eager, next(pair.eager_model.parameters()))):
        opt.state[p]["exp_avg"] = torch.zeros_like(p)
    for seed in range(4, 7):
        step_both(pair, seed)
    assert paths(pair.optimizer) == ["bucketed", "bucketed"]
    assert_matches_eager(pair)
    assert optcapture.stats()["captures"] == 2


def test_a_float_dynamo_must_specialize_changing_every_step_steps_eagerly_without_recompiling() -> None:
    # SGD passes weight_decay as ``alpha=``, which Dynamo can only specialize: each new value compiled the
    # shadow again until Dynamo's recompile limit ("FailOnRecompileLimitHit"). Now the capture that follows the
    # changed value sees the shadow specialize it and steps eagerly from then on, warned once, exact, and with
    # no recompile after it.
    pair = make_pair(lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=0.1))
    with pytest.warns(RuntimeWarning, match=r"weight_decay reaches its step where Dynamo can only use a fixed number "
                      r"\(an op that takes a Python number, such as alpha=\), and it changes between steps"):
        for seed in range(14):
            for optimizer in (pair.optimizer, pair.eager):
                optimizer.param_groups[0]["weight_decay"] *= 0.97
            step_both(pair, seed)
            if seed == 4:
                graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "a Dynamo frame recompiled"
    # The first step (SGD creates its buffers in it) is no fallback; this one is.
    assert (optcapture.stats()["first_steps"], optcapture.stats()["eager"]) == (1, 1)
    assert_matches_eager(pair)


def test_a_recompile_limit_shared_by_several_optimizers_is_said_as_such() -> None:
    # Dynamo counts compiles per code object: the steps of several SGD instances share one limit. Saying that one
    # optimizer compiled again and again (as before) misled.
    import warnings

    with torch._dynamo.config.patch(recompile_limit=3), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            params = [torch.nn.Parameter(torch.randn(4))]
            params[0].grad = torch.randn(4)
            torch.compile(torch.optim.SGD(params, lr=0.1).step, backend="optcapture")()
    messages = [str(w.message) for w in caught if "optcapture" in str(w.message)]
    assert any("for several optimizers" in m and "recompile_limit" in m for m in messages), messages
    assert not any("Dynamo compiled the step of SGD" in m for m in messages), messages


def test_a_param_group_added_has_a_first_step_of_its_own_and_compiles_again_without_a_warning() -> None:
    # A new group compiles the step again, and (SGD creating its momentum in its first step) once more, as stock
    # torch.compile does, which says nothing: four compiles, three below the recompile limit, are no reason to warn.
    import warnings

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = torch.compile(optimizer.step, backend="optcapture")
    extra = torch.nn.Parameter(torch.randn(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for index in range(6):
            if index == 3:
                optimizer.add_param_group({"params": [extra]})
            extra.grad = torch.randn(3)
            model(torch.randn(3, 4)).sum().backward()
            step()
            optimizer.zero_grad()
    # The new group's params get their state in a first step of their own, as the first group's did: no warning
    # that state stays empty, and bucketed after it.
    paths_taken = [r.path for r in optcapture.explain(optimizer)]
    assert paths_taken == ["first-step", "bucketed"] * 2, paths_taken
    messages = [str(w.message) for w in caught]
    assert not any("recompile_limit" in m or "no state" in m for m in messages), messages
