"""Rewrite: a matmul operand that other ops of the step read too (or a second matmul) is stored once, where it is
computed, and every reader loads it, instead of each pointwise reader recomputing it from its own inputs.

A batched step of Muon (:mod:`optcapture.lane_batches`) runs the Newton-Schulz iteration on ``[lanes, m, n]`` batches:
each iterate ``X = a * X + B @ X`` is an operand of the next iteration's ``bmm`` calls and is read by the next
iterate's pointwise op. The ``bmm`` operands reach Inductor through views (``matmul`` decomposes to ``expand`` of
the operand, even to its own shape, and to ``permute`` for ``X.mT``); where Inductor lowers them, the matmul gets its
own copy of the operand and the pointwise value stays unrealized, so the next iterate inlines it
(``GraphLowering.run_node`` realizes a value only past ``realize_reads_threshold`` reads). Each iterate then
recomputes the whole chain back to the momentum and the grad: on an H100 (torch 2.11) one kernel of a GPT-2 step read
four earlier ``bmm`` results, transposed, for 0.9 of Muon's 6.4 ms; a plain ``torch.compile`` of the same iteration
over a ``[2, 64, 192]`` batch on the CPU (torch 2.13) shows the same recomputation.

This pass marks such an operand to be realized in its own buffer (``_compat.realize_in_own_buffer``); the matmul and
the pointwise readers then load it.

Invariant: the pass only marks nodes; it changes no op. A stored value is rounded to its dtype where the inlined chain
kept float32 (a bfloat16 iterate, as eager rounds it), so in low precision the results move by that rounding.
"""

from __future__ import annotations

import torch

from optcapture import _compat

aten = torch.ops.aten
MATMULS = frozenset({aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default})
VIEWS = frozenset({aten.expand.default, aten.permute.default, aten.view.default, aten.reshape.default,
                   aten.t.default, aten.transpose.int, aten._unsafe_view.default})


def shared_operands(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The computed values a matmul reads (through views) that another op reads too, in graph order; a matmul's own
    result is left out (Inductor stores it already)."""
    chosen: dict[torch.fx.Node, None] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in MATMULS:
            continue
        for operand in node.args:
            while isinstance(operand, torch.fx.Node) and operand.op == "call_function" and operand.target in VIEWS:
                operand = operand.args[0]
            if isinstance(operand, torch.fx.Node) and operand.op == "call_function" \
                    and operand.target not in MATMULS and len(operand.users) > 1 \
                    and isinstance(operand.meta.get("val"), torch.Tensor):
                chosen[operand] = None
    return [node for node in graph.nodes if node in chosen]


def realize_shared_operands(graph: torch.fx.Graph) -> int:
    """Mark each of :func:`shared_operands`; returns how many."""
    operands = shared_operands(graph)
    for node in operands:
        _compat.realize_in_own_buffer(node)
    return len(operands)
