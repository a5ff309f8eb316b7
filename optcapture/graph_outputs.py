"""What a captured graph returns to its frame, computed without running the graph's kernels.

A step's graph returns numbers the frame writes back (``group["step"] = s0 + 1``) and input tensors it stores
again; :func:`host_outputs` rebuilds exactly those from the graph's inputs, so a bucketed capture, which never runs
the graph itself, still gives the frame what it expects. Invariant: it reads the graph and never changes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.fx import GraphModule, Node

from optcapture.errors import CaptureError


def host_outputs(gm: GraphModule) -> Callable[..., Any] | None:
    """``gm``'s outputs computed from its inputs without running its kernels, when it returns no new tensor:
    numbers the frame writes back after the graph (``group["step"] = s0 + 1``) and input tensors it stores again
    (``state["step"] += 1`` outputs the counter it increments in place). None when the graph returns a tensor it
    creates (lazily made state), which only the graph itself can give."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    inputs = {id(n.meta.get("example_value")): n for n in gm.graph.nodes if n.op in ("placeholder", "get_attr")
              and isinstance(n.meta.get("example_value"), torch.Tensor)}
    needed: set[Node] = set()
    replaced: dict[Node, Node] = {}
    stack = list(output.all_input_nodes)
    while stack:
        node = stack.pop()
        if node in needed or node in replaced:
            continue
        example = node.meta.get("example_value")
        if node.op not in ("placeholder", "get_attr") and isinstance(example, torch.Tensor):
            if id(example) not in inputs:
                return None
            replaced[node] = inputs[id(example)]  # an in-place op's result: the input tensor itself
            stack.append(replaced[node])
            continue
        if node.op not in ("placeholder", "get_attr", "call_function", "call_method"):
            return None
        needed.add(node)
        stack.extend(node.all_input_nodes)
    if not needed:
        value = output.args[0]
        empty = type(value)() if isinstance(value, (list, tuple)) else None
        return lambda *args: empty
    graph = torch.fx.Graph()
    env: dict[Node, Node] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
        elif node in needed:
            env[node] = graph.node_copy(node, lambda arg: env[replaced.get(arg, arg)])
    graph.output(torch.fx.map_arg(output.args[0], lambda arg: env[replaced.get(arg, arg)]))
    forward: Callable[..., Any] = torch.fx.GraphModule(gm, graph).forward  # gm: the attributes it reads
    return forward


def outputs_or_error(gm: GraphModule) -> Callable[..., Any]:
    """The graph's outputs from its inputs, for a graph that returns no tensor (checked by discovery)."""
    outputs = host_outputs(gm)
    if outputs is None:
        raise CaptureError("the step returns tensors to its frame")
    return outputs
