"""Stage 3, batched lanes: the numbers of the param groups a lane program reads, as device tensors.

Dynamo passes a Python number of a param group it has made dynamic as a graph input: an int the step counts in its
groups (``group["step"] += 1``, pytorch_optimizer's StableAdamW) as a ``SymInt``, a float (``lr``) as a float64 0-dim
tensor it takes ``item()`` of. The batched program (:mod:`optcapture.lane_batches`) has no Dynamo frame to pass them
through: each is read instead from the device tensor :class:`~optcapture.preparation.PreparedOptimizer` keeps for
that group entry (float64, as on the elementwise path), written with the live value before every step
(:meth:`~optcapture.preparation.PreparedOptimizer.refresh_hypers`). The program's arithmetic on those numbers
becomes tensor arithmetic (:func:`numbers_as_tensors`).

A Python int of each param's own state (``state["step"] += 1``: timm's AdaBelief, RAdamLegacy) comes in as one
graph input per param; a batch reads the numbers of its members from one float64 vector of one value per member
(:class:`MemberNumbers`, written from the graph's inputs before every step), which vmap hands each lane as its own
0-dim tensor, and the program's arithmetic on it is rewritten the same way.

Invariant: a number is read from a device tensor only where the group (or the param's state) holds a Python int or
float at the source Dynamo read it from, and every use of it in the program is either arithmetic that tensors do as
Python numbers do (``operator`` functions, ``sqrt``) or an argument rewritten to take a tensor with the same value
(``add(x, y, alpha=a)`` -> ``add(x, y * a)``); any other use refuses the batches with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node

from optcapture import _compat
from optcapture.discovery import StepGraph
from optcapture.errors import CaptureError
from optcapture.hyper_probe import HyperKey
from optcapture.lanes import called_name
from optcapture.preparation import PreparedOptimizer
from optcapture.shadows import hyper_candidates
from optcapture.sources import HyperSource, hyper_source, is_hyper_source

log = logging.getLogger(__name__)

def floats_held_constant(step: StepGraph) -> set[HyperKey]:
    """(group, key) of each float (or tuple of floats) of a stepped group that the graph does not read as an input:
    Dynamo holds it as a constant, so each new value (an LR scheduler's) would compile the step again."""
    optimizer = step.optimizer
    if optimizer is None:
        return set()
    read = {(source.group, source.key) for source in _sources_read(step)}
    return hyper_candidates(optimizer, (bucket.key.group for bucket in step.buckets)) - read


def trace_floats_as_inputs(step: StepGraph) -> None:
    """From the backend, at a lane-local capture: raise Dynamo's restart request, so that it traces the step again now
    with the floats of :func:`floats_held_constant` as inputs (once per float: a float Dynamo specializes anyway is
    not asked for again). A scheduler changing them then never compiles the step again.

    A float the graph holds as a bound of ``clamp`` stays a constant: that is how Dynamo traces ``max(tensor,
    group["gamma"])`` (pytorch_optimizer's RACS), and with the float an input Dynamo breaks the graph there, inside
    the step's loop over params, and runs the whole step uncompiled (torch/_dynamo/symbolic_convert.py, "graph break
    in loop"). A scheduler changing it compiles the step again, as it would with stock ``torch.compile``."""
    bounds = _clamp_bounds(step.graph) if step.graph is not None else set()
    optimizer = step.optimizer
    constants = {(g, key) for g, key in floats_held_constant(step) if optimizer is None
                 or not _floats_of(optimizer.param_groups[g].get(key)) & bounds}
    if constants and _compat.mark_floats_as_inputs(lambda name: is_hyper_source(name, constants)):
        log.info("tracing the step again with its floats %s as inputs", sorted(constants))
        raise _compat.restart_request()


_CLAMPS = frozenset({"clamp", "clamp_min", "clamp_max", "clip"})


def _clamp_bounds(gm: GraphModule) -> set[float]:
    """The float constants ``gm`` passes as a bound of a clamp."""
    bounds: set[float] = set()
    for node in gm.graph.nodes:
        if called_name(node) in _CLAMPS:
            bounds |= {value for value in (*node.args[1:], *node.kwargs.values()) if type(value) is float}
    return bounds


def _floats_of(value: Any) -> set[float]:
    """A param-group value's floats (a tuple's items: ``betas``)."""
    items = value if isinstance(value, tuple) else (value,)
    return {item for item in items if type(item) is float}


def trace_floats_as_constants(gm: GraphModule, why: str) -> None:
    """From the backend, when batching ``gm`` failed: raise Dynamo's restart request if ``gm`` reads floats of the
    param groups as inputs, so that the step is traced again with them as constants, as Dynamo held them before
    :func:`trace_floats_as_inputs` (a constant batches where a float an op needs as a number cannot, and the
    per-tensor graph is the one it was)."""
    if _compat.specialize_float_inputs(gm, lambda name: hyper_source(name) is not None):
        log.info("tracing the step again with its floats as constants: batching failed (%s)", why)
        raise _compat.restart_request()


def _sources_read(step: StepGraph) -> Iterable[HyperSource]:
    for role in step.roles:
        if role.kind == "hyper" and role.source is not None:
            source = hyper_source(role.source)
            if source is not None and source.whole:
                yield source


def live_number(optimizer: torch.optim.Optimizer, source: HyperSource) -> int | float | None:
    """The Python int or float the group holds at ``source`` now, or None (a tensor, a bool, anything else)."""
    if source.group >= len(optimizer.param_groups):
        return None
    value = optimizer.param_groups[source.group].get(source.key)
    if source.index is not None:
        value = value[source.index] if isinstance(value, tuple) and source.index < len(value) else None
    return value if type(value) in (int, float) else None


def device_number(optimizer: torch.optim.Optimizer, prepared: PreparedOptimizer, source: HyperSource,
                  device: torch.device) -> torch.Tensor | None:
    """The device tensor that holds the number at ``source`` for every step, or None when the group holds no
    Python number there."""
    value = live_number(optimizer, source)
    if value is None:
        return None
    return prepared.hyper(source.group, source.key, source.index, device, value)


# A float64 holds every int up to this exactly; past it ``s + 1`` would round where Python's int does not.
_EXACT_INTS = 2**53


@dataclasses.dataclass
class MemberNumbers:
    """One number of each member's state for one batch of lanes (``state[p]["step"]``), as the float64 vector
    ``vector`` (one value per member, in the batch's order) that the batched program reads."""

    vector: torch.Tensor
    inputs: tuple[int, ...]
    """The graph input that passes each member's number (Dynamo reads ``state[p]["step"]`` at every call)."""
    last: tuple[Any, ...] | None = None

    def write(self, args: Sequence[Any]) -> None:
        """Before every step: the live numbers, from the graph's inputs (only when they changed). Raises
        :class:`CaptureError`, writing nothing, when one is not an int that a float64 holds exactly (the step must not
        run on it)."""
        values = tuple(args[i] for i in self.inputs)
        if values == self.last:
            return
        if any(type(value) is not int or abs(value) > _EXACT_INTS for value in values):
            raise CaptureError(f"a number of a param's state is not an int a float64 holds exactly (|n| <= 2**53): "
                               f"{next(v for v in values if type(v) is not int or abs(v) > _EXACT_INTS)!r}")
        self.vector.copy_(torch.tensor(values, dtype=torch.float64))
        self.last = values


# Number arithmetic Dynamo records as Python functions: the same functions compute it on 0-dim tensors...
_TENSOR_ALIKE = frozenset({operator.add, operator.sub, operator.mul, operator.truediv, operator.pow, operator.neg,
                           operator.pos, operator.abs, operator.iadd, operator.isub, operator.imul, operator.itruediv})
# ...or a torch function does.
_AS_TENSOR_OP: dict[Any, Callable[..., Any]] = {math.sqrt: torch.sqrt, math.pow: torch.pow, math.exp: torch.exp,
                                                math.log: torch.log}
# Dynamo records ``math.sqrt`` of a symbolic number as ``torch._sym_sqrt`` (``sym_sqrt`` in other versions).
_AS_TENSOR_OP.update({getattr(torch, name): torch.sqrt for name in ("_sym_sqrt", "sym_sqrt") if hasattr(torch, name)})


def _larger(a: Any, b: Any) -> Any:
    """Python's ``max(a, b)`` (``sym_max``) where one of them is a tensor."""
    return torch.where(b > a, b, a)


def _smaller(a: Any, b: Any) -> Any:
    """Python's ``min(a, b)`` (``sym_min``) where one of them is a tensor."""
    return torch.where(b < a, b, a)


for _target, _as_tensor in ((getattr(torch, "sym_max", None), _larger), (getattr(torch, "sym_min", None), _smaller)):
    if _target is not None:
        _AS_TENSOR_OP[_target] = _as_tensor
# The value itself: a number Dynamo passes as a tensor (``item``) or makes a float (``sym_float``).
_SAME_VALUE = frozenset({"item", "sym_float", "float"})
# Arguments of tensor ops that must be Python numbers, and the rewrite that passes the tensor instead.
_ALPHA_OPS = frozenset({"add", "add_", "sub", "sub_"})
_VALUE_OPS = frozenset({"addcmul", "addcmul_", "addcdiv", "addcdiv_"})
_WEIGHT_OPS = frozenset({"lerp", "lerp_"})


def numbers_as_tensors(program: GraphModule, numbers: Iterable[Node]) -> None:
    """Rewrite ``program`` in place so that its placeholders ``numbers``, which Dynamo traced as Python numbers (or
    as tensors it takes ``item()`` of), can be 0-dim float64 tensors holding the same values."""
    graph = program.graph
    marked: set[Node] = set(numbers)
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method") or not any(arg in marked for arg in node.all_input_nodes):
            continue
        name = called_name(node)
        example = node.meta.get("example_value")
        if name in _SAME_VALUE and len(node.args) == 1:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.target in _TENSOR_ALIKE:
            if not isinstance(example, torch.Tensor):
                marked.add(node)
        elif node.target in _AS_TENSOR_OP and not isinstance(example, torch.Tensor):
            node.target = _AS_TENSOR_OP[node.target]
            marked.add(node)
        elif example is not None and not isinstance(example, (torch.Tensor, list, tuple)):
            raise CaptureError(f"the update computes {name} of a hyperparameter as a Python number")
        else:
            _pass_tensors(graph, node, name, marked)
    graph.lint()
    program.recompile()


def _pass_tensors(graph: torch.fx.Graph, node: Node, name: str, marked: set[Node]) -> None:
    """Rewrite the number arguments of tensor op ``node`` that only take a Python number to take the tensor."""
    kwargs = dict(node.kwargs)
    args = list(node.args)
    if name in _ALPHA_OPS and kwargs.get("alpha") in marked and len(args) == 2:
        # x + alpha * y: eager multiplies y by alpha in x's precision, as y * alpha (a 0-dim float64 tensor) does.
        with graph.inserting_before(node):
            scaled = graph.call_function(operator.mul, (args[1], kwargs.pop("alpha")))
        args[1] = scaled
    elif name in _VALUE_OPS and kwargs.get("value") in marked and len(args) == 3:
        # x + value * a * b (or value * a / b): the value scales a.
        with graph.inserting_before(node):
            scaled = graph.call_function(operator.mul, (args[1], kwargs.pop("value")))
        args[1] = scaled
    elif name in _WEIGHT_OPS:
        # A tensor weight must have the inputs' dtype; eager rounds a float weight to it too.
        at = "weight" if "weight" in kwargs else 2 if len(args) > 2 else None
        weight = kwargs.get("weight") if at == "weight" else args[2] if at == 2 else None
        if isinstance(weight, Node) and weight in marked:
            with graph.inserting_before(node):
                cast = graph.call_method("type_as", (weight, args[0]))
            if at == "weight":
                kwargs["weight"] = cast
            else:
                args[2] = cast
    node.args, node.kwargs = tuple(args), kwargs
