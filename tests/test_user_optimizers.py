"""Optimizers users bring, one pattern of third-party libraries each (tests/user_optimizers.py): the same params
and state as eager over several steps, and the path each takes."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import pytest
import torch
from helpers import assert_matches_eager, make_pair, paths, step_both
from user_optimizers import USER_OPTIMIZERS, GroupStepAdam

import optcapture

# The last path each takes once its first step (which creates its state) ran. Per tensor: the step splits at
# ``.item()`` (a graph break: Dynamo compiles the pieces, none of them the whole step), or keeps a Python float in
# per-param state that Inductor can only specialize.
LAST_PATH = {"GroupStepAdam": "bucketed", "GlobalCounterSGD": "per-tensor", "GlobalTensorCounterSGD": "bucketed",
             "ConjAdam": "bucketed", "DataWritingLion": "bucketed", "ModuleFunctionSGD": "bucketed",
             "FloatStateAdam": "per-tensor", "ConstantBuildingAdam": "bucketed", "OneElementStateAdam": "bucketed",
             "OutDivAdaBound": "bucketed", "RebindingAdam": "bucketed"}


@pytest.mark.parametrize("name", sorted(USER_OPTIMIZERS))
def test_user_optimizer_matches_eager_and_takes_its_path(name: str) -> None:
    pair = make_pair(lambda p: USER_OPTIMIZERS[name](p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for seed in range(6):
            step_both(pair, seed)
            assert_matches_eager(pair)
    assert paths(pair.optimizer)[0] == "first-step"  # the first step creates the state
    assert paths(pair.optimizer)[-1] == LAST_PATH[name]


def test_python_int_step_counter_in_param_groups_is_exact_and_followed() -> None:
    # The step counts ``group["step"] += 1`` as a Python int and computes bias corrections from it: a count one too
    # high (the shadow's own trace call had counted too) was off by 1.4e-4 after two steps.
    def two_groups(params: Iterable[torch.Tensor]) -> GroupStepAdam:
        params = list(params)
        return GroupStepAdam([{"params": params[:2]}, {"params": params[2:], "lr": 1e-2}])

    pair = make_pair(two_groups, scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5))
    for seed in range(8):
        step_both(pair, seed)
        assert_matches_eager(pair)
        assert [g["step"] for g in pair.optimizer.param_groups] == [seed + 1, seed + 1]
    reports = optcapture.explain(pair.optimizer)
    # First step (state), then the count held as a constant, then read as an input: never again after that.
    assert [r.path for r in reports] == ["first-step", "bucketed", "bucketed"]
    assert optcapture.stats()["steps"] == 7


def test_string_key_in_optimizer_state_does_not_crash() -> None:
    # pytorch_optimizer's MADGRAD keeps ``self.state["k"]``: discovery raised AttributeError ('str' has no 'dim').
    from user_optimizers import GlobalTensorCounterSGD

    pair = make_pair(lambda p: GlobalTensorCounterSGD(p))
    for seed in range(3):
        step_both(pair, seed)
    assert_matches_eager(pair)
    assert torch.equal(pair.optimizer.state["k"], pair.eager.state["k"])
    roles = {role.kind for role in optcapture.explain(pair.optimizer)[-1].roles}
    assert "global_state" in roles


def test_a_step_dynamo_recompiles_at_every_step_is_said_and_stays_exact() -> None:
    # math.pow(beta, group["step"]): Dynamo specializes the count, so every step compiles again (with any backend)
    # until Dynamo's recompile limit, after which it runs uncompiled without calling the backend: said two compiles
    # before the limit (8).
    from user_optimizers import MathPowAdam

    pair = make_pair(lambda p: MathPowAdam(p))
    with pytest.warns(RuntimeWarning, match=r"Dynamo compiled the step of MathPowAdam 6 times.*recompile_limit"):
        for seed in range(7):
            step_both(pair, seed)
            assert_matches_eager(pair)


@pytest.mark.parametrize("name", ["GroupStepAdam", "ConjAdam", "DataWritingLion"])
def test_a_checkpoint_loaded_into_a_user_optimizer_is_stepped_not_its_old_storage(name: str) -> None:
    # Dynamo guards a user optimizer's state tensors by shape and dtype, not identity: after load_state_dict it passes
    # the capture new tensors, which the capture must notice (it stepped its old flat storage, silently).
    import copy

    pair = make_pair(lambda p: USER_OPTIMIZERS[name](p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for seed in range(3):
            step_both(pair, seed)
        pair.optimizer.load_state_dict(copy.deepcopy(pair.optimizer.state_dict()))
        for seed in range(3, 6):
            step_both(pair, seed)
            assert_matches_eager(pair)
    assert paths(pair.optimizer)[-1] == "bucketed"


def test_a_one_element_state_tensor_is_a_number_per_param_and_keeps_its_shape() -> None:
    # pytorch_optimizer's QHAdam keeps ``beta1_weight`` as a (1,) tensor per param: it was taken for state of another
    # shape than its param's, and the step ran per tensor. Grads that come and go make the numbers differ by param.
    from user_optimizers import OneElementStateAdam

    pair = make_pair(lambda p: OneElementStateAdam(p))
    for seed in range(6):
        step_both(pair, seed, present=lambda i, seed=seed: i % 2 == 0 or seed % 3 != 1)
        assert_matches_eager(pair)
    weights = [pair.optimizer.state[p]["weight"] for p in pair.model.parameters()]
    assert all(w.shape == (1,) for w in weights)
    assert len({float(w) for w in weights}) == 2  # params stepped 6 and 4 times: two runs
    assert paths(pair.optimizer)[-1] == "bucketed"


def test_state_that_is_one_number_for_some_params_and_a_tensor_for_others_is_not_bucketed() -> None:
    class MixedStateSGD(torch.optim.Optimizer):
        def __init__(self, params: Iterable[torch.Tensor]) -> None:
            super().__init__(params, dict(lr=0.1))

        @torch.no_grad()
        def step(self, closure: object = None) -> None:
            for group in self.param_groups:
                for i, p in enumerate(group["params"]):
                    st = self.state[p]
                    if "buf" not in st:  # the first param keeps one number, the others a tensor of their shape
                        st["buf"] = torch.zeros(1) if i == 0 else torch.zeros_like(p)
                    st["buf"].mul_(0.9).add_(p.grad.mean() if i == 0 else p.grad)
                    p.sub_(st["buf"], alpha=group["lr"])

    pair = make_pair(lambda p: MixedStateSGD(p))
    for seed in range(4):
        step_both(pair, seed)
        assert_matches_eager(pair)
    assert "bucketed" not in paths(pair.optimizer)
