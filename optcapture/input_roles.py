"""Stage 1, discovery's input mapping: what each input of a graph is to one optimizer, found by tensor identity.

Roles: ``param``, ``grad``, ``state`` (a per-param tensor of ``optimizer.state``), ``scalar_state``
(a 0-dim one: step counters, NAdam's mu_product, ASGD's eta/mu), ``member_number`` (a Python int of a param's
state Dynamo made symbolic: ``state["step"] += 1``), ``hyper`` (a param-group value
Dynamo lifted to an input), ``global_state`` (a tensor ``optimizer.state`` keeps under a key that is
no param), ``layout`` and ``other``. The predicates that tell per-element state from scalar state live here
too: preparation homes state by the same rule, so a tensor is flat storage's exactly when discovery called it
``state``.

Invariant: mapping only reads: it never mutates the optimizer, its tensors or the graph. A tensor input's role
comes from its identity alone, a number's from its source (or from being a grad's layout and read by no op); a
number of a param's state only where its source names the same param as a state tensor of the graph found by
identity, and that param's state holds a Python int there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch.fx import GraphModule, Node

from optcapture import _compat, dtensors, lanes
from optcapture.sources import hyper_source, member_source

RoleKind = Literal["param", "grad", "state", "scalar_state", "member_number", "hyper", "global_state", "layout",
                   "other"]
"""``layout``: a number Dynamo passes only to describe where a grad lies (the storage offset of a view into a
reduce-scatter output or a bucket): no op of the graph reads it."""


@dataclasses.dataclass(frozen=True)
class InputRole:
    """The role of one graph input (a placeholder or a lifted attribute)."""

    node: str
    source: str | None
    kind: RoleKind
    group: int | None = None
    param_index: int | None = None
    key: str | None = None

    def describe(self) -> str:
        where = "" if self.group is None else f" group {self.group}" + (
            "" if self.param_index is None else f" param {self.param_index}")
        key = "" if self.key is None else f" [{self.key}]"
        return f"{self.node}: {self.kind}{where}{key}" + (f" <- {self.source}" if self.source else "")


def per_element_state_keys(optimizer: torch.optim.Optimizer) -> frozenset[str]:
    """State keys holding a tensor of the param's shape (``exp_avg``), told from scalars (step counters) by what
    params with dimensions store: a 0-dim param's ``exp_avg`` is per-element state too (CLIP's ``logit_scale``).
    A key under which a param of several elements keeps a one-element tensor is one number per param, a scalar
    like ``step``, whatever its dimensions (pytorch_optimizer's QHAdam keeps ``beta1_weight`` of shape ``(1,)``)."""
    keys: dict[str, bool] = {}
    for p, state in optimizer.state.items():
        if isinstance(p, torch.Tensor) and p.dim() > 0 and isinstance(state, dict):
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    one_number = value.numel() == 1 and p.numel() > 1
                    keys[key] = keys.get(key, True) and not one_number
    return frozenset(key for key, per_element in keys.items() if per_element)


def global_state(optimizer: torch.optim.Optimizer) -> dict[Any, torch.Tensor]:
    """Tensors ``optimizer.state`` keeps under a key that is not a param (``self.state["k"]``: MADGRAD's step
    counter): one value for the whole step, read and written by every call, like a hyperparameter the step owns."""
    return {key: value for key, value in optimizer.state.items()
            if not isinstance(key, torch.Tensor) and isinstance(value, torch.Tensor)}


def is_per_element_state(p: torch.Tensor, key: str, value: torch.Tensor, per_element: frozenset[str]) -> bool:
    """``per_element``: :func:`per_element_state_keys` of the optimizer."""
    if p.dim() == 0 or value.numel() == 1:
        return key in per_element
    return bool(value.dim() > 0)


def _identity_roles(optimizer: torch.optim.Optimizer) -> dict[int, tuple[RoleKind, int | None, int | None, str | None]]:
    roles: dict[int, tuple[RoleKind, int | None, int | None, str | None]] = {}
    per_element = per_element_state_keys(optimizer)
    for key, value in global_state(optimizer).items():
        roles[id(value)] = ("global_state", None, None, str(key))
    for g, group in enumerate(optimizer.param_groups):
        for key, value in group.items():
            items = value if isinstance(value, tuple) else (value,)
            for index, item in enumerate(items):
                if isinstance(item, torch.Tensor):
                    roles[id(item)] = ("hyper", g, None, key if len(items) == 1 and not isinstance(value, tuple)
                                       else f"{key}[{index}]")
        for i, p in enumerate(group["params"]):
            roles[id(p)] = ("param", g, i, None)
            if p.grad is not None:
                roles[id(p.grad)] = ("grad", g, i, None)
            for key, value in state_of(optimizer, p).items():
                if isinstance(value, torch.Tensor):
                    kind: RoleKind = "state" if is_per_element_state(p, key, value, per_element) else "scalar_state"
                    roles[id(value)] = (kind, g, i, key)
    return roles


def state_of(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict[Any, Any]:
    state = optimizer.state.get(p)
    return state if isinstance(state, dict) else {}


def _grad_layout_symbols(placeholders: list[Node], values: dict[Node, Any],
                         identity: dict[int, tuple[RoleKind, int | None, int | None, str | None]]) -> set[Node]:
    """The number inputs that only say where grads lie: Dynamo passes the storage offset of a grad that views a
    larger buffer (FSDP2's reduce-scatter output, DDP's buckets) as a symbol, and no op reads it. Grads are
    copied or read where they lie at every step, so such a number is no part of the update; a symbol any op
    reads, or one that is a size (the update's shape would change with it), is not one of these."""
    grads = [n for n in placeholders if isinstance(values.get(n), torch.Tensor)
             and identity.get(id(values[n]), ("other",))[0] == "grad"]
    symbols = set()
    for node in grads:
        example = node.meta.get("example_value")
        if not isinstance(example, torch.Tensor):
            continue
        where = dtensors.local(example)
        symbols |= {str(number.node.expr) for number in (where.storage_offset(), *where.stride())
                    if isinstance(number, torch.SymInt)}
    sizes = {str(size.node.expr) for node in placeholders if isinstance(node.meta.get("example_value"), torch.Tensor)
             for tensor in (node.meta["example_value"], dtensors.local(node.meta["example_value"]))
             for size in tensor.shape if isinstance(size, torch.SymInt)}
    symbols -= sizes
    found = set()
    for node in placeholders:
        example = node.meta.get("example_value")
        if isinstance(example, torch.SymInt) and not node.users and str(example.node.expr) in symbols:
            found.add(node)
    return found


@dataclasses.dataclass
class InputMap:
    """What each input of a graph is to one optimizer, found by tensor identity (see :func:`map_inputs`)."""

    roles: list[InputRole]
    lane_inputs: dict[Node, tuple[lanes.LaneId | None, str]]
    """The inputs :func:`optcapture.lanes.analyze` follows, by lane ((group, index), or None: read by every lane)."""
    present: dict[int, list[int]]
    """Param group -> indices of the params whose grad is an input."""


def input_values(gm: GraphModule, example_inputs: Sequence[Any]) -> dict[Node, Any]:
    """The value of each placeholder (from ``example_inputs``) and lifted attribute of ``gm``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values: dict[Node, Any] = {n: example_inputs[i] for i, n in enumerate(placeholders) if i < len(example_inputs)}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            values[n] = getattr(gm, str(n.target), None)
    return values


def map_inputs(gm: GraphModule, values: dict[Node, Any], optimizer: torch.optim.Optimizer | None) -> InputMap:
    """The role of each input of ``gm`` (``values``: :func:`input_values`) to ``optimizer``: its tensors are told
    apart by identity, the numbers Dynamo lifted from its param groups by their source."""
    nodes = [n for n in gm.graph.nodes if n.op in ("placeholder", "get_attr")]
    placeholders = [n for n in nodes if n.op == "placeholder"]
    identity = _identity_roles(optimizer) if optimizer is not None else {}
    layout = _grad_layout_symbols(placeholders, values, identity)
    roles: list[InputRole] = []
    lane_inputs: dict[Node, tuple[lanes.LaneId | None, str]] = {}
    present: dict[int, list[int]] = {}
    members = _state_positions(nodes, values, identity)
    for n in nodes:
        source = _compat.placeholder_source(n) if n.op == "placeholder" else None
        value = values.get(n)
        hit = identity.get(id(value)) if isinstance(value, torch.Tensor) else None
        if hit is not None and hit[0] in ("hyper", "global_state"):
            kind, g, _, key = hit
            roles.append(InputRole(n.name, source, kind, g, None, key))
            lane_inputs[n] = (None, f"{kind}:{key}")
            continue
        if hit is not None:
            kind, g, i, key = hit
            assert g is not None and i is not None
            roles.append(InputRole(n.name, source, kind, g, i, key))
            lane_inputs[n] = ((g, i), kind if key is None else f"{kind}:{key}")
            if kind == "grad":
                present.setdefault(g, []).append(i)
            continue
        hyper = hyper_source(source or "")
        member = _member_number(optimizer, source, value, members)
        if member is not None:
            g, i, key = member
            roles.append(InputRole(n.name, source, "member_number", g, i, key))
            lane_inputs[n] = ((g, i), f"member_number:{key}")
        elif n in layout:
            roles.append(InputRole(n.name, source, "layout"))
            lane_inputs[n] = (None, "layout")
        elif hyper is not None and hyper.whole:
            roles.append(InputRole(n.name, source, "hyper", hyper.group, None, hyper.role_key))
            lane_inputs[n] = (None, f"hyper:{hyper.role_key}")
        else:
            roles.append(InputRole(n.name, source, "other"))
    return InputMap(roles, lane_inputs, present)


def _state_positions(nodes: list[Node], values: dict[Node, Any],
                     identity: dict[int, tuple[RoleKind, int | None, int | None, str | None]],
                     ) -> dict[tuple[str, int], lanes.LaneId]:
    """(owner source, position among the state dict's keys) -> lane, from the state tensors of the graph found by
    identity: what a state entry's source (:func:`optcapture.sources.member_source`) names, proved."""
    found: dict[tuple[str, int], lanes.LaneId] = {}
    for n in nodes:
        value = values.get(n)
        hit = identity.get(id(value)) if isinstance(value, torch.Tensor) else None
        member = member_source(_compat.placeholder_source(n) or "") if n.op == "placeholder" else None
        if hit is not None and member is not None and hit[0] in ("state", "scalar_state") \
                and hit[1] is not None and hit[2] is not None:
            found[(member.owner, member.position)] = (hit[1], hit[2])
    return found


def _member_number(optimizer: torch.optim.Optimizer | None, source: str | None, value: Any,
                   members: dict[tuple[str, int], lanes.LaneId]) -> tuple[int, int, str] | None:
    """(group, param index, key) when the input ``value`` (an int, or the SymInt Dynamo made of one) is
    ``optimizer.state[p][key]`` of a param ``p`` whose state tensors the graph reads too, holding a Python int."""
    if optimizer is None or source is None or not isinstance(value, (int, torch.SymInt)) or isinstance(value, bool):
        return None
    member = member_source(source)
    lane = members.get((member.owner, member.position)) if member is not None else None
    if member is None or lane is None:
        return None
    g, i = lane
    p = optimizer.param_groups[g]["params"][i]
    keys = list(optimizer.state)
    if member.position >= len(keys) or keys[member.position] is not p:
        return None
    return (g, i, member.key) if type(state_of(optimizer, p).get(member.key)) is int else None
