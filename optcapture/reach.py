"""Which optimizers a compiled frame can reach, and whether a graph is a piece of an optimizer's step.

Used by discovery (stage 1) to find the optimizer a graph belongs to. Invariant: only reads; nothing here
touches an optimizer, its tensors or the graph.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterable
from typing import Any

import torch
from torch.fx import GraphModule, Node


def candidate_optimizers(values: Iterable[Any]) -> list[torch.optim.Optimizer]:
    """The optimizers among ``values``, their items (a list or tuple) and their attributes (not a module's)."""
    found: dict[int, torch.optim.Optimizer] = {}
    for value in values:
        nested: list[Any] = [value]
        if isinstance(value, (tuple, list)):
            nested.extend(value)
        elif hasattr(value, "__dict__") and not isinstance(value, torch.nn.Module):
            nested.extend(vars(value).values())
        for item in nested:
            if isinstance(item, torch.optim.Optimizer):
                found[id(item)] = item
    return list(found.values())


def globals_read(tracer: Any | None) -> list[Any]:
    """The module globals the frame's code names: a user's step function often reaches its optimizer there."""
    code, f_globals = getattr(tracer, "f_code", None), getattr(tracer, "f_globals", None)
    if code is None or f_globals is None:
        return []
    return [f_globals[name] for name in code.co_names if name in f_globals]


def touches_optimizer(gm: GraphModule, values: dict[Node, Any], candidates: Iterable[torch.optim.Optimizer]) -> bool:
    """Whether the graph reads a state tensor of any of ``candidates`` or writes one of their params (or any
    ``nn.Parameter``) in place: a piece of some optimizer's step even where no single owner claims it. Reading
    grads is not enough: the forward of a training step reads params, and clipping (``clip_grad_norm_``) reads
    and scales grads."""
    state_ids: set[int] = set()
    param_ids: set[int] = set()
    for optimizer in candidates:
        param_ids.update(id(p) for group in optimizer.param_groups for p in group["params"])
        for state in optimizer.state.values():
            values_of_state = state.values() if isinstance(state, dict) else (state,)
            state_ids.update(id(v) for v in values_of_state if isinstance(v, torch.Tensor))
    if any(id(v) in state_ids for v in values.values()):
        return True
    # Any nn.Parameter counts: Dynamo may compile a function inside a step on its own (``_single_tensor_sgd``
    # after the step's own frame was given up), where no optimizer is in reach.
    params = {n for n, v in values.items() if id(v) in param_ids or isinstance(v, torch.nn.Parameter)}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if not name.endswith("_") or name.endswith("__") or not node.args:
            continue
        written = node.args[0] if isinstance(node.args[0], (list, tuple)) else (node.args[0],)
        if any(isinstance(t, Node) and t in params for t in written):
            return True
    return False


def step_codes(optimizer: torch.optim.Optimizer) -> set[Any]:
    return codes_of(type(optimizer).step)


def codes_of(fn: Any) -> set[Any]:
    """The code objects of ``fn`` and of every function it wraps (``__wrapped__``)."""
    codes = set()
    while fn is not None:
        code = getattr(fn, "__code__", None)
        if code is not None:
            codes.add(code)
        fn = getattr(fn, "__wrapped__", None)
    return codes


def optimizer_stepping_below() -> torch.optim.Optimizer | None:
    """The optimizer whose ``step()`` is running in a Python frame below the frame being compiled, or None: when
    Dynamo gives a step's frame up (a graph break it cannot resume from), the step runs as Python and the functions
    it calls are compiled as frames of their own, which reach no optimizer. Read at compile time only: the frame
    being compiled is not on the Python stack yet, so the walk meets optcapture's and Dynamo's frames, then its
    callers."""
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        if isinstance(owner, torch.optim.Optimizer) and frame.f_code in step_codes(owner):
            return owner
        frame = frame.f_back
    return None
