"""Stage 3, batched lanes: one vmapped program per batch of same-shape params, for updates that are not elementwise.

LAMB and LARS scale each param's update by a ratio of per-tensor norms, NovoGrad keeps a per-tensor norm, Muon
orthogonalises each matrix with a Newton-Schulz iteration: the update of one param reads only that param's
tensors and values shared by all params, but it reduces or multiplies within the param, so the flat runs of the
elementwise path (:mod:`optcapture.shadows`) would mix params. Here params of one shape are instead laid out
at a fixed stride in flat storage (:mod:`optcapture.preparation` orders a bucket by shape) and viewed as one
``[k, *shape]`` tensor, and the update of one param, cut out of the real graph Dynamo traced
(:mod:`optcapture.lane_programs`), runs over the batch under ``torch.func.vmap``: one program per batch, whose
kernels (a segmented reduction is a reduction over the trailing dims, a matmul a batched matmul) follow the number
of distinct shapes, not of tensors.

Invariant: a batch holds only params whose lane programs in the real graph are event for event equal
(:attr:`optcapture.lanes.LaneReport.programs`) and whose shapes are equal, and its program is the real graph's
own nodes for its first member, so each slice of the batch runs exactly what the real step runs for its member
(vmap's per-example semantics); what cannot be laid out that way is refused with the reason, before anything runs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch
from torch.fx import GraphModule, Node

from optcapture import lane_hypers
from optcapture.discovery import BucketKey, StepGraph
from optcapture.errors import CaptureError
from optcapture.lane_programs import LaneInput, lane_program, out_of_place, shared_input, writes_input
from optcapture.lanes import LaneId, called_name, in_place
from optcapture.preparation import PARAM, FlatGroup, PreparedOptimizer, Role

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LaneBatch:
    """Members ``positions`` (consecutive in ``key``'s flat group) of one shape and one program."""

    key: BucketKey
    positions: tuple[int, ...]
    shape: torch.Size
    start: int
    end: int
    stride: int
    """Elements from one member's slot to the next (its numel rounded up to the flat group's alignment)."""


@dataclasses.dataclass
class BatchedStep:
    """A callable that steps every batch of a capture, and what it is made of."""

    call: Callable[..., None]
    """Steps every batch; takes ``inputs``."""
    inputs: list[torch.Tensor]
    """The flat buffers and shared tensors the step reads and writes, each once."""
    writes_grads: bool
    """The update writes into its grads (it reads copies: the caller copies them back after each step)."""
    device_hypers: set[tuple[int, str]] = dataclasses.field(default_factory=set)
    """(group, key) of the group entries read from device tensors refreshed before each step
    (:mod:`optcapture.lane_hypers`), not held as constants."""
    member_numbers: list[lane_hypers.MemberNumbers] = dataclasses.field(default_factory=list)
    """The vectors of the numbers of each member's state the batches read, written before each step."""


def plan_batches(step: StepGraph, flats: dict[BucketKey, FlatGroup]) -> list[LaneBatch]:
    """Split each bucket into batches of consecutive members of one shape and one lane program."""
    report = step.lane_report
    assert report is not None
    batches = []
    for bucket in step.buckets:
        flat = flats[bucket.key]
        position_of = {index: j for j, index in enumerate(flat.param_indices)}
        current: list[int] = []
        last: tuple[torch.Size, Hashable] | None = None
        for j in sorted(position_of[i] for i in bucket.members):
            kind = (flat.params[j].shape, report.programs[(bucket.key.group, flat.param_indices[j])])
            if current and (j != current[-1] + 1 or kind != last):
                batches.append(_make_batch(flat, current))
                current = []
            current.append(j)
            last = kind
        if current:
            batches.append(_make_batch(flat, current))
    return batches


def _make_batch(flat: FlatGroup, positions: list[int]) -> LaneBatch:
    strided = next((j for j in positions if not flat.params[j].is_contiguous()), None)
    if strided is not None:
        # A batch is viewed as [k, *shape] of contiguous members (_as_batch): a lane-local update (a norm, a matmul)
        # reads its member in its own shape, which a slot in another element order does not give by a view.
        raise CaptureError(f"param {flat.param_indices[strided]} of group {flat.key.group} is not contiguous "
                           f"(strides {flat.strides[strided]}, channels_last or another order): params of one shape "
                           "are batched for a lane-local update (norms, matmuls) only when contiguous")
    first = flat.slot(positions[0])
    stride = flat.offsets[positions[1]] - flat.offsets[positions[0]] if len(positions) > 1 else first.stop - first.start
    if any(flat.offsets[b] - flat.offsets[a] != stride for a, b in zip(positions, positions[1:], strict=False)):
        raise CaptureError(f"members of one shape do not lie at one stride in the flat storage of {flat.key}")
    return LaneBatch(flat.key, tuple(positions), flat.params[positions[0]].shape, first.start,
                     flat.slot(positions[-1]).stop, stride)


Where = tuple[int, tuple[int, ...] | None]
"""(input index, ``[k, *shape]`` of the batch) where the input is the batch's range of a flat buffer; shape None:
the input is a value shared by all lanes, passed as it is."""


def _batch_range(flat: FlatGroup, batch: LaneBatch, lane_input: LaneInput) -> torch.Tensor:
    """The contiguous range of flat storage that holds ``lane_input`` for every member of ``batch`` (members at
    ``batch.stride``, each padded to it); ``[k]`` for scalar state."""
    if lane_input.role == "scalar_state":
        assert lane_input.key is not None
        vector = flat.scalars.get(lane_input.key)
        if vector is None:
            raise CaptureError(f"scalar state {lane_input.key!r} is not in flat storage")
        return vector[batch.positions[0]:batch.positions[-1] + 1]
    if lane_input.role == "param":
        buffer = flat.flats[PARAM]
    elif lane_input.role == "grad":
        buffer = flat.grad_flat()
    else:
        assert lane_input.key is not None
        buffer = flat.flats.get(Role("state", lane_input.key))
        if buffer is None:
            raise CaptureError(f"state {lane_input.key!r} does not have its param's shape (not in flat storage)")
    return buffer[batch.start:batch.start + batch.stride * len(batch.positions)]


def _as_batch(tensor: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """A batch's range seen as ``[k, *shape]``, through view and slice only (what functionalization writes back
    cheaply); scalar state is already ``[k]``.

    A range without padding between members is one view: through the slice, even a full one, Inductor indexes the
    range as ``x + n * ((x % n) // n)``, which it cannot prove equal to the ``x`` it writes back at, so each state
    the step updates in place was computed into a temporary and copied back, two more passes over it (LAMB's moments
    and Muon's params on GPT-2 shapes, torch 2.11, H100), and a transposed read beside it was not tiled."""
    if len(size) == 1:
        return tensor
    k, numel = size[0], math.prod(size[1:])
    if tensor.numel() == k * numel:
        return tensor.view(size)
    return tensor.view(k, -1)[:, :numel].view(size)


class InputTable:
    """The tensors a batched step reads, each once (flat buffer ranges, which never overlap, and shared tensors),
    and the group entries among them read from device tensors."""

    def __init__(self, step: StepGraph, prepared: PreparedOptimizer,
                 member_inputs: Mapping[tuple[LaneId, str], int] | None = None) -> None:
        optimizer = step.optimizer
        assert optimizer is not None
        self.optimizer = optimizer
        self.prepared = prepared
        self.inputs: list[torch.Tensor] = []
        self.device_hypers: set[tuple[int, str]] = set()
        self._shared_index: dict[int, int] = {}
        self.member_inputs = member_inputs or {}
        """(lane, key) -> the graph input index of that lane's number ``state[p][key]`` (:func:`member_inputs`)."""
        self.member_numbers: list[lane_hypers.MemberNumbers] = []

    def member_vector(self, flat: FlatGroup, batch: LaneBatch, key: str) -> torch.Tensor:
        """The float64 vector of the number ``key`` of each member's state, in the batch's order (written before
        every step: :class:`~optcapture.lane_hypers.MemberNumbers`)."""
        lanes = [(batch.key.group, flat.param_indices[j]) for j in batch.positions]
        indices = [self.member_inputs.get((lane, key)) for lane in lanes]
        missing = [lane for lane, index in zip(lanes, indices, strict=True) if index is None]
        if missing:
            raise CaptureError(f"the number {key!r} of the state of param {missing[0]} is not a graph input of its own"
                               " (read across params, or not passed by Dynamo)")
        # NaN until the first write: a step that read it unwritten would show it.
        vector = torch.full((len(lanes),), math.nan, dtype=torch.float64, device=batch.key.device)
        self.member_numbers.append(lane_hypers.MemberNumbers(vector, tuple(i for i in indices if i is not None)))
        return vector

    def shared(self, lane_input: LaneInput, device: torch.device) -> tuple[int, bool]:
        """The index of a shared input, and whether it is a number of a param group that Dynamo passes as an input,
        read from ``prepared``'s device tensor for it (the program must then take it as a tensor)."""
        shared = lane_input.shared
        number = (lane_hypers.device_number(self.optimizer, self.prepared, lane_input.source, device)
                  if lane_input.role == "hyper" and lane_input.source is not None else None)
        if number is not None:
            assert lane_input.source is not None
            # A SymInt, or a float64 tensor Dynamo makes anew at every call: the capture's own tensor.
            shared = number
            self.device_hypers.add((lane_input.source.group, lane_input.source.key))
        elif not isinstance(shared, torch.Tensor):
            raise CaptureError(f"shared input {lane_input.key!r} is a {type(shared).__name__}")
        if id(shared) not in self._shared_index:
            self._shared_index[id(shared)] = len(self.inputs)
            self.inputs.append(shared)
        return self._shared_index[id(shared)], number is not None

    def batched(self, program: GraphModule, lane_inputs: list[LaneInput], flat: FlatGroup, batch: LaneBatch,
                ) -> tuple[Callable[..., Any], list[Where | None]]:
        """``program`` under vmap over ``batch``, and where each of its inputs is: an index into :attr:`inputs`
        (with the ``[k, *shape]`` of a flat buffer range); None for the inputs the caller passes (``crossed``,
        ``carried``, ``stacked``)."""
        placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
        numbers: list[Node] = []
        where: list[Where | None] = []
        in_dims: list[int | None] = []
        for node, lane_input in zip(placeholders, lane_inputs, strict=True):
            if lane_input.role in ("crossed", "carried", "stacked"):
                where.append(None)
                in_dims.append(0 if lane_input.role == "carried" else None)
            elif lane_input.role == "member_number":
                assert lane_input.key is not None
                where.append((len(self.inputs), (len(batch.positions),)))
                in_dims.append(0)
                self.inputs.append(self.member_vector(flat, batch, lane_input.key))
                numbers.append(node)  # each lane reads its own value as a 0-dim tensor under vmap
            elif lane_input.shared is not None:
                index, number = self.shared(lane_input, batch.key.device)
                if number:
                    numbers.append(node)
                where.append((index, None))
                in_dims.append(None)
            else:
                where.append((len(self.inputs), (len(batch.positions), *batch.shape)
                              if lane_input.role != "scalar_state" else (len(batch.positions),)))
                in_dims.append(0)
                self.inputs.append(_batch_range(flat, batch, lane_input))
        if numbers:
            lane_hypers.numbers_as_tensors(program, numbers)
        return torch.func.vmap(out_of_place(program), in_dims=tuple(in_dims)), where

    def read(self, tensors: tuple[torch.Tensor, ...], where: Where) -> torch.Tensor:
        index, size = where
        return tensors[index] if size is None else _as_batch(tensors[index], size)


def build_batched_step(step: StepGraph, gm: GraphModule, example_inputs: list[Any],
                       flats: dict[BucketKey, FlatGroup], batches: list[LaneBatch],
                       prepared: PreparedOptimizer) -> BatchedStep:
    """The program that steps every batch: for each, the lane program of its first member under vmap. Its inputs
    are each batch's ranges of flat storage, which never overlap, and the shared tensors, each once: a number of a
    param group that Dynamo passes as an input is read from ``prepared``'s device tensor for it."""
    table = InputTable(step, prepared, member_inputs(step, gm))
    write_once = shared_writes(gm, example_inputs, step, table, batches[0].key.device)
    plan: list[tuple[Callable[..., Any], list[Where]]] = []
    writes_grads = False
    for batch in batches:
        flat = flats[batch.key]
        lane = (batch.key.group, flat.param_indices[batch.positions[0]])
        program, lane_inputs = lane_program(gm, example_inputs, step, lane)
        writes_grads |= writes_input(program, "grad", lane_inputs)
        batched, where = table.batched(program, lane_inputs, flat, batch)
        plan.append((batched, [w for w in where if w is not None]))
    log.info("batched lanes: %d batch(es) of shapes %s; group entries read from device tensors: %s", len(batches),
             sorted({tuple(b.shape) for b in batches}), sorted(table.device_hypers))

    def step_batches(*tensors: torch.Tensor) -> None:
        if write_once is not None:
            write_once(*tensors)
        for batched, where in plan:
            batched(*(table.read(tensors, w) for w in where))

    return BatchedStep(step_batches, table.inputs, writes_grads, table.device_hypers, table.member_numbers)


def member_inputs(step: StepGraph, gm: GraphModule) -> dict[tuple[LaneId, str], int]:
    """(lane, key) -> the index among ``gm``'s placeholders of the number ``state[p][key]`` of that lane."""
    roles = {role.node: role for role in step.roles}
    found = {}
    for index, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        role = roles.get(node.name)
        if role is not None and role.kind == "member_number":
            assert role.group is not None and role.param_index is not None and role.key is not None
            found[((role.group, role.param_index), role.key)] = index
    return found


def shared_writes(gm: GraphModule, example_inputs: list[Any], step: StepGraph, table: InputTable,
                  device: torch.device, crossed: frozenset[str] = frozenset()) -> Callable[..., None] | None:
    """The step's in-place writes into inputs shared by all params, as one program to run once before the batches
    (``table`` gets its inputs); None when there are none. timm's Lamb counts steps with ``group["step"].add_(1)``
    on a tensor in its param group: a batch runs each param's update, in which such a write is in no lane's
    program, so it must run once of its own (before this, the counter stayed 1 where eager counts 5).

    Run first, it is exact when every lane reads the input after the write in graph order (what the lanes then
    read is the written value, as in eager), the write's result is not read (a lane would compute it again from
    the written input) and the write reads only shared values. Anything else raises :class:`CaptureError` with the
    reason, before anything runs. ``crossed``: values a cross-param phase computes (written there, not here)."""
    report = step.lane_report
    assert report is not None
    nodes = list(gm.graph.nodes)
    at = {node: i for i, node in enumerate(nodes)}
    writes = [node for node in nodes if report.lane_of.get(node.name, ()) is None and node.name not in crossed
              and in_place(called_name(node))]
    if not writes:
        return None
    roles = {role.node: role for role in step.roles}
    needed: set[Node] = set()
    for write in writes:
        what = f"{write.name} ({called_name(write)}) writes a value shared by all params in place, outside any " \
               "param's update"
        target = write.args[0] if write.args else None
        if not isinstance(target, Node) or target.op not in ("placeholder", "get_attr") \
                or getattr(roles.get(target.name), "kind", None) not in ("hyper", "global_state"):
            raise CaptureError(f"{what}, into a value the step computes")
        if write.users:
            raise CaptureError(f"{what}, and the step reads its result")
        if any(at[user] < at[write] and user not in writes for user in target.users):
            raise CaptureError(f"{what}, after the step read it")
        stack = [write]
        while stack:
            node = stack.pop()
            if node in needed:
                continue
            if report.lane_of.get(node.name) is not None or node.name in crossed:
                raise CaptureError(f"{what}, from a value of a param")
            needed.add(node)
            stack.extend(node.all_input_nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    graph = torch.fx.Graph()
    env: dict[Node, Node] = {}
    where: list[int] = []
    numbers: list[Node] = []
    targets = {write.args[0] for write in writes}
    for node in sorted(needed, key=at.__getitem__):
        if node.op in ("placeholder", "get_attr"):
            shared = shared_input(gm, example_inputs, placeholders, node, roles[node.name])
            index, number = table.shared(shared, device)
            if node in targets and table.inputs[index] is not shared.shared:
                raise CaptureError(f"{node.name} is written in place and is not a tensor of the optimizer's")
            env[node] = graph.placeholder(node.name)
            env[node].meta = dict(node.meta)
            where.append(index)
            if number:
                numbers.append(env[node])
        else:
            env[node] = graph.node_copy(node, lambda arg: env[arg])
    graph.output(None)
    program = GraphModule(gm, graph)
    if numbers:
        lane_hypers.numbers_as_tensors(program, numbers)
    log.info("writes into shared values run once before the batches: %s", [write.name for write in writes])

    def write_once(*tensors: torch.Tensor) -> None:
        program(*(tensors[i] for i in where))

    return write_once
