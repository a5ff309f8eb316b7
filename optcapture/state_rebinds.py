"""Stage 1, discovery's state rebinds: a step that assigns new tensors to its state entries, seen as one that
writes them in place.

Many optimizers users write update state out of place (``state["m"] = state["m"] * beta + grad``; timm's LaProp
keeps ``exp_avg_lr_2`` so). Dynamo then returns the new tensor from the graph and stores it in the state dict after
it, so every step hands the frame new tensors: no flat storage can hold them. :func:`find` tells which outputs of a
graph are such rebinds of entries the graph also reads, and :func:`stored_in_place` builds the graph that copies each
new value into the entry's own tensor and returns that tensor, which Dynamo then stores where it already was.

What changes for the user: the entry keeps its tensor object (as for state a step updates in place), so a reference
to it taken before the step (an ``optimizer.state_dict()`` held in memory) sees the new value, where eager would
have left it the old value. Every other observable is eager's: values, dtypes, shapes and which entries share a
tensor.

Invariant: a graph is rewritten only when every entry of the optimizer's state that the frame changes to a tensor
gets one the graph computes (not only a copy of an input), of the entry's own shape, dtype, device and strides,
sharing storage with no input and no other entry's new tensor, returned once and stored once, into an entry whose old
tensor the graph reads; the rewritten graph computes the same values as the graph it copies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node

from optcapture import _compat
from optcapture.graph_outputs import host_outputs
from optcapture.input_roles import InputRole
from optcapture.lanes import input_behind


@dataclasses.dataclass(frozen=True)
class StateRebind:
    """``optimizer.state[param][key] = <value>`` after the graph, where the entry's old tensor is the input
    ``placeholder`` (a placeholder or a graph attribute)."""

    group: int
    param_index: int
    key: str
    placeholder: str
    value: str


@dataclasses.dataclass(frozen=True)
class NoRebinds:
    """Why a graph's new state tensors are not stored in place."""

    reason: str


@dataclasses.dataclass(frozen=True)
class InPlace:
    """The copy of a graph that stores its rebinds in place, which returns no new tensor."""

    graph: GraphModule
    rebinds: tuple[StateRebind, ...]


def stored_in_place_if_rebound(gm: GraphModule, optimizer: torch.optim.Optimizer, roles: Sequence[InputRole],
                               tracer: Any) -> InPlace | NoRebinds | None:
    """The copy of ``gm`` that stores the entries the frame rebinds in place when that leaves it returning no new
    tensor; None when the frame rebinds no entry; else why not. Never raises: a record of Dynamo's read another
    way than expected is a reason, and the graph runs as Dynamo traced it."""
    try:
        rebinds = find(gm, optimizer, roles, tracer)
        if isinstance(rebinds, NoRebinds):
            return rebinds
        if not rebinds:
            return None
        in_place = stored_in_place(gm, rebinds)
    except Exception as error:  # noqa: BLE001 - any failure: the graph as traced, with the reason
        return NoRebinds(f"its stores could not be read ({type(error).__name__}: {error})")
    if host_outputs(in_place) is None:
        return NoRebinds("beside other new tensors")
    return InPlace(in_place, rebinds)


def find(gm: GraphModule, optimizer: torch.optim.Optimizer, roles: Sequence[InputRole],
         tracer: Any) -> tuple[StateRebind, ...] | NoRebinds:
    """The rebinds of ``optimizer``'s state the frame makes after ``gm`` (empty when it makes none)."""
    entries: dict[int, tuple[int, int]] = {}
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            state = optimizer.state.get(p)
            if isinstance(state, dict):
                entries.setdefault(id(state), (g, i))
    stores = _compat.dict_entry_stores(tracer)
    # Dynamo passes optimizer state as placeholders, or installs it as attributes of the graph (static addresses).
    inputs = {n.name: n for n in gm.graph.nodes if n.op in ("placeholder", "get_attr")}
    input_sources = {role.source for role in roles if role.source is not None}
    held = {(role.group, role.param_index, role.key): role.node for role in roles
            if role.kind in ("state", "scalar_state") and role.key is not None}
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    returned: list[Node] = []
    torch.fx.node.map_arg(output.args[0], returned.append)
    stored_nodes = [node for _, _, node, _ in stores if node is not None]
    rebinds: list[StateRebind] = []
    values: list[Node] = []
    for dict_id, key, node, source in stores:
        if dict_id not in entries:
            continue  # a dict of the user's, or Python state of the optimizer that is no param's
        g, i = entries[dict_id]
        where = f"state {key!r} of param {i} of group {g}"
        if node is None:
            if source in input_sources:
                return NoRebinds(f"{where} is assigned another tensor the step reads ({source})")
            continue  # a number or a constant: no tensor of the graph
        old = held.get((g, i, key)) if isinstance(key, str) else None
        if node.op in ("placeholder", "get_attr"):
            return NoRebinds(f"{where} is assigned a tensor the graph reads")
        if old is None:
            # Its tensor would have to be held by the graph, which would keep writing it after the entry is replaced
            # (``load_state_dict``, an eager step between compiled ones).
            return NoRebinds(f"{where} is assigned a tensor the graph creates, and the graph does not read its "
                             "old tensor")
        old_example = inputs[old].meta.get("example_value")
        if node.meta.get("example_value") is old_example:
            continue  # the entry's own tensor, as an in-place op returned it (``state["v"] = v.mul_(beta)``)
        reason = _unfit(node, old_example, inputs.values())
        if reason is None and (returned.count(node) != 1 or stored_nodes.count(node) != 1):
            reason = "it is stored in more than one place"
        if reason is None and any(_compat.is_alias_of(node.meta["example_value"], other.meta["example_value"])
                                  for other in values):
            reason = "that shares its storage with the new tensor of another entry"  # copies would not share it
        if reason is None and (copied := input_behind(node)) is not None:
            # ``state["old"] = p.clone()`` before ``p.sub_(...)``: as ``state["old"].copy_(p)``, Inductor (torch
            # 2.13) stores the updated param into the entry; the new tensor keeps it right.
            reason = f"that is a copy of the input {copied.name}"
        if reason is not None:
            return NoRebinds(f"{where} is assigned a new tensor {reason}")
        values.append(node)
        rebinds.append(StateRebind(g, i, key, old, node.name))
    return tuple(rebinds)


def _unfit(value: Node, old_example: Any, inputs: Any) -> str | None:
    """Why ``value`` cannot be copied into the tensor ``old_example`` describes without changing what the step
    computes; None if it can."""
    new_example = value.meta.get("example_value")
    if not isinstance(new_example, torch.Tensor) or not isinstance(old_example, torch.Tensor):
        return "that is no tensor Dynamo describes"
    if (new_example.shape, new_example.dtype, new_example.device) != (old_example.shape, old_example.dtype,
                                                                       old_example.device):
        return (f"of another shape, dtype or device ({tuple(new_example.shape)} {new_example.dtype} against "
                f"{tuple(old_example.shape)} {old_example.dtype})")
    if new_example.stride() != old_example.stride() and new_example.numel() > 1:
        return "with other strides"
    for node in inputs:
        example = node.meta.get("example_value")
        if isinstance(example, torch.Tensor) and _compat.is_alias_of(new_example, example):
            return f"that is a view of the input {node.name}"
    return None


def stored_in_place(gm: GraphModule, rebinds: Sequence[StateRebind]) -> GraphModule:
    """A copy of ``gm`` that copies each rebind's value into its entry's tensor at the end and returns that tensor
    where ``gm`` returns the value. ``gm`` itself is left as it is."""
    graph = torch.fx.Graph()
    returned = graph.graph_copy(gm.graph, {})
    by_name = {n.name: n for n in graph.nodes}
    attributes = {str(n.target): getattr(gm, str(n.target)) for n in gm.graph.nodes if n.op == "get_attr"}
    replaced: dict[Node, Node] = {}
    for rebind in sorted(rebinds, key=lambda r: (r.group, r.param_index, r.key)):
        value, entry = by_name[rebind.value], by_name[rebind.placeholder]
        written = graph.call_method("copy_", (entry, value))
        written.meta["example_value"] = entry.meta["example_value"]
        replaced[value] = written
    graph.output(torch.fx.node.map_arg(returned, lambda arg: replaced.get(arg, arg)))
    rewritten = GraphModule(attributes, graph)
    rewritten.meta.update(gm.meta)
    return rewritten
