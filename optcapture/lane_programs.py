"""Stage 3, lane programs: one param's update cut out of the step Dynamo traced, and made ready for vmap.

:func:`lane_program` extracts the nodes that compute one lane (or a window of them, for
:mod:`optcapture.cross_lane`), with foreach ops split into their per-param op; :func:`out_of_place` rewrites the
in-place ops vmap cannot batch as they are. :mod:`optcapture.lane_batches` runs such a program over a batch.

Invariant: a lane program holds the real graph's own nodes for its lane, in graph order, and nothing of another
lane; every input it reads is named by a :class:`LaneInput`.
"""

from __future__ import annotations

import dataclasses
import operator
import sys
from typing import Any, Literal

import torch
from torch.fx import GraphModule, Node

from optcapture.discovery import StepGraph
from optcapture.errors import CaptureError
from optcapture.input_roles import InputRole, RoleKind
from optcapture.lanes import LaneId, called_name, in_place, written_argument
from optcapture.sources import HyperSource, hyper_source

_BATCHED_KINDS = frozenset({"param", "grad", "state", "scalar_state", "carried"})

InputKind = RoleKind | Literal["crossed", "carried", "stacked"]
"""What a placeholder of an extracted program is: a role of the step's inputs; or, in the programs
:mod:`optcapture.cross_lane` splits a step into, a shared value computed from a cross-lane op (``crossed``), a value
of the lane computed by its earlier program (``carried``), a cross-lane op's result (``stacked``)."""


@dataclasses.dataclass(frozen=True)
class LaneInput:
    """A placeholder of a lane program: a tensor of the lane (``role``: param, grad, state or scalar_state, with
    ``key``), a number of the lane's state (``member_number``, with ``key``) or a value shared by all lanes
    (``shared``: the object the real graph read; ``source``: the param-group entry it is, for a hyperparameter); for
    ``crossed``, ``carried`` and ``stacked``, ``key`` is the graph node."""

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
                 window: Window | None = None) -> tuple[GraphModule, list[LaneInput]]:
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
    singles = {n: lane_args(n, position[n.name], report.foreach_lanes[n.name]) for n in nodes if n.name in position}
    try:
        return _extract(gm, example_inputs, step, lane, singles, window)
    finally:
        for single in singles.values():
            # A scratch node counts as a user of the real graph's nodes until it is erased, and Dynamo erases
            # those nodes when it is done with the frame (``OutputGraph`` cleanup): it must find no other users.
            single.graph.erase_node(single)


def _extract(gm: GraphModule, example_inputs: list[Any], step: StepGraph, lane: LaneId | None,
             singles: dict[Node, Node], window: Window | None) -> tuple[GraphModule, list[LaneInput]]:
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
    inputs: list[LaneInput] = []
    for node in nodes:
        if node not in ancestors:
            continue
        kind = boundary(node)
        if kind is not None:
            inputs.append(LaneInput(kind, node.name))
            env[node] = graph.placeholder(node.name)
            env[node].meta = dict(node.meta)
        elif node.op in ("placeholder", "get_attr"):
            role = roles.get(node.name)
            if role is None:
                raise CaptureError(f"input {node.name} of the step has no role")
            if role.kind in ("param", "grad", "state", "scalar_state", "member_number"):
                if (role.group, role.param_index) != lane:
                    raise CaptureError(f"the update of param {lane} reads input {node.name} of another param")
                inputs.append(LaneInput(role.kind, role.key))
            elif role.kind in ("hyper", "global_state"):
                inputs.append(shared_input(gm, example_inputs, placeholders, node, role))
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


def shared_input(gm: GraphModule, example_inputs: list[Any], placeholders: list[Node], node: Node,
                 role: InputRole) -> LaneInput:
    """The :class:`LaneInput` of ``node``, an input of ``gm`` shared by all params (a hyperparameter or a tensor
    under a string key of ``optimizer.state``): the object the real graph read, and its param-group source.
    ``placeholders``: ``gm``'s, in order."""
    value = (example_inputs[placeholders.index(node)] if node.op == "placeholder"
             else getattr(gm, str(node.target)))
    return LaneInput(role.kind, role.key, value, hyper_source(role.source or ""))


# In-place ops vmap batches as they are (the others become an out-of-place op and a copy_).
_BATCHED_IN_PLACE = frozenset({"copy_", "zero_", "fill_"})


def out_of_place(program: GraphModule) -> GraphModule:
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
        name = called_name(node)
        if not in_place(name) or name.startswith("_") or name in _BATCHED_IN_PLACE \
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


def lane_args(node: Node, j: int, lanes_at: tuple[LaneId | None, ...]) -> Node:
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


def writes_input(program: GraphModule, role: InputKind, inputs: list[LaneInput]) -> bool:
    """Whether an in-place op of ``program`` (or one's ``out=``) writes the input of ``role`` (or a view of it)."""
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    written: set[Node] = {p for p, i in zip(placeholders, inputs, strict=True) if i.role == role}
    for node in program.graph.nodes:
        if node.op not in ("call_function", "call_method") or not node.args:
            continue
        first = node.args[0]
        name = called_name(node)
        target = written_argument(node, name)
        # An out= tuple names each output; an in-place op's first argument is written only where it is one node.
        targets = target if isinstance(target, (tuple, list)) and "out" in node.kwargs else (target,)
        if any(isinstance(t, Node) and t in written for t in targets):
            return True
        if isinstance(first, Node) and first in written and name in (
                "view", "reshape", "view_as", "flatten", "squeeze", "unsqueeze", "t", "transpose", "permute", "expand",
                "narrow", "select", "getitem", "as_strided", "detach", "T", "mT"):
            written.add(node)
    return False
