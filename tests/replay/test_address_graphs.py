"""Which compiled graphs may be replayed from CUDA graphs recorded per set of input addresses, and when a set is
recorded and replayed (with a stand-in for CUDA graphs on the CPU; the real ones run on the GPU:
``tests/test_training_tail.py``'s ``cuda`` case, ``tests/gpu/test_cuda.py``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

import optcapture
from optcapture.replay import address_graphs
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


def _fake_capture(graph: _FakeGraph, compiled: Callable[..., object], args: Sequence[object], stream: None) -> object:
    _FakeGraph.recording.append(graph)
    try:
        return compiled(*args)
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
    monkeypatch.setattr(address_graphs, "_captured", _fake_capture)
    monkeypatch.setattr(AddressGraphs, "_side_stream", lambda self: None)
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
    counts = (stats["address_graphs_recorded"], stats["address_graph_replays"], stats["address_graph_misses"])
    assert counts == (1, 2, 1)


@pytest.mark.usefixtures("fake_cuda_graphs")
def test_inputs_that_move_are_copied_into_a_staged_graph_and_the_ones_it_writes_copied_back() -> None:
    # A loop that keeps each returned norm gets its grads (y) back elsewhere at every call: one graph recorded over
    # copies of them serves every such call; x, which stays where it is, is read in place.
    graphs = AddressGraphs(_add_into, "test")
    x = torch.ones(4)
    assert graphs(x, torch.zeros(4)).item() == 4.0  # warm-up, run as compiled
    moved = [torch.full((4,), float(i)) for i in range(3)]
    versions = [t._version for t in moved]
    outputs = [graphs(x, y) for y in moved]
    assert [o.item() for o in outputs] == [4.0, 8.0, 12.0]  # each its own copy, of its own call
    for i, y in enumerate(moved):
        assert torch.equal(y, torch.full((4,), i + 1.0)) and y._version == versions[i] + 1  # written back, bumped
    stats = optcapture.stats()
    counts = {k: stats[k] for k in ("address_graphs_recorded", "address_graph_staged", "address_graph_misses")}
    assert counts == {"address_graphs_recorded": 1, "address_graph_staged": 3, "address_graph_misses": 1}
    graphs.staged.buffers[0].fill_(100.0)  # type: ignore[union-attr] - the next call copies its own y in
    other_x, y = torch.full((4,), 2.0), torch.zeros(4)
    assert graphs(other_x, y).item() == 8.0 and torch.equal(y, torch.full((4,), 2.0))  # x moved too: staged anew
    assert graphs.staged is not None and graphs.staged.moving == [0, 1]
    assert optcapture.stats()["address_graphs_recorded"] == 2


@pytest.mark.usefixtures("fake_cuda_graphs")
def test_grads_that_cycle_through_more_address_sets_than_are_kept_stop_being_recorded() -> None:
    # Each recording costs milliseconds: a loop cycling through 6 sets of grads (more than the 4 kept) would record
    # at nearly every call; once the recordings are spent, calls at sets not kept replay the staged graph.
    graphs = AddressGraphs(_add_into, "test")
    x = torch.ones(4)
    cycle = [torch.zeros(4) for _ in range(6)]
    for _ in range(8):
        for y in cycle:
            graphs(x, y)
    for y in cycle:  # 8 calls each, each adding x (1.0)
        assert torch.equal(y, torch.full((4,), 8.0))
    stats = optcapture.stats()
    recordings = address_graphs._RECORDINGS + 1  # the exact ones, and the staged one
    assert stats["address_graphs_recorded"] == recordings, stats
    assert stats["address_graph_replays"] == 48 - 1 and stats["address_graph_misses"] == 1, stats


@pytest.mark.usefixtures("fake_cuda_graphs")
def test_the_address_set_replayed_least_recently_is_the_one_dropped() -> None:
    # A loop's own grads (hot) replayed between sets seen twice each and then never again (an eval batch, a resized
    # last batch): the hot set stays kept however many others were recorded after it, and is never recorded again.
    graphs = AddressGraphs(_add_into, "test")
    x, hot = torch.ones(4), torch.zeros(4)
    graphs(x, hot)
    graphs(x, hot)  # recorded
    others = [torch.zeros(4) for _ in range(address_graphs.KNOWN_ADDRESS_SETS)]
    for y in others:
        graphs(x, y)
        graphs(x, y)  # recorded
        graphs(x, hot)  # replayed
    assert graphs.recordings == 1 + len(others)
    assert (hot.data_ptr() in {key[1] for key in graphs.graphs}) and torch.equal(hot, torch.full((4,), 6.0))
    assert len(graphs.graphs) == address_graphs.KNOWN_ADDRESS_SETS


@pytest.mark.usefixtures("fake_cuda_graphs")
@pytest.mark.parametrize("why", ["shares memory", "too large"])
def test_inputs_that_share_memory_or_are_large_are_not_staged(why: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if why == "too large":
        monkeypatch.setattr(address_graphs, "_LARGEST_STAGED", 8)
    graphs = AddressGraphs(_add_into, "test")
    x = torch.ones(4)
    graphs(x, torch.zeros(4))
    both = torch.zeros(2, 4)
    if why == "shares memory":  # y is a view of the memory x lies in: a copy of y would hide the write from x
        x = both[0].fill_(1.0)
    assert graphs(x, both[1]).item() == 4.0 and torch.equal(both[1], torch.ones(4))  # as compiled
    stats = optcapture.stats()
    assert (stats["address_graph_staged"], stats["address_graph_misses"], graphs.staged) == (0, 2, None)


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
