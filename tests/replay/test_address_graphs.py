"""Which compiled graphs may be replayed from CUDA graphs recorded per set of input addresses (the replays
themselves run on the GPU: ``tests/test_training_tail.py``, the ``cuda`` case)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from optcapture.replay.address_graphs import unfit_for_recording


def _graph(fn: Callable[..., object], *inputs: torch.Tensor) -> torch.fx.GraphModule:
    graphs: list[torch.fx.GraphModule] = []

    def keep(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., object]:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=keep, fullgraph=True)(*inputs)
    assert len(graphs) == 1
    return graphs[0]


def _clip(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.utils.clip_grad_norm_(grads, 1.0)


@pytest.mark.parametrize(("fn", "reason"), [
    (lambda x: torch.nn.functional.dropout(x, 0.5, training=True), "random numbers (dropout)"),
    (lambda x: x + torch.rand_like(x), "random numbers (rand_like)"),
    (lambda x: x.nonzero(), "on the host (nonzero)"),
])
def test_a_graph_that_draws_random_numbers_or_reads_on_the_host_is_not_recorded(fn: Callable[..., object],
                                                                                  reason: str) -> None:
    found = unfit_for_recording(_graph(fn, torch.ones(4)), [torch.ones(4)])
    assert found is not None and reason in found, found


def test_a_clip_graph_is_refused_only_for_its_cpu_inputs() -> None:
    grads = [torch.ones(3), torch.ones(2, 2)]
    gm = _graph(lambda a, b: _clip([a, b]), *grads)
    assert unfit_for_recording(gm, grads) == "its inputs are not all on one CUDA device"
    assert unfit_for_recording(gm, [*grads, 2]) == "an input is a int, not a plain tensor"  # type: ignore[list-item]
