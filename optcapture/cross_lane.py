"""Stage 3, batched lanes across params: steps whose update reads a value reduced over every param (a global grad
norm: ``vector_norm(stack([vector_norm(g) for g in grads]))``, timm's and pytorch_optimizer's LAMB, LARS, Fromage).

:mod:`optcapture.lanes` records ``torch.stack`` of one value of each param as a cross-lane op, and the shared values
computed from its result as crossed. Such a step runs in three phases: (A) for each batch of same-shape params, the
part of its members' update up to the last cross-lane op that reads them, under vmap, giving the ``[k]`` values
it exports to each (and the values its later part reads); (B) once, each cross-lane op's result rebuilt from those
values (a concatenation in batch order, put in the graph's list order by a static index: the same values as eager's
stack), and the shared values the graph computes from it, as the graph computes them; (C) for each batch, the rest
of its members' update, with the values of (B) as shared inputs. The kernels still follow the batches, not the tensors.

Invariant: a lane reads no crossed value before the last cross-lane op it feeds, and each op's list holds each of
its lanes exactly once (checked by the analysis), so (A), (B), (C) in that order run, for every lane, its own
ops in graph order and every shared op once in graph order; the lanes of a batch have equal programs, export events
included, so they export to the same ops at the same points; no crossed value is written in place after a lane read
it. Anything else refuses with the reason, before anything runs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.fx import GraphModule, Node

from optcapture import lane_hypers
from optcapture.discovery import BucketKey, StepGraph
from optcapture.errors import CaptureError
from optcapture.lane_batches import BatchedStep, InputTable, LaneBatch, Where, shared_writes
from optcapture.lane_programs import LaneInput, Window, lane_program, writes_input
from optcapture.lanes import LaneId, called_name, in_place
from optcapture.preparation import FlatGroup, PreparedOptimizer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Phase:
    """One vmapped program of a batch, and where each of its inputs comes from."""

    call: Callable[..., Any]
    where: list[Where | None]
    inputs: list[LaneInput]
    carried_from: int | None = None
    """The index (in the batch order of phase A) of the program whose outputs after the first are its
    ``carried`` inputs, in order."""


def _export_points(step: StepGraph) -> dict[LaneId, tuple[str, ...]]:
    """The cross-lane ops each lane feeds, in graph order (pytorch_optimizer's LARS stacks the norms of the params
    and those of the grads: two)."""
    report = step.lane_report
    assert report is not None
    export_of: dict[LaneId, tuple[str, ...]] = {}
    for name, lanes in report.cross_lanes.items():
        for lane in lanes:
            export_of[lane] = (*export_of.get(lane, ()), name)
    return export_of


def _item(gm: GraphModule, cross: str, lane: LaneId, lanes: tuple[LaneId, ...]) -> str:
    """The graph node of ``lane``'s value in the list of cross-lane node ``cross``."""
    node = next(n for n in gm.graph.nodes if n.name == cross)
    items = node.args[0] if node.args else node.kwargs["tensors"]
    if isinstance(items, Node):  # a foreach result: its single op for ``lane`` in the lane's program
        return str(items.name)
    item = items[lanes.index(lane)]
    assert isinstance(item, Node)
    return str(item.name)


def _check_no_write_after_read(gm: GraphModule, step: StepGraph) -> None:
    """A crossed value written in place after a lane read it: (B) would write it before every lane reads it; any
    other shared in-place write: see :func:`optcapture.lane_batches.shared_writes`."""
    report = step.lane_report
    assert report is not None
    first_lane_read: dict[Node, int] = {}
    for i, node in enumerate(gm.graph.nodes):
        if report.lane_of.get(node.name) is not None or node.name in report.foreach_lanes:
            for arg in node.all_input_nodes:
                if arg.name in report.crossed:
                    first_lane_read.setdefault(arg, i)
        name = called_name(node)
        if node.name in report.crossed and in_place(name) and node.args and isinstance(node.args[0], Node) \
                and node.args[0] in first_lane_read:
            raise CaptureError(f"{node.name} writes a value shared by all params in place after a param's update "
                               "read it")


def build_step(step: StepGraph, gm: GraphModule, example_inputs: list[Any], flats: dict[BucketKey, FlatGroup],
               batches: list[LaneBatch], prepared: PreparedOptimizer) -> BatchedStep:
    """The program that steps every batch in the three phases of this module."""
    report = step.lane_report
    assert report is not None and report.cross_lanes
    nodes = list(gm.graph.nodes)
    positions = {node.name: i for i, node in enumerate(nodes)}
    export_of = _export_points(step)
    _check_no_write_after_read(gm, step)
    table = InputTable(step, prepared)
    write_once = shared_writes(gm, example_inputs, step, table, batches[0].key.device, frozenset(report.crossed))
    exporters: list[tuple[tuple[str, ...], _Phase, tuple[LaneId, ...]]] = []
    finishers: list[_Phase] = []
    writes_grads = False
    for batch in batches:
        flat = flats[batch.key]
        members = tuple((batch.key.group, flat.param_indices[j]) for j in batch.positions)
        lane = members[0]
        crosses = export_of.get(lane, ())
        if any(export_of.get(m, ()) != crosses for m in members):
            raise CaptureError(f"params of the batch of {lane} feed different ops across params")
        # Phase (A) runs the lane up to the last cross-lane op it feeds; every op before it reads no crossed value.
        after = max((positions[cross] for cross in crosses), default=-1)
        program, inputs = lane_program(gm, example_inputs, step, lane, Window(after=after))
        writes_grads |= writes_input(program, "grad", inputs)
        call, where = table.batched(program, inputs, flat, batch)
        finisher = _Phase(call, where, inputs)
        if crosses:
            carried = tuple(i.key for i in inputs if i.role == "carried" and i.key is not None)
            items = tuple(_item(gm, cross, lane, report.cross_lanes[cross]) for cross in crosses)
            program, inputs = lane_program(gm, example_inputs, step, lane,
                                           Window(upto=after, outputs=(*items, *carried)))
            read = [i.key for i in inputs if i.role == "crossed"]
            if read:
                raise CaptureError(f"the update of param {lane} reads {read[0]}, computed across params, before it "
                                   f"feeds {', '.join(crosses)} across params")
            writes_grads |= writes_input(program, "grad", inputs)
            call, where = table.batched(program, inputs, flat, batch)
            finisher.carried_from = len(exporters)
            exporters.append((crosses, _Phase(call, where, inputs), members))
        finishers.append(finisher)

    # (B): each cross-lane result from the exported [k] values, then the crossed values the finishers read.
    read_by_finishers = tuple(dict.fromkeys(i.key for f in finishers for i in f.inputs
                                            if i.role == "crossed" and i.key is not None))
    shared_program, shared_inputs = lane_program(gm, example_inputs, step, None, Window(outputs=read_by_finishers))
    device = batches[0].key.device
    shared_where: list[tuple[str, int | str]] = []  # ("input", index into the table) or ("stacked", cross name)
    numbers: list[Node] = []
    for node, shared_input in zip([n for n in shared_program.graph.nodes if n.op == "placeholder"], shared_inputs,
                                  strict=True):
        if shared_input.role == "stacked":
            assert shared_input.key is not None
            shared_where.append(("stacked", shared_input.key))
        elif shared_input.shared is not None:
            index, number = table.shared(shared_input, device)
            if number:
                numbers.append(node)
            shared_where.append(("input", index))
        else:
            raise CaptureError(f"the values shared by all params read {shared_input.role} {shared_input.key}")
    if numbers:
        lane_hypers.numbers_as_tensors(shared_program, numbers)
    orders = _orders(report.cross_lanes, exporters, device, table.inputs)
    log.info("batched lanes across params: %d batch(es), %d op(s) across params (%s)", len(batches),
             len(report.cross_lanes), ", ".join(report.cross_lanes))

    def step_batches(*tensors: torch.Tensor) -> None:
        if write_once is not None:
            write_once(*tensors)
        exported: dict[str, list[torch.Tensor]] = {name: [] for name in report.cross_lanes}
        carried: list[tuple[torch.Tensor, ...]] = []
        for crosses, phase, _ in exporters:
            outputs = phase.call(*(table.read(tensors, w) for w in phase.where if w is not None))
            for cross, item in zip(crosses, outputs, strict=False):
                exported[cross].append(item)
            carried.append(tuple(outputs[len(crosses):]))
        stacked = {name: _stacked(values, _order(tensors, orders[name])) for name, values in exported.items()}
        shared = shared_program(*(tensors[int(at)] if kind == "input" else stacked[str(at)]
                                  for kind, at in shared_where)) if read_by_finishers else ()
        crossed = dict(zip(read_by_finishers, shared, strict=True))
        for phase in finishers:
            own = iter(carried[phase.carried_from]) if phase.carried_from is not None else iter(())
            args = []
            for w, lane_input in zip(phase.where, phase.inputs, strict=True):
                if w is not None:
                    args.append(table.read(tensors, w))
                elif lane_input.role == "crossed":
                    assert lane_input.key is not None
                    args.append(crossed[lane_input.key])
                else:
                    args.append(next(own))
            phase.call(*args)

    return BatchedStep(step_batches, table.inputs, writes_grads, table.device_hypers)


def _orders(cross_lanes: Mapping[str, tuple[LaneId, ...]],
            exporters: list[tuple[tuple[str, ...], _Phase, tuple[LaneId, ...]]],
            device: torch.device, inputs: list[torch.Tensor]) -> dict[str, int | None]:
    """Per cross-lane op, the input (appended to ``inputs``) holding the index that puts the concatenated exports
    (batch order) in its list's order; None when they are in it already."""
    orders: dict[str, int | None] = {}
    for name, lanes in cross_lanes.items():
        concatenated = [lane for crosses, _, members in exporters if name in crosses for lane in members]
        if sorted(concatenated) != sorted(lanes):
            raise CaptureError(f"the params batched for {name} are not the params it stacks")
        at = {lane: i for i, lane in enumerate(concatenated)}
        order = [at[lane] for lane in lanes]
        if order == list(range(len(order))):
            orders[name] = None
        else:
            orders[name] = len(inputs)
            inputs.append(torch.tensor(order, device=device))
    return orders


def _order(tensors: tuple[torch.Tensor, ...], index: int | None) -> torch.Tensor | None:
    return None if index is None else tensors[index]


def _stacked(values: list[torch.Tensor], order: torch.Tensor | None) -> torch.Tensor:
    """The cross-lane op's result: the exported values of each batch, in the op's list order (copies, as stack)."""
    joined = values[0] if len(values) == 1 else torch.cat(values)
    return joined if order is None else joined.index_select(0, order)
