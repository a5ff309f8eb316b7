"""Dynamo's graph breaks as optcapture reads them: the process-wide counts, the reason a graph being compiled ends
where it does, and the functions Dynamo makes to resume a frame after a break.

Invariant: read only; nothing here changes Dynamo's state.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

GraphBreakTally = dict[tuple[str, str], int]
"""How often Dynamo has met each graph break (or unsupported construct) in this process, by (counter, message)."""

# Dynamo's counters by message (torch/_dynamo/utils.py, ``counters``): ``Unsupported.add_to_stats`` counts every
# unsupported construct under "unimplemented", and a graph break again under "graph_break" (torch/_dynamo/exc.py,
# symbolic_convert.py; torch 2.11 and 2.13).
_GRAPH_BREAK_COUNTERS = ("unimplemented", "graph_break")
# ``torch._dynamo.graph_break()``: torch.optim puts one in ``_use_grad`` on purpose (pytorch#104053), around every
# step; never the reason a step was not handed over.
_DELIBERATE_GRAPH_BREAK = "Call to `torch._dynamo.graph_break()`"


def graph_break_tally() -> GraphBreakTally:
    """A copy of Dynamo's process-wide graph-break counts now (read only), for :func:`graph_breaks_since`."""
    from torch._dynamo.utils import counters

    return {(kind, message): count for kind in _GRAPH_BREAK_COUNTERS
            for message, count in counters.get(kind, {}).items()}


def graph_breaks_since(before: GraphBreakTally) -> list[str]:
    """The first line of each graph break Dynamo met since ``before`` was taken (distinct, in the order Dynamo
    counted them), leaving out deliberate ``torch._dynamo.graph_break()`` calls: e.g. "Unsupported Tensor.item() call
    with capture_scalar_outputs=False" (Adafactor's ``step_t.item()``, torch 2.13)."""
    lines: dict[str, None] = {}
    for key, count in graph_break_tally().items():
        first = _first_line_unless_deliberate(key[1]) if count > before.get(key, 0) else None
        if first:
            lines[first] = None
    return list(lines)


def _first_line_unless_deliberate(message: str) -> str | None:
    """A graph break's message as optcapture names it: its first line; None for an empty one or a deliberate
    ``torch._dynamo.graph_break()``."""
    text = message.strip()
    first = text.splitlines()[0].strip() if text else ""
    return None if not first or first.startswith(_DELIBERATE_GRAPH_BREAK) else first


def graph_break_ending(tracer: Any) -> str | None:
    """The first line of the graph break the graph being compiled ends at (Dynamo compiles the frame up to it and
    runs the rest as a function of its own), or None when the graph ends with the frame (its ``return``) or at a
    deliberate ``torch._dynamo.graph_break()``. Read from ``OutputGraph.compile_subgraph_reason``
    (torch/_dynamo/output_graph.py, a ``GraphCompileReason``; torch 2.11 and 2.13)."""
    reason = getattr(getattr(tracer, "output", None), "compile_subgraph_reason", None)
    if reason is None or not getattr(reason, "graph_break", False):
        return None
    text = str(getattr(reason, "reason", "")).strip() or "a graph break"
    return _first_line_unless_deliberate(text)


# The function Dynamo makes to resume a frame after a graph break: ``torch_dynamo_resume_in_<name>_at_<line>``
# (torch/_dynamo/resume_execution.py, ``ContinueExecutionCache.generate``; torch 2.11 and 2.13).
_RESUME_NAME = re.compile(r"^torch_dynamo_resume_in_(?P<function>\w+?)_at_(?P<line>\d+)$")


@dataclasses.dataclass(frozen=True)
class Resumption:
    """Where a frame Dynamo compiles resumes another after a graph break."""

    function: str
    line: int


def resumed_after_graph_break(tracer: Any) -> Resumption | None:
    """Where the frame being compiled resumes a function after a graph break in it, or None when it is no such
    resumption."""
    code = getattr(tracer, "f_code", None)
    match = _RESUME_NAME.match(getattr(code, "co_name", ""))
    if match is None:
        return None
    return Resumption(match.group("function"), int(match.group("line")))
