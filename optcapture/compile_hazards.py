"""Stage 1, discovery's check for programs ``torch.compile`` is known to compile wrong, so that they run as Dynamo
traced them (both are wrong with stock ``torch.compile`` on torch 2.13 too; every path of optcapture but the traced
graph compiles the same program):

- :func:`copied_then_updated`: a step that copies a tensor into a state tensor and then updates that tensor in place
  (``state["old"].copy_(p); p.sub_(lr * p.grad)``, a Lookahead-style snapshot). Inductor fuses both into one kernel
  that stores the *updated* param into ``old``; AOTAutograd alone (``backend="aot_eager"``) is right.
- :func:`float64_scalar_updated`: a step that updates a 0-dim float64 tensor on the CPU in place (a bias-correction
  product kept in the params' dtype, ``torch.ones((), dtype=p.dtype)`` beside float64 params). AOTAutograd drops the
  update (``backend="aot_eager"`` and ``"inductor"``; the tensor keeps its value); a 1-element or float32 tensor,
  and the ``eager`` backend, are right.

Invariant: only reads the graph; a hazard is named by the nodes that make it.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from optcapture.lanes import called_name, input_behind, written_argument


def hazard(gm: GraphModule) -> str | None:
    """Why ``torch.compile`` would compute ``gm`` wrong; None when no known hazard is in it."""
    return copied_then_updated(gm) or float64_scalar_updated(gm)


def float64_scalar_updated(gm: GraphModule) -> str | None:
    """Why AOTAutograd would drop an update of ``gm``: an input that is a 0-dim float64 CPU tensor written in place;
    None when there is none."""
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        written = input_behind(written_argument(node, called_name(node)), through_in_place=True)
        if written is None:
            continue
        example = written.meta.get("example_value")
        if (isinstance(example, torch.Tensor) and example.dim() == 0 and example.dtype == torch.float64
                and example.device.type == "cpu"):
            return (f"it updates {written.name}, a 0-dim float64 tensor on the CPU, in place ({node.name}), an update "
                    "AOTAutograd drops (torch 2.13, stock torch.compile alike)")
    return None


def copied_then_updated(gm: GraphModule) -> str | None:
    """Why Inductor would compile ``gm`` wrong: an input copied into another input and written in place after the
    copy; None when no such pair is in the graph."""
    copied: dict[Node, Node] = {}  # source input -> the node that copied it
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        name = called_name(node)
        if name == "copy_" and len(node.args) >= 2:
            target = input_behind(node.args[0], through_in_place=True)
            source = input_behind(node.args[1], through_in_place=True)
            if target is not None and source is not None and target is not source:
                copied.setdefault(source, node)
            continue
        written = input_behind(written_argument(node, name), through_in_place=True)
        if written is not None and written in copied:
            return (f"it copies {written.name} into another tensor ({copied[written].name}) and then updates "
                    f"{written.name} in place ({node.name}), which Inductor compiles into one kernel that stores the "
                    "updated value into the copy (torch 2.13, stock torch.compile alike)")
    return None
