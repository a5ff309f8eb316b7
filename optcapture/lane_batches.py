"""Stage 3, batched lanes: one vmapped program per batch of same-shape params, for updates that are not elementwise.

LAMB and LARS scale each param's update by a ratio of per-tensor norms, NovoGrad keeps a per-tensor norm, Muon
orthogonalises each matrix with a Newton-Schulz iteration: the update of one param reads only that param's
tensors and values shared by all params, but it reduces or multiplies within the param, so the flat runs of the
elementwise path (:mod:`optcapture.bucketing`) would mix params. Here params of one shape are instead laid out
at a fixed stride in flat storage (:mod:`optcapture.preparation` orders a bucket by shape) and viewed as one
``[k, *shape]`` tensor, and the update of one param, cut out of the real graph Dynamo traced, runs over the
batch under ``torch.func.vmap``: one program per batch, whose kernels (a segmented reduction is a reduction over
the trailing dims, a matmul a batched matmul) follow the number of distinct shapes, not of tensors.

Invariant: a batch holds only params whose lane programs in the real graph are event for event equal
(:attr:`optcapture.lanes.LaneReport.programs`) and whose shapes are equal, and its program is the real graph's
own nodes for its first member, so each slice of the batch runs exactly what the real step runs for its member
(vmap's per-example semantics); what cannot be laid out that way is refused with the reason, before anything runs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
import sys
from collections.abc import Callable, Hashable
from typing import Any, Literal

import torch
from torch.fx import GraphModule, Node

from optcapture import lane_hypers
from optcapture.discovery import BucketKey, HyperSource, RoleKind, StepGraph, hyper_source
from optcapture.errors import CaptureError
from optcapture.lanes import LaneId, in_place
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
    first = flat.slot(positions[0])
    stride = flat.offsets[positions[1]] - flat.offsets[positions[0]] if len(positions) > 1 else first.stop - first.start
    if any(flat.offsets[b] - flat.offsets[a] != stride for a, b in zip(positions, positions[1:], strict=False)):
        raise CaptureError(f"members of one shape do not lie at one stride in the flat storage of {flat.key}")
    return LaneBatch(flat.key, tuple(positions), flat.params[positions[0]].shape, first.start,
                     flat.slot(positions[-1]).stop, stride)


InputKind = RoleKind | Literal["crossed", "carried", "stacked"]
"""What a placeholder of an extracted program is: a role of the step's inputs; or, in the programs
:mod:`optcapture.cross_lane` splits a step into, a shared value computed from a cross-lane op (``crossed``), a value
of the lane computed by its earlier program (``carried``), a cross-lane op's result (``stacked``)."""


@dataclasses.dataclass(frozen=True)
class _LaneInput:
    """A placeholder of a lane program: a tensor of the lane (``role``: param, grad, state or scalar_state, with
    ``key``) or a value shared by all lanes (``shared``: the object the real graph read; ``source``: the param-group
    entry it is, for a hyperparameter); for ``crossed``, ``carried`` and ``stacked``, ``key`` is the graph node."""

    role: InputKind
    key: str | None = None
    shared: Any = None
    source: HyperSource | None = None


@dataclasses.dataclass(frozen=True)
class Window:
    """The part of a step a program holds (:mod:`optcapture.cross_lane`). For a lane: its nodes at graph positions
    in ``(after, upto]``, its nodes at or before ``after`` read as ``carried`` inputs; for no lane (None): the
    shared values computed from cross-lane results, each cross-lane node read as a ``stacked`` input. Crossed
    values are read as inputs either way; the program returns the nodes ``outputs``."""

    after: int = -1
    upto: int = sys.maxsize
    outputs: tuple[str, ...] = ()


def lane_program(gm: GraphModule, example_inputs: list[Any], step: StepGraph, lane: LaneId | None,
                 window: Window | None = None) -> tuple[GraphModule, list[_LaneInput]]:
    """The nodes of ``gm`` that compute ``lane``'s update and the shared values it reads, as a graph of its own
    (with ``window``: that part of them, see :class:`Window`).

    Its placeholders are the graph inputs it reads (described by the returned list), in graph order; it returns
    ``window.outputs``, or else its first input (vmap needs a tensor out)."""
    report = step.lane_report
    assert report is not None
    nodes = list(gm.graph.nodes)
    # A foreach node computes one item per lane: its position for ours, where it has one.
    position = {name: lanes_at.index(lane) for name, lanes_at in report.foreach_lanes.items()
                if lane is not None and lane in lanes_at}
    singles = {n: _lane_args(n, position[n.name], report.foreach_lanes[n.name]) for n in nodes if n.name in position}
    try:
        return _extract(gm, example_inputs, step, lane, singles, window)
    finally:
        for single in singles.values():
            # A scratch node counts as a user of the real graph's nodes until it is erased, and Dynamo erases
            # those nodes when it is done with the frame (``OutputGraph`` cleanup): it must find no other users.
            single.graph.erase_node(single)


def _extract(gm: GraphModule, example_inputs: list[Any], step: StepGraph, lane: LaneId | None,
             singles: dict[Node, Node], window: Window | None) -> tuple[GraphModule, list[_LaneInput]]:
    """:func:`lane_program`, given the single-tensor op of each foreach node at ``lane``'s position."""
    report = step.lane_report
    assert report is not None
    lane_of = report.lane_of
    roles = {role.node: role for role in step.roles}
    nodes = list(gm.graph.nodes)
    at = {node: i for i, node in enumerate(nodes)}
    part = window or Window()

    def ours(node: Node) -> bool:
        return lane is not None and (lane_of.get(node.name, ()) == lane or node in singles)

    def boundary(node: Node) -> InputKind | None:
        if window is None:
            return None
        if lane is None:
            return "stacked" if node.name in report.cross_lanes else None
        if node.name in report.crossed:
            return "crossed"
        return "carried" if ours(node) and at[node] <= part.after else None

    ancestors: set[Node] = set()
    if lane is None:
        stack = [n for n in nodes if n.name in report.crossed and n.name not in report.cross_lanes]
    else:
        stack = [n for n in nodes if ours(n) and part.after < at[n] <= part.upto]
    while stack:
        node = stack.pop()
        if node in ancestors:
            continue
        ancestors.add(node)
        if boundary(node) is not None:
            continue
        if node in singles:
            stack.extend(singles[node].all_input_nodes)
        elif node.target is operator.getitem and isinstance(node.args[0], Node) and node.args[0] in singles:
            stack.append(node.args[0])
        else:
            stack.extend(node.all_input_nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    graph = torch.fx.Graph()
    env: dict[Node, Node] = {}
    inputs: list[_LaneInput] = []
    for node in nodes:
        if node not in ancestors:
            continue
        kind = boundary(node)
        if kind is not None:
            inputs.append(_LaneInput(kind, node.name))
            env[node] = graph.placeholder(node.name)
            env[node].meta = dict(node.meta)
        elif node.op in ("placeholder", "get_attr"):
            role = roles.get(node.name)
            if role is None:
                raise CaptureError(f"input {node.name} of the step has no role")
            if role.kind in ("param", "grad", "state", "scalar_state"):
                if (role.group, role.param_index) != lane:
                    raise CaptureError(f"the update of param {lane} reads input {node.name} of another param")
                inputs.append(_LaneInput(role.kind, role.key))
            elif role.kind in ("hyper", "global_state"):
                value = (example_inputs[placeholders.index(node)] if node.op == "placeholder"
                         else getattr(gm, str(node.target)))
                inputs.append(_LaneInput(role.kind, role.key, value, hyper_source(role.source or "")))
            else:
                raise CaptureError(f"input {node.name} of the step is {role.kind}")
            env[node] = graph.placeholder(node.name)
            env[node].meta = dict(node.meta)
        elif node in singles:
            env[node] = graph.node_copy(singles[node], lambda arg: env[arg])
        elif node.target is operator.getitem and isinstance(node.args[0], Node) and node.args[0] in singles:
            env[node] = env[node.args[0]]  # the item of a foreach result: the single op's result
        elif node.op in ("call_function", "call_method"):
            env[node] = graph.node_copy(node, lambda arg: env[arg])
        else:
            raise CaptureError(f"node {node.name} ({node.op}) in the update of param {lane}")
    if part.outputs:
        by_name = {node.name: node for node in env}
        graph.output(tuple(env[by_name[name]] for name in part.outputs))
        return GraphModule(gm, graph), inputs
    own = [env[n] for n in nodes if n in env and n.op in ("placeholder", "get_attr")]
    first = next((node for node, i in zip(own, inputs, strict=True) if i.role in _BATCHED_KINDS), None)
    if first is None:
        raise CaptureError(f"the update of param {lane} reads none of its tensors")
    graph.output(first)
    return GraphModule(gm, graph), inputs


_BATCHED_KINDS = frozenset({"param", "grad", "state", "scalar_state", "carried"})

_Where = tuple[int, tuple[int, ...] | None]
"""(input index, ``[k, *shape]`` of the batch) where the input is the batch's range of a flat buffer; shape None:
the input is a value shared by all lanes, passed as it is."""


def _batch_range(flat: FlatGroup, batch: LaneBatch, lane_input: _LaneInput) -> torch.Tensor:
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
    cheaply); scalar state is already ``[k]``."""
    if len(size) == 1:
        return tensor
    k, numel = size[0], math.prod(size[1:])
    return tensor.view(k, -1)[:, :numel].view(size)


class InputTable:
    """The tensors a batched step reads, each once (flat buffer ranges, which never overlap, and shared tensors),
    and the group entries among them read from device tensors."""

    def __init__(self, step: StepGraph, prepared: PreparedOptimizer) -> None:
        optimizer = step.optimizer
        assert optimizer is not None
        self.optimizer = optimizer
        self.prepared = prepared
        self.inputs: list[torch.Tensor] = []
        self.device_hypers: set[tuple[int, str]] = set()
        self._shared_index: dict[int, int] = {}

    def shared(self, lane_input: _LaneInput, device: torch.device) -> tuple[int, bool]:
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

    def batched(self, program: GraphModule, lane_inputs: list[_LaneInput], flat: FlatGroup, batch: LaneBatch,
                ) -> tuple[Callable[..., Any], list[_Where | None]]:
        """``program`` under vmap over ``batch``, and where each of its inputs is: an index into :attr:`inputs`
        (with the ``[k, *shape]`` of a flat buffer range); None for the inputs the caller passes (``crossed``,
        ``carried``, ``stacked``)."""
        placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
        numbers: list[Node] = []
        where: list[_Where | None] = []
        in_dims: list[int | None] = []
        for node, lane_input in zip(placeholders, lane_inputs, strict=True):
            if lane_input.role in ("crossed", "carried", "stacked"):
                where.append(None)
                in_dims.append(0 if lane_input.role == "carried" else None)
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
        return torch.func.vmap(_out_of_place(program), in_dims=tuple(in_dims)), where

    def read(self, tensors: tuple[torch.Tensor, ...], where: _Where) -> torch.Tensor:
        index, size = where
        return tensors[index] if size is None else _as_batch(tensors[index], size)


def build_batched_step(step: StepGraph, gm: GraphModule, example_inputs: list[Any],
                       flats: dict[BucketKey, FlatGroup], batches: list[LaneBatch],
                       prepared: PreparedOptimizer) -> BatchedStep:
    """The program that steps every batch: for each, the lane program of its first member under vmap. Its inputs
    are each batch's ranges of flat storage, which never overlap, and the shared tensors, each once: a number of a
    param group that Dynamo passes as an input is read from ``prepared``'s device tensor for it."""
    refuse_shared_writes(gm, step)
    table = InputTable(step, prepared)
    plan: list[tuple[Callable[..., Any], list[_Where]]] = []
    writes_grads = False
    for batch in batches:
        flat = flats[batch.key]
        lane = (batch.key.group, flat.param_indices[batch.positions[0]])
        program, lane_inputs = lane_program(gm, example_inputs, step, lane)
        writes_grads |= _writes_input(program, "grad", lane_inputs)
        batched, where = table.batched(program, lane_inputs, flat, batch)
        plan.append((batched, [w for w in where if w is not None]))
    log.info("batched lanes: %d batch(es) of shapes %s; group entries read from device tensors: %s", len(batches),
             sorted({tuple(b.shape) for b in batches}), sorted(table.device_hypers))

    def step_batches(*tensors: torch.Tensor) -> None:
        for batched, where in plan:
            batched(*(table.read(tensors, w) for w in where))

    return BatchedStep(step_batches, table.inputs, writes_grads, table.device_hypers)


def refuse_shared_writes(gm: GraphModule, step: StepGraph, crossed: frozenset[str] = frozenset()) -> None:
    """A :class:`CaptureError` when the step writes in place into a value shared by all params (timm's Lamb:
    ``group["step"].add_(1)`` on a tensor in its param group). A batch runs each param's update: a shared write is in
    no lane's program, or in every one made out of place, so the shared tensor would never change (it stayed 1 where
    eager counts 5: a silent wrong answer before this check). ``crossed``: values a cross-param phase computes."""
    report = step.lane_report
    assert report is not None
    for node in gm.graph.nodes:
        name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
        if report.lane_of.get(node.name, ()) is None and node.name not in crossed and in_place(name):
            raise CaptureError(f"{node.name} ({name}) writes a value shared by all params in place, outside any "
                               "param's update")


# In-place ops vmap batches as they are (the others become an out-of-place op and a copy_).
_BATCHED_IN_PLACE = frozenset({"copy_", "zero_", "fill_"})


def _out_of_place(program: GraphModule) -> GraphModule:
    """``program`` with each in-place op ``x.op_(...)`` written as ``x.copy_(x.op(...))``: vmap has no batching rule
    for several in-place ops (``addcmul_``, ``lerp_``) and runs those once per member (BatchedFallback.cpp), a
    kernel per tensor; their out-of-place forms and ``copy_`` have one. Inductor writes the copy in the same kernel."""
    graph = program.graph
    for node in list(graph.nodes):
        if node.op not in ("call_method", "call_function") or not node.args:
            continue
        if node.target is torch.ops.prims.fma.default:
            # Dynamo writes ``addcmul_(a, b, value=v)`` as ``fma(a * b, v, self)`` (eager's rounding); vmap has no
            # batching rule for it. ``add(c, a, alpha=b)`` computes the same sum, rounded once more.
            a, b, c = node.args
            with graph.inserting_before(node):
                replacement = (graph.call_function(torch.addcmul, (c, a, b)) if isinstance(b, torch.fx.Node)
                               else graph.call_function(torch.add, (c, a), {"alpha": b}))
                replacement.meta = dict(node.meta)
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
            continue
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if not isinstance(name, str) or not in_place(name) or name.startswith("_") or name in _BATCHED_IN_PLACE \
                or not hasattr(torch.Tensor, name[:-1]):
            continue
        with graph.inserting_before(node):
            result = graph.call_method(name[:-1], node.args, dict(node.kwargs))
            result.meta = dict(node.meta)
            written = graph.call_method("copy_", (node.args[0], result))
            written.meta = dict(node.meta)
        node.replace_all_uses_with(written)
        graph.erase_node(node)
    graph.lint()
    program.recompile()
    return program


_CLAMPS = {"maximum": "clamp_min", "minimum": "clamp_max"}


def _lane_args(node: Node, j: int, lanes_at: tuple[LaneId | None, ...]) -> Node:
    """The single-tensor op that foreach ``node`` applies at position ``j``, as a node of a scratch graph (copied
    into the lane program by the caller): ``_foreach_mul_(xs, ys, alpha=a)`` -> ``xs[j].mul_(ys[j], alpha=a)``,
    ``_foreach_norm(xs, p)`` -> ``vector_norm(xs[j], p)``. Lists (and scalar lists) of the foreach length are
    indexed; everything else is passed to every position, as the foreach op does."""
    name = getattr(node.target, "__name__", str(node.target))
    base = name[len("_foreach_"):]

    def at(arg: Any) -> Any:
        return arg[j] if isinstance(arg, (list, tuple)) and len(arg) == len(lanes_at) else arg

    args = [at(a) for a in node.args]
    kwargs = {k: at(v) for k, v in node.kwargs.items()}
    if base.rstrip("_") in _CLAMPS and len(node.args) > 1 and not isinstance(node.args[1], (list, tuple)):
        # ``_foreach_maximum(xs, scalar)`` is ``_foreach_clamp_min`` (native_functions.yaml); ``torch.maximum``
        # takes no number.
        base = _CLAMPS[base.rstrip("_")] + base[len(base.rstrip("_")):]
    target: Any
    if base == "norm":
        target = torch.linalg.vector_norm
    elif base.endswith("_"):
        target = getattr(torch.Tensor, base)
    else:
        target = getattr(torch, base)
    if base.rstrip("_") in ("addcmul", "addcdiv") and len(args) == 4:
        kwargs["value"] = args.pop()  # a positional scalar of the foreach form is value= of the single one
    scratch = torch.fx.Graph()
    return scratch.create_node("call_function", target, tuple(args), kwargs, name=f"{node.name}_{j}")


def _writes_input(program: GraphModule, role: InputKind, inputs: list[_LaneInput]) -> bool:
    """Whether an in-place op of ``program`` writes the input of ``role`` (or a view of it)."""
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    written: set[Node] = {p for p, i in zip(placeholders, inputs, strict=True) if i.role == role}
    for node in program.graph.nodes:
        if node.op not in ("call_function", "call_method") or not node.args:
            continue
        first = node.args[0]
        name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
        if isinstance(first, Node) and first in written:
            if in_place(name):
                return True
            if name in ("view", "reshape", "view_as", "flatten", "squeeze", "unsqueeze", "t", "transpose",
                        "permute", "expand", "narrow", "select", "getitem", "as_strided", "detach", "T", "mT"):
                written.add(node)
    return False
