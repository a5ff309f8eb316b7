"""Which compiled graphs may be replayed from CUDA graphs recorded per set of input addresses, and when a set is
recorded and replayed (with a stand-in for CUDA graphs on the CPU; the real ones run on the GPU:
``tests/test_training_tail.py``'s ``cuda`` case, ``tests/gpu/test_cuda.py``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch

import optcapture
from optcapture.replay.address_graphs import AddressGraphs, unfit_for_recording


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


class _FakeGraph:
    """Stands in for ``torch.cuda.CUDAGraph`` on the CPU: what the compiled graph does while "recording" is kept, and
    done at each replay (the test's compiled graph defers its work while recording, as kernels do under capture)."""

    recording: list[_FakeGraph] = []

    def __init__(self) -> None:
        self.work: list[Callable[[], None]] = []

    def replay(self) -> None:
        for work in self.work:
            work()


@contextlib.contextmanager
def _fake_recording(graph: _FakeGraph, **kwargs: object) -> Iterator[None]:
    _FakeGraph.recording.append(graph)
    try:
        yield
    finally:
        _FakeGraph.recording.pop()


def _add_into(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The test's compiled graph: ``y += x`` and returns ``y.sum()`` in a buffer of its own."""
    out = torch.empty(())

    def kernel() -> None:  # writes memory, as a kernel does: no version counter moves
        y.data.add_(x)
        out.copy_(y.sum())

    if _FakeGraph.recording:
        _FakeGraph.recording[-1].work.append(kernel)
    else:
        kernel()
        torch.autograd.graph.increment_version(y)  # as AOTAutograd's wrapper does for an input it writes
    return out


@pytest.fixture
def fake_cuda_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", _fake_recording)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)


@pytest.mark.usefixtures("fake_cuda_graphs")
def test_an_address_set_is_recorded_when_seen_again_and_replayed_with_outputs_copied_and_versions_bumped() -> None:
    graphs = AddressGraphs(_add_into, "test")
    x, y = torch.ones(4), torch.zeros(4)
    assert graphs(x, y).item() == 4.0  # run as compiled, finds that it writes y
    assert optcapture.stats()["address_graphs_recorded"] == 0
    first = graphs(x, y)  # seen before: recorded, then replayed once
    version = y._version
    second = graphs(x, y)
    assert (first.item(), second.item()) == (8.0, 12.0)  # each replay's output is its own copy
    assert torch.equal(y, torch.full((4,), 3.0)) and y._version == version + 1
    stats = optcapture.stats()
    assert (stats["address_graphs_recorded"], stats["address_graph_replays"]) == (1, 2)
    elsewhere = torch.zeros(4)
    assert graphs(x, elsewhere).item() == 4.0 and torch.equal(y, torch.full((4,), 3.0))  # new addresses: as compiled
    assert optcapture.stats()["address_graph_replays"] == 2


@pytest.mark.usefixtures("fake_cuda_graphs")
def test_a_graph_that_returns_an_input_is_never_replayed() -> None:
    def returns_y(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _add_into(x, y)
        return y

    graphs = AddressGraphs(returns_y, "test")
    x, y = torch.ones(2), torch.zeros(2)
    for _ in range(4):
        assert graphs(x, y) is y
    assert torch.equal(y, torch.full((2,), 4.0))
    assert graphs.unfit == "an output is an input or a view of one"
    assert optcapture.stats()["address_graph_replays"] == 0
