"""Replay: checkpoints mid-run, the default zero_grad loop, new param groups, replaced tensors, lifetime."""

from __future__ import annotations

import collections
import gc
import io
import sys
import types
import weakref
from typing import Any

import pytest
import torch
from helpers import assert_matches_eager, make_model, make_pair, paths, set_grads, step_both, warmup_from_zero

import optcapture
from optcapture import registry, replay


def _roundtrip(obj: object) -> object:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()))


def test_checkpoint_saved_and_loaded_mid_run_continues_like_eager() -> None:
    pair = make_pair(lambda p: torch.optim.AdamW(p, lr=0.01))
    for seed in range(3):
        step_both(pair, seed)
    saved_opt, saved_model = _roundtrip(pair.optimizer.state_dict()), _roundtrip(pair.model.state_dict())
    for seed in range(3, 5):
        step_both(pair, seed)  # diverge, then go back to the checkpoint on both sides
    eager_opt, eager_model = _roundtrip(pair.eager.state_dict()), _roundtrip(pair.eager_model.state_dict())
    del eager_opt, eager_model
    pair.model.load_state_dict(saved_model)
    pair.optimizer.load_state_dict(saved_opt)
    fresh = make_pair(lambda p: torch.optim.AdamW(p, lr=0.01))
    for seed in range(3):
        step_both(fresh, seed)
    pair.eager_model.load_state_dict(fresh.eager_model.state_dict())
    pair.eager.load_state_dict(fresh.eager.state_dict())
    for seed in range(3, 6):
        step_both(pair, seed)
    assert_matches_eager(pair)
    assert paths(pair.optimizer)[0] == "bucketed"


def test_state_dict_holds_plain_tensors_at_their_own_size() -> None:
    pair = make_pair(lambda p: torch.optim.Adam(p, lr=0.01))
    for seed in range(2):
        step_both(pair, seed)
    state = pair.optimizer.state_dict()["state"]
    for index, p in enumerate(pair.model.parameters()):
        assert state[index]["exp_avg"].untyped_storage().nbytes() == p.numel() * 4
        assert state[index]["step"].untyped_storage().nbytes() == 4


def test_default_zero_grad_backward_loop_matches_eager() -> None:
    torch.manual_seed(0)
    model = make_model()
    eager_model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    eager = torch.optim.Adam(eager_model.parameters(), lr=0.01)
    step = torch.compile(opt.step, backend="optcapture")
    data = torch.randn(8, 10)
    for _ in range(5):
        for m, o, s in ((model, opt, step), (eager_model, eager, eager.step)):
            o.zero_grad()
            m(data).square().mean().backward()
            s()
    torch.testing.assert_close(list(model.parameters()), list(eager_model.parameters()))
    assert [r.path for r in optcapture.explain(opt)] == ["bucketed"]


def test_add_param_group_after_capture() -> None:
    pair = make_pair(lambda p: torch.optim.Adam(p, lr=0.01))
    for seed in range(2):
        step_both(pair, seed)
    extra, extra_eager = torch.nn.Parameter(torch.ones(5)), torch.nn.Parameter(torch.ones(5))
    pair.optimizer.add_param_group({"params": [extra], "lr": 0.1})
    pair.eager.add_param_group({"params": [extra_eager], "lr": 0.1})
    for seed in range(2, 5):
        extra.grad = torch.full((5,), float(seed))
        extra_eager.grad = torch.full((5,), float(seed))
        step_both(pair, seed)
    assert_matches_eager(pair)
    torch.testing.assert_close(extra, extra_eager)
    assert paths(pair.optimizer)[-1] == "bucketed"


def test_param_data_replaced_by_the_user_is_noticed() -> None:
    pair = make_pair(lambda p: torch.optim.SGD(p, lr=0.1))
    for seed in range(2):
        step_both(pair, seed)
    with torch.no_grad():
        for m in (pair.model, pair.eager_model):
            m[0].weight.data = torch.full((10, 10), 0.5)
    for seed in range(2, 4):
        step_both(pair, seed)
    assert_matches_eager(pair)
    assert optcapture.stats()["rebuilds"] >= 1


def test_a_rebuilt_capture_lets_the_storage_it_replaced_go() -> None:
    # The replaced capture kept its flat buffers (a full copy of params and state) until the optimizer died.
    pair = make_pair(lambda p: torch.optim.Adam(p, lr=0.1))
    for seed in range(3):
        step_both(pair, seed)
    old = [weakref.ref(buffer) for flat in registry._prepared[pair.optimizer].groups.values()
           for role, buffer in flat.flats.items() if role.kind != "grad"]
    with torch.no_grad():
        for m in (pair.model, pair.eager_model):
            m[0].weight.data = torch.full((10, 10), 0.5)
    for seed in range(3, 5):
        step_both(pair, seed)
    assert optcapture.stats()["rebuilds"] == 1
    gc.collect()
    assert old and all(buffer() is None for buffer in old)
    assert_matches_eager(pair)


def test_nothing_captured_keeps_the_model_or_optimizer_alive() -> None:
    flat_buffers: list[weakref.ref[torch.Tensor]] = []

    def train_once() -> tuple[weakref.ref[torch.Tensor], weakref.ref[torch.optim.Optimizer]]:
        model = torch.nn.Linear(10, 10)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt = torch.optim.Adam(model.parameters(), lr=0.1)

        @torch.compile(backend="optcapture")
        def fn() -> None:
            opt.step()

        for _ in range(4):  # past warm-up: steady steps call the compiled step directly
            fn()
        assert [r.path for r in optcapture.explain(opt)] == ["bucketed"]
        for flat in registry._prepared[opt].groups.values():
            flat_buffers.extend(weakref.ref(buffer) for buffer in flat.flats.values())
        return weakref.ref(model.weight), weakref.ref(opt)

    gc.disable()
    try:
        weight, opt = train_once()
        assert weight() is None and opt() is None
    finally:
        gc.enable()
    # Nor does anything keep the flat storage: not the capture, not Dynamo's cache of the shadow step.
    gc.collect()
    assert flat_buffers and all(buffer() is None for buffer in flat_buffers)


SCALAR_STATE = {  # optimizers whose runs step a copy of per-param scalar state (step, mu_product, eta, mu)
    "AdamW": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=0.01),
    "ASGD": lambda p: torch.optim.ASGD(p, lr=0.01),
}


def _eager_step_on_both(pair: Any, seed: int, present: Any = lambda i: True) -> None:
    set_grads(pair, seed, present)
    pair.eager.step()
    pair.optimizer.step()  # the user's optimizer, stepped without the compiled step (e.g. by a library)


@pytest.mark.parametrize("name", sorted(SCALAR_STATE))
def test_an_eager_step_between_compiled_steps_is_noticed(name: str) -> None:
    # The runs step their own copy of the step counters: an eager opt.step() in between advanced the real
    # counters only, and the next compiled steps used the stale copy (bias corrections off by one step).
    pair = make_pair(SCALAR_STATE[name])
    for seed in range(3):
        step_both(pair, seed)
    _eager_step_on_both(pair, 3)
    for seed in range(4, 7):
        step_both(pair, seed)
    assert_matches_eager(pair)
    assert paths(pair.optimizer) == ["bucketed"]  # counters that moved together: no rebuild needed


def test_an_eager_step_over_some_params_splits_the_runs() -> None:
    # Counters that now differ within a run: the capture is rebuilt with runs of equal counters.
    pair = make_pair(SCALAR_STATE["AdamW"])
    for seed in range(3):
        step_both(pair, seed)
    _eager_step_on_both(pair, 3, present=lambda i: i % 2 == 0)
    for seed in range(4, 7):
        step_both(pair, seed)
    assert_matches_eager(pair)
    assert optcapture.stats()["rebuilds"] >= 1


def test_a_capture_rebuilt_after_lr_changed_stays_bucketed() -> None:
    # A rebuilt capture is proven against the graph Dynamo traced, which holds lr as a constant; after lr changed
    # (the capture reads it as a tensor: its guard is dropped, the graph is not traced again) the proof's shadow
    # held the new lr, so the rebuild failed and the optimizer stepped eagerly from then on.
    pair = make_pair(SCALAR_STATE["AdamW"])
    for seed in range(3):
        step_both(pair, seed)
    for optimizer in (pair.eager, pair.optimizer):
        optimizer.param_groups[0]["lr"] *= 0.5
    step_both(pair, 3)
    _eager_step_on_both(pair, 4, present=lambda i: i % 2 == 0)  # counters now differ within a run: a rebuild
    for seed in range(5, 8):
        step_both(pair, seed)
    assert_matches_eager(pair)
    assert optcapture.stats()["rebuilds"] >= 1
    assert set(paths(pair.optimizer)) == {"bucketed"}, paths(pair.optimizer)  # the capture, then its rebuild


def test_step_counters_reset_by_the_user_are_read_again() -> None:
    pair = make_pair(SCALAR_STATE["AdamW"])
    for seed in range(3):
        step_both(pair, seed)
    with torch.no_grad():
        for optimizer in (pair.eager, pair.optimizer):
            for state in optimizer.state.values():
                state["step"].zero_()
    for seed in range(3, 6):
        step_both(pair, seed)
    assert_matches_eager(pair)


@pytest.mark.parametrize("name", ["Adagrad", "NAdam"])
def test_steps_taken_by_a_per_tensor_capture_of_the_same_optimizer_are_noticed(name: str) -> None:
    # A param that is not dense (every other column of a larger tensor) cannot be bucketed: the steps where it has a
    # grad compile per tensor and advance the real step counters; the bucketed capture of the other steps must read
    # them again, not its stale copy.
    torch.manual_seed(0)
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(16)),
                                    torch.nn.Parameter(torch.randn(4, 4))])
    pair = make_pair(SCALAR_STATE[name], model=model)  # type: ignore[arg-type]
    third = list(pair.model.parameters())[2]
    third.data = torch.empty(4, 8)[:, ::2].copy_(third)  # after make_pair's deepcopy, which would make it dense
    for seed in range(6):
        step_both(pair, seed, present=lambda i, seed=seed: i != 2 or seed % 2 == 1)
    assert_matches_eager(pair)
    assert {"bucketed", "per-tensor"} <= set(paths(pair.optimizer)), paths(pair.optimizer)


@pytest.mark.parametrize("key", ["exp_avg", "step"])
def test_state_given_new_storage_by_the_user_is_noticed(key: str) -> None:
    # ``t.data = other`` moves a state tensor out of flat storage without touching its version counter.
    pair = make_pair(SCALAR_STATE["AdamW"])
    for seed in range(3):
        step_both(pair, seed)
    for optimizer in (pair.eager, pair.optimizer):
        for state in optimizer.state.values():
            state[key].data = torch.zeros_like(state[key])
    for seed in range(3, 6):
        step_both(pair, seed)
    assert_matches_eager(pair)


@pytest.mark.parametrize("key", ["lr", "betas"])
def test_a_tensor_hyperparameter_replaced_by_another_tensor_is_noticed(key: str) -> None:
    # The shadow reads a tensor the user gave (lr=torch.tensor(...)) as that very object. Writing into it is
    # seen; a group entry replaced by a new tensor passes Dynamo's guards (same metadata) and was ignored:
    # params 0.09 off eager's after one step (found by an adversarial run of user scenarios).
    pair = make_pair(lambda p: torch.optim.Adam(p, lr=torch.tensor(0.01),
                                                betas=(torch.tensor(0.9), torch.tensor(0.999))))
    for seed in range(3):
        step_both(pair, seed)
    for optimizer in (pair.eager, pair.optimizer):
        group = optimizer.param_groups[0]
        if key == "lr":
            group["lr"] = torch.tensor(0.1)
        else:
            group["betas"] = (torch.tensor(0.5), torch.tensor(0.99))
    for seed in range(3, 6):
        step_both(pair, seed)
    assert_matches_eager(pair)
    assert optcapture.stats()["rebuilds"] == 1
    assert paths(pair.optimizer) == ["bucketed", "bucketed"]


def _python_calls_of_a_steady_step(count: int) -> collections.Counter[tuple[str, str]]:
    """Python-level calls (``call`` and ``c_call`` events of ``sys.setprofile``) made inside the captured step during
    one steady step of the default loop (new grads every step). Work a C function does over a list makes no event."""
    params = [torch.nn.Parameter(torch.randn(8)) for _ in range(count)]
    opt = torch.optim.AdamW(params, lr=0.01)
    step = torch.compile(opt.step, backend="optcapture")

    def new_grads() -> None:
        for p in params:
            p.grad = torch.randn_like(p)

    for _ in range(3):
        new_grads()
        step()
    new_grads()
    calls: collections.Counter[tuple[str, str]] = collections.Counter()
    inside = [0]
    captured_step = replay.CapturedStep.__call__.__code__

    def profile(frame: types.FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code is captured_step:
            inside[0] += 1
        if inside[0] and event in ("call", "c_call"):
            # By function name: Inductor names its generated modules after their source.
            calls[(event, frame.f_code.co_name if event == "call" else getattr(arg, "__name__", "?"))] += 1
        if event == "return" and frame.f_code is captured_step:
            inside[0] -= 1

    sys.setprofile(profile)
    try:
        step()
    finally:
        sys.setprofile(None)
    assert paths(opt) == ["bucketed"]
    return calls


def test_the_python_work_of_a_step_does_not_grow_with_the_tensor_count() -> None:
    # What grows with the tensor count (reading addresses and version counters, copying grads) must run inside
    # single C-level calls: Python work per tensor is host time that grows with the model.
    few, many = _python_calls_of_a_steady_step(30), _python_calls_of_a_steady_step(300)
    assert sum(few.values()) > 20  # the step itself was seen
    assert many == few, sorted((many - few).items()) + sorted((few - many).items())


class _EmbeddingModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(10, 4)
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.embedding(tokens))


@pytest.mark.parametrize("name", ["Adam", "AdamW", "AdamW-amsgrad", "AdamW-tensor-lr"])
def test_a_warmup_from_lr_zero_writes_no_nan_where_grads_are_always_zero(name: str) -> None:
    # get_linear_schedule_with_warmup starts at lr 0.0; Adam's capturable form divides by lr there: 0/0 (NaN) in
    # the embedding rows no token used (pytorch#126514, stock torch.compile too). Those steps run eagerly.
    amsgrad = name.endswith("amsgrad")
    cls = getattr(torch.optim, name.split("-")[0])
    pair = make_pair(lambda p: cls(p, lr=torch.tensor(0.01) if name.endswith("tensor-lr") else 0.01, amsgrad=amsgrad),
                     scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, s / 2)),
                     model=_EmbeddingModel())
    before = optcapture.stats()["steps"]
    warmup_from_zero(pair, 5)
    assert paths(pair.optimizer) == ["bucketed"]  # one capture: the steps after lr 0.0 replay it
    assert optcapture.stats()["steps"] - before == 5


def test_a_param_group_held_at_lr_zero_steps_eagerly_and_exactly() -> None:
    # A group frozen by lr 0.0 while another trains: every such step is the optimizer's own.
    def two_groups(params: Any) -> torch.optim.Optimizer:
        params = list(params)
        return torch.optim.AdamW([{"params": params[:1], "lr": 0.0}, {"params": params[1:]}], lr=0.01)

    pair = make_pair(two_groups, scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0),
                     model=_EmbeddingModel())
    warmup_from_zero(pair, 4)
    assert paths(pair.optimizer) == ["bucketed"]


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_a_capturable_flag_dynamo_set_still_steps_eagerly_at_lr_zero(name: str) -> None:
    # Tracing the first step of an optimizer whose params are all on a GPU sets capturable=True in its own param
    # groups (torch/_dynamo/variables/optimizer.py, _set_capturable). The lr-0.0 step must still be the user's
    # eager one (capturable unset): an H100 run wrote NaN from the first step. Set here as Dynamo sets it there.
    cls = getattr(torch.optim, name)
    pair = make_pair(lambda p: cls(p, lr=0.01),
                     scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, s / 2)),
                     model=_EmbeddingModel())
    pair.optimizer.param_groups[0]["capturable"] = True
    warmup_from_zero(pair, 4)
    assert paths(pair.optimizer) == ["bucketed"]
    assert pair.optimizer.param_groups[0]["capturable"] is True  # set again after each eager step


def test_a_capturable_adam_on_the_cpu_steps_at_lr_zero_as_captured() -> None:
    # Eager Adam refuses capturable=True on CPU tensors: its lr-0.0 steps stay the capture's (the same form eager
    # would run), not the eager step, which raised at every such call.
    model = _EmbeddingModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, capturable=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.0 if s == 2 else 1.0)
    step = torch.compile(optimizer.step, backend="optcapture")
    for _ in range(4):
        model(torch.tensor([1, 2, 3])).pow(2).sum().backward()
        step()
        scheduler.step()
        optimizer.zero_grad()
    assert paths(optimizer) == ["bucketed"]
    assert all(int(state["step"]) == 4 for state in optimizer.state.values())
