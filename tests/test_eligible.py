"""Which params flat storage holds: dense ones in any element order (channels_last), each beside state and grads of
its own order; the rest step per tensor with the reason."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import NormalizedSGD, assert_matches_eager, make_pair, paths, step_both
from user_optimizers import BufferMomentum

import optcapture
from optcapture.eligible import is_dense


@pytest.mark.parametrize(("make", "dense"), [
    (lambda: torch.randn(2, 3, 4, 5), True),
    (lambda: torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last), True),
    (lambda: torch.randn(2, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d), True),
    (lambda: torch.randn(4, 6).t(), True),
    (lambda: torch.randn(4, 6).permute(1, 0).unsqueeze(0), True),  # a size-1 dim of any stride
    (lambda: torch.randn(4, 12)[:, ::2], False),  # gaps
    (lambda: torch.randn(4, 12)[:, :6], False),
    (lambda: torch.randn(1, 6).expand(4, 6), False),  # overlap
    (lambda: torch.empty_strided((2, 2), (1, 1)), False),
], ids=["contiguous", "channels_last", "channels_last_3d", "transposed", "permuted-unsqueezed", "every-other",
        "sliced", "expanded", "overlapping"])
def test_a_tensor_is_dense_when_its_elements_fill_one_block_in_some_order(make: Callable[[], torch.Tensor],
                                                                          dense: bool) -> None:
    assert is_dense(make()) is dense


def _conv_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # No BatchNorm after a conv: it cancels the conv's bias, whose grads are then rounding noise that Adam scales up.
    # A 1 x 1 conv's weight in channels_last is contiguous, but strided otherwise on its dims of size 1, and Dynamo
    # guards those strides of it and of its state: they must stay as they are (the step failed a guard on its own
    # frame, AssertionError, with a user's zeros_like state).
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Tanh(), torch.nn.Conv2d(8, 8, 1),
                               torch.nn.Conv2d(8, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 2 * 2, 3))


def _train_both(pair: Any, steps: int, first_seed: int = 0) -> None:
    """Grads from a real backward, as autograd lays them out (its layout contract: a param's own strides)."""
    for seed in range(first_seed, first_seed + steps):
        data = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
        for model, step in ((pair.eager_model, pair.eager.step), (pair.model, pair.step)):
            model.zero_grad()
            model(data.contiguous(memory_format=torch.channels_last)).square().sum().backward()
            step()


class ContiguousStateMomentum(BufferMomentum):
    """Momentum kept in a contiguous buffer whatever its param's layout (``torch.zeros(p.shape)``)."""

    def new_buffer(self, p: torch.Tensor) -> torch.Tensor:
        return torch.zeros(p.shape, dtype=p.dtype)


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "UserMomentum": BufferMomentum,  # state from ``zeros_like(p)``, which keeps the param's strides
    "AdamW": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "SGD-momentum": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.01),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_channels_last_model_is_bucketed_and_steps_like_eager(name: str) -> None:
    model = _conv_model().to(memory_format=torch.channels_last)
    conv = model[0].weight
    assert not conv.is_contiguous() and conv.is_contiguous(memory_format=torch.channels_last)
    pair = make_pair(OPTIMIZERS[name], model=model)
    _train_both(pair, 4)
    assert_matches_eager(pair)
    taken = paths(pair.optimizer)
    assert taken[-1] == "bucketed" and taken.count("bucketed") == 1, taken
    (bucket,) = optcapture.explain(pair.optimizer)[-1].buckets
    assert f": {len(list(model.parameters()))} tensors," in bucket, bucket
    # Params and the state made for them keep their strides: the user's tensors look as they did.
    for captured, original in zip(pair.model.parameters(), model.parameters(), strict=True):
        assert captured.stride() == original.stride()
        for value in pair.optimizer.state[captured].values():
            if value.dim() == captured.dim():
                assert value.stride() == captured.stride()
    captured_conv = pair.model[0].weight
    for value in pair.optimizer.state[captured_conv].values():
        if value.dim() == 4:
            assert value.is_contiguous(memory_format=torch.channels_last) and not value.is_contiguous()
    # Grads of another order than their param's (a user's contiguous grads) are copied into the param's order.
    for seed in range(4, 6):
        step_both(pair, seed)
    assert_matches_eager(pair)
    # (A user optimizer's frame guards its grads' strides: Dynamo compiles it again for them, as stock does.)
    assert paths(pair.optimizer)[-1] == "bucketed", paths(pair.optimizer)


def test_a_transposed_param_that_owns_its_storage_is_bucketed_and_steps_like_eager() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 6)
    model.weight = torch.nn.Parameter(torch.randn(4, 6).t())  # (6, 4), strides (1, 6)
    assert not model.weight.is_contiguous()
    pair = make_pair(lambda p: torch.optim.Adam(p, lr=0.1), model=model)
    for seed in range(4):
        step_both(pair, seed)
    assert_matches_eager(pair)
    assert paths(pair.optimizer)[-1] == "bucketed", optcapture.explain(pair.optimizer)
    assert pair.model.weight.stride() == (1, 6)


def test_state_in_another_order_than_its_param_is_not_bucketed_and_the_reason_names_the_strides() -> None:
    pair = make_pair(ContiguousStateMomentum, model=_conv_model().to(memory_format=torch.channels_last))
    _train_both(pair, 4)
    assert_matches_eager(pair)
    reports = optcapture.explain(pair.optimizer)
    assert reports[-1].path == "per-tensor", reports
    assert any("against its param's" in reason and "another element order" in reason
               for report in reports for reason in report.reasons), reports


def test_a_lane_local_update_of_channels_last_params_steps_per_tensor_with_the_reason() -> None:
    # NormalizedSGD divides by each param's norm: batched as [k, *shape] views, which only contiguous params give.
    pair = make_pair(NormalizedSGD, model=_conv_model().to(memory_format=torch.channels_last))
    _train_both(pair, 3)
    assert_matches_eager(pair)
    reports = optcapture.explain(pair.optimizer)
    assert any("only when contiguous" in reason for report in reports for reason in report.reasons), reports


def test_a_model_turned_channels_last_after_the_capture_steps_per_tensor_with_the_reason() -> None:
    # ``model.to(memory_format=torch.channels_last)`` gives the params new storage in another order; their state keeps
    # the old one, so the capture cannot be rebuilt: the traced graph steps them per tensor, compiled for them as
    # they are now (it stepped eagerly for good before).
    pair = make_pair(lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1), model=_conv_model())
    _train_both(pair, 3)
    assert paths(pair.optimizer) == ["bucketed"]
    for model in (pair.eager_model, pair.model):
        model.to(memory_format=torch.channels_last)
    _train_both(pair, 3, first_seed=3)
    assert_matches_eager(pair)
    report = optcapture.explain(pair.optimizer)[-1]
    assert report.path == "per-tensor" and any("another element order" in r for r in report.reasons), report
