"""Rewrite (CPU): each costly 0-dim value of a step is computed once per step, not once per vector of elements.

Inductor inlines a pointwise value into every op that reads it unless the value is realized
(``GraphLowering.run_node``). A 0-dim value computed from 0-dim inputs, such as Adam's bias corrections
(``1 - beta ** step``, its ``sqrt``, ``lr / ...``), therefore lands inside the element loop of the kernel that
reads it. On the GPU that costs nothing (a Triton program computes it once per block); in Inductor's C++ kernel it
is evaluated per vector of 8 or 16 floats, and the C++ compiler cannot hoist it out of the loop, as the kernel's
stores may alias the loads it reads. Two ``pow`` and a ``sqrt`` per vector made a bucketed AdamW step on one CPU
thread 3.9 times slower than ``fused=True`` at 96 tensors of 4096 floats.

This pass, run by Inductor after its own post-grad passes, realizes each 0-dim value that a larger tensor's op
reads, when computing it involves a costly op (:data:`COSTLY`): Inductor then computes it in a loop nest of its
own, once, and the element loop loads it. Cheap values (``1 - lr * weight_decay``, ``step + 1``) stay inlined:
realizing them would cost a buffer allocation per step for a few scalar instructions per vector.

Invariant: the pass only marks nodes; it never changes what the graph computes.
"""

from __future__ import annotations

from typing import Any

import torch

from optcapture import _compat

aten = torch.ops.aten
COSTLY = frozenset({
    aten.pow, aten.sqrt, aten.rsqrt, aten.div, aten.reciprocal, aten.exp, aten.exp2, aten.expm1, aten.log,
    aten.log2, aten.log10, aten.log1p, aten.tanh, aten.sigmoid, aten.sin, aten.cos, aten.atan2, aten.fmod,
    aten.remainder, aten.erf,
})
"""Ops whose scalar evaluation costs tens of cycles or a libm call: a division, a root, a power, a transcendental."""


def is_scalar(node: Any) -> bool:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dim() == 0


def _reads_as_larger(node: torch.fx.Node) -> bool:
    """Some op over more than one element reads ``node``."""
    return any(isinstance(user.meta.get("val"), torch.Tensor) and not is_scalar(user) for user in node.users)


def _is_costly(node: torch.fx.Node) -> bool:
    return getattr(node.target, "overloadpacket", None) in COSTLY


def scalars_to_realize(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The 0-dim values read by larger ops whose computation (back to the inputs, or to another such value)
    holds a costly op, in graph order."""
    frontier = [node for node in graph.nodes
                if node.op == "call_function" and is_scalar(node) and _reads_as_larger(node)]
    stops = set(frontier)
    chosen = []
    for node in frontier:
        seen: set[torch.fx.Node] = set()
        stack = [node]
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            if _is_costly(current):
                chosen.append(node)
                break
            stack.extend(arg for arg in current.all_input_nodes
                         if arg.op == "call_function" and is_scalar(arg) and arg not in stops)
    return chosen


def realize_costly_scalars(graph: torch.fx.Graph) -> None:
    for node in scalars_to_realize(graph):
        _compat.realize_in_own_buffer(node)


def inductor_pass() -> Any:
    """The pass for ``post_grad_custom_post_pass`` (one instance per call; Inductor's cache keys on its source)."""
    return _compat.post_grad_pass(realize_costly_scalars, __file__)
