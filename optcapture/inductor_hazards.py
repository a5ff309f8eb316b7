"""Stage 1, discovery's check for programs Inductor is known to compile wrong, so that they run as Dynamo traced them.

One is known (torch 2.13, and stock ``torch.compile`` alike): a step that copies a tensor into a state tensor and
then updates that tensor in place (``state["old"].copy_(p); p.sub_(lr * p.grad)``, a Lookahead-style snapshot).
Inductor fuses both into one kernel that stores the *updated* param into ``old``; AOTAutograd alone
(``backend="aot_eager"``) is right. Since every Inductor path (bucketed or per tensor) compiles such a program, the
step runs as traced.

Invariant: only reads the graph; a hazard is named by the nodes that make it.
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from optcapture.lanes import called_name, in_place, written_argument

_MOVES_NO_VALUE = frozenset({"clone", "contiguous", "detach", "to", "_to_copy", "alias", "view", "view_as", "reshape",
                             "flatten"})


def _input_behind(value: object) -> Node | None:
    """The graph input ``value`` is, or copies or views through ops that move no value; None otherwise."""
    while isinstance(value, Node) and value.op in ("call_function", "call_method"):
        name = called_name(value)
        if name not in _MOVES_NO_VALUE and not in_place(name):
            return None
        value = value.args[0] if value.args else None
    return value if isinstance(value, Node) and value.op in ("placeholder", "get_attr") else None


def copied_then_updated(gm: GraphModule) -> str | None:
    """Why Inductor would compile ``gm`` wrong: an input copied into another input and written in place after the
    copy; None when no such pair is in the graph."""
    copied: dict[Node, Node] = {}  # source input -> the node that copied it
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        name = called_name(node)
        if name == "copy_" and len(node.args) >= 2:
            target, source = _input_behind(node.args[0]), _input_behind(node.args[1])
            if target is not None and source is not None and target is not source:
                copied.setdefault(source, node)
            continue
        written = _input_behind(written_argument(node, name))
        if written is not None and written in copied:
            return (f"it copies {written.name} into another tensor ({copied[written].name}) and then updates "
                    f"{written.name} in place ({node.name}), which Inductor compiles into one kernel that stores the "
                    "updated value into the copy (torch 2.13, stock torch.compile alike)")
    return None
