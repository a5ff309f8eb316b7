"""Rewrite: each costly small value of a step (0-dim, or one per lane of a batch) is computed once per step, not once
per element or vector of elements.

Inductor inlines a pointwise value into every op that reads it unless the value is realized
(``GraphLowering.run_node``). A small value computed from small inputs, such as Adam's bias corrections
(``1 - beta ** step``, its ``sqrt``, ``lr / ...``), therefore lands inside the element loop of the kernel that
reads it. In Inductor's C++ kernel it is evaluated per vector of 8 or 16 floats, and the C++ compiler cannot hoist
it out of the loop, as the kernel's stores may alias the loads it reads: two ``pow`` and a ``sqrt`` per vector made a
bucketed AdamW step on one CPU thread 3.9 times slower than ``fused=True`` at 96 tensors of 4096 floats. A batch of
same-shape lanes (:mod:`optcapture.lane_batches`) reads one such value per lane (shape ``[lanes]``, a per-param
step counter's bias correction, a trust ratio), indexed per element, in float64 where the group's numbers are
device tensors: the C++ kernel computed a float64 ``pow`` per vector, and a Triton kernel per element.

This pass, run by Inductor after its own post-grad passes, realizes each small value (:data:`SMALL_NUMEL` elements
at most) that a larger tensor's op reads, when computing it involves a costly op (:data:`COSTLY`): Inductor then
computes it in a loop nest of its own, once, and the element loop loads it. Cheap values (``1 - lr * weight_decay``,
``step + 1``) stay inlined: realizing them would cost a buffer allocation per step for a few instructions per vector.

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


SMALL_NUMEL = 1024
"""The most elements of a value computed once: a batch's lanes, never a param's elements that its update reads
one for one (a value is realized only where an op over more elements reads it)."""


def _numel(node: Any) -> int | None:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return int(value.numel())
    except (TypeError, RuntimeError):  # a symbolic size: not a value of the step's numbers
        return None


def is_small(node: Any) -> bool:
    numel = _numel(node)
    return numel is not None and numel <= SMALL_NUMEL


def _reads_as_larger(node: torch.fx.Node) -> bool:
    """Some op over more elements than ``node`` has reads ``node``."""
    numel = _numel(node)
    assert numel is not None
    return any((user_numel := _numel(user)) is not None and user_numel > numel for user in node.users)


def _is_costly(node: torch.fx.Node) -> bool:
    return getattr(node.target, "overloadpacket", None) in COSTLY


def scalars_to_realize(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The small values read by larger ops whose computation (back to the inputs, or to another such value)
    holds a costly op, in graph order."""
    frontier = [node for node in graph.nodes
                if node.op == "call_function" and is_small(node) and _reads_as_larger(node)]
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
                         if arg.op == "call_function" and is_small(arg) and arg not in stops)
    return chosen


def realize_costly_scalars(graph: torch.fx.Graph) -> None:
    for node in scalars_to_realize(graph):
        _compat.realize_in_own_buffer(node)


def inductor_pass() -> Any:
    """The pass for ``post_grad_custom_post_pass`` (one instance per call; Inductor's cache keys on its source)."""
    return _compat.post_grad_pass(realize_costly_scalars, __file__)
